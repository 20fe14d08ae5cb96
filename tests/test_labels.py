"""
Labels and data in the real world: labels beyond the model's classes fail before step one for
every trainer, a text file named .npz is called what it is, and classifier-free guidance's
label drop (--class_dropout_prob) does not depend on --microbatch.
"""

import numpy as np
import pytest
import torch

from improved_diffusion.image_datasets import BatchStream, ImageDataset, load_image_dataset
from improved_diffusion.logger import Logger
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from improved_diffusion.train_util import TrainConfig, TrainLoop
from test_super_res import SR
from tiny import TINY_MODEL, assert_microbatches_agree, flags, run_script


def labelled_npz(path, labels):
    images = np.random.default_rng(0).integers(0, 256, size=(len(labels), 8, 8, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, arr_1=np.asarray(labels))
    return path


@pytest.mark.parametrize("script, args", [
    ("image_train.py", flags(dict(TINY_MODEL, batch_size=4, total_steps=1))),
    ("super_res_train.py", SR),
])
def test_labels_beyond_the_models_classes_fail_before_step_one(tmp_path, script, args):
    """The label embedding has 1000 rows: label 1000 would fail in the first step (or, with
    --class_dropout_prob, silently be the null label)."""
    data = labelled_npz(tmp_path / "data.npz", [0, 3, 1000, 2])
    proc = run_script(script, [*args, "--class_cond", "True", "--data_dir", data, "--log_dir", tmp_path / "run"],
                      check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --data_dir {data} has labels up to 1000, but a --class_cond model's class count is "
                      "1000 (labels 0 to 999)"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_text_file_named_npz_is_not_called_pickled_data(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("step,loss\n1,0.5\n")
    with pytest.raises(ValueError) as err:
        load_image_dataset(path, 8)
    assert str(err.value).startswith(f"{str(path)!r} is not a valid .npz archive (a zip of .npy arrays")
    assert "pickle" not in str(err.value)


def cfg_loop(microbatch, dropout=0.0):
    """A TrainLoop of a class-conditional model trained with --class_dropout_prob 0.5."""
    opts = {**model_and_diffusion_defaults(), **TINY_MODEL, "dropout": dropout, "class_cond": True}
    images = np.random.default_rng(0).integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**opts, class_dropout_prob=0.5)
    data = BatchStream(ImageDataset(images, np.arange(8) % 3), 8, seed=0)
    config = TrainConfig(batch_size=8, microbatch=microbatch)
    return TrainLoop(model=model, diffusion=diffusion, data=data, config=config, resume="none",
                     logger=Logger(None, stdout=False))


def test_the_dropped_labels_do_not_depend_on_microbatch():
    """The labels that reach the label embedding (dropped ones are the null label 1000) are the
    same whatever --microbatch is, also when the model draws random numbers of its own (its
    dropout) between microbatches, as it does on a GPU (there, a draw's size changes which
    random numbers it takes)."""
    seen = {}
    for micro in (-1, 1, 3):
        loop = cfg_loop(micro, dropout=0.1)
        labels = []
        loop.model.label_emb.register_forward_hook(lambda module, inputs, out: labels.append(inputs[0].clone()))
        torch.manual_seed(5)
        loop.run_step(*next(loop.data))
        seen[micro] = torch.cat(labels).tolist()
    assert 0 < seen[-1].count(1000) < 8
    assert seen[1] == seen[-1] and seen[3] == seen[-1]


def test_the_gradient_with_label_drop_does_not_depend_on_microbatch():
    assert_microbatches_agree(cfg_loop, microbatches=(-1, 1, 3))


def test_a_label_drop_needs_the_null_label():
    opts = {**model_and_diffusion_defaults(), **TINY_MODEL, "class_cond": True}
    model, _ = create_model_and_diffusion(**opts)
    x, t, y = torch.zeros(2, 3, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="drop_labels needs a model built with class_dropout_prob > 0"):
        model(x, t, y=y, drop_labels=torch.ones(2, dtype=torch.bool))
