"""The training step in-process: exact microbatch accumulation, and non-finite losses (the step
is skipped, fp16 lowers its loss scale, a streak stops the run, no checkpoint ever holds NaN;
NaNs are injected by a forward hook on the real model)."""

import os

import numpy as np
import pytest
import torch

from improved_diffusion import checkpoint as ckpt
from improved_diffusion.image_datasets import BatchStream, ImageDataset
from improved_diffusion.logger import Logger
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from improved_diffusion.train_util import NonFiniteError, TrainConfig, TrainLoop
from tiny import TINY_MODEL


def make_loop(tmp_path, precision="fp32", max_nonfinite_steps=3, microbatch=-1):
    torch.manual_seed(0)
    opts = model_and_diffusion_defaults()
    opts.update({k: v for k, v in TINY_MODEL.items()})
    opts["dropout"] = 0.0
    model, diffusion = create_model_and_diffusion(**opts)
    images = np.random.default_rng(0).integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8)
    data = BatchStream(ImageDataset(images, None), 4, seed=0)
    config = TrainConfig(
        batch_size=4, microbatch=microbatch, precision=precision, max_nonfinite_steps=max_nonfinite_steps, log_interval=1, save_interval=1000
    )
    return TrainLoop(
        model=model, diffusion=diffusion, data=data, config=config, log_dir=str(tmp_path), resume="none",
        logger=Logger(str(tmp_path), stdout=False, tensorboard=False),
    )


class NaNAt:
    """Forward hook replacing the model's output by NaN on the chosen calls."""

    def __init__(self, calls):
        self.calls, self.count = set(calls), 0

    def __call__(self, module, inputs, output):
        self.count += 1
        if self.count in self.calls or "all" in self.calls:
            return output * float("nan")
        return output


def params_of(loop):
    return [p.detach().clone() for p in loop.params]


def test_fp32_nan_step_is_skipped_and_training_goes_on(tmp_path):
    loop = make_loop(tmp_path)
    loop.model.register_forward_hook(NaNAt({2}))
    batch, cond = next(loop.data)
    loop.run_step(batch, cond)  # call 1: fine
    loop.step += 1
    before, ema_before = params_of(loop), [e.clone() for e in loop.ema_params[0]]
    adam_steps = [loop.opt.state[p]["step"].clone() for p in loop.params]
    loop.run_step(batch, cond)  # call 2: NaN
    loop.step += 1
    for a, b in zip(before, params_of(loop)):
        assert torch.equal(a, b)
    for a, b in zip(ema_before, loop.ema_params[0]):
        assert torch.equal(a, b)
    for s, p in zip(adam_steps, loop.params):
        assert torch.equal(s, loop.opt.state[p]["step"])
    assert loop.nonfinite_streak == 1
    loop.run_step(batch, cond)  # call 3: fine again, weights move, streak resets
    assert loop.nonfinite_streak == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(loop)))
    loop.dump_logs()  # logs the skip
    with open(os.path.join(tmp_path, "progress.csv")) as f:
        header = f.readline().split(",")
        values = f.readline().split(",")
    assert int(float(values[header.index("skipped_steps")])) == 1


def test_a_streak_of_nans_stops_with_a_clear_message_and_no_nan_checkpoint(tmp_path):
    loop = make_loop(tmp_path, max_nonfinite_steps=3)
    loop.model.register_forward_hook(NaNAt({"all"}))
    loop.config.total_steps = 10
    with pytest.raises(NonFiniteError, match="--max_nonfinite_steps"):
        loop.run_loop()
    assert loop.step == 2  # three failures: steps 0, 1, 2
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".pt")]


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    loop = make_loop(tmp_path)
    with torch.no_grad():
        loop.params[0].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError):
        loop.save()
    assert ckpt.find_latest_checkpoint(str(tmp_path)) is None


def test_fp16_nan_lowers_the_loss_scale_and_skips(tmp_path):
    loop = make_loop(tmp_path, precision="fp16")
    loop.model.register_forward_hook(NaNAt({1}))
    batch, cond = next(loop.data)
    scale = loop.scaler.get_scale()
    before = params_of(loop)
    loop.run_step(batch, cond)
    assert loop.scaler.get_scale() == scale / 2
    for a, b in zip(before, params_of(loop)):
        assert torch.equal(a, b)
    loop.step += 1
    loop.run_step(batch, cond)  # clean step: weights move, scale stays
    assert loop.scaler.get_scale() == scale / 2
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(loop)))


def test_microbatches_give_the_gradient_of_the_batch_mean(tmp_path):
    """--microbatch splits the batch without changing the gradient (guided-diffusion#111)."""
    grads = []
    for micro in (-1, 1, 2):
        loop = make_loop(tmp_path / str(micro), microbatch=micro)
        torch.manual_seed(5)
        np.random.seed(5)
        loop.run_step(*next(loop.data))
        grads.append([p.grad.clone() for p in loop.params])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
