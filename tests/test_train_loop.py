"""The training step in-process: exact microbatch accumulation, and non-finite losses (the step
is skipped, fp16 lowers its loss scale, a streak stops the run, no checkpoint ever holds NaN;
NaNs are injected by a forward hook on the real model)."""

import os

import numpy as np
import pytest
import torch

from improved_diffusion import logger as logger_module
from improved_diffusion.image_datasets import BatchStream, ImageDataset, load_data
from improved_diffusion.logger import Logger
from improved_diffusion.resample import UniformSampler
from improved_diffusion.run.run_dir import RunDir
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from improved_diffusion.train_util import NonFiniteError, TrainConfig, TrainLoop, log_losses
from tiny import TINY_MODEL, assert_microbatches_agree


def make_loop(tmp_path, precision="fp32", max_nonfinite_steps=3, microbatch=-1, optimizer_impl="auto", log_interval=1,
              resume="none", save_interval=1000, total_steps=None):
    torch.manual_seed(0)
    opts = model_and_diffusion_defaults()
    opts.update({k: v for k, v in TINY_MODEL.items()})
    opts["dropout"] = 0.0
    model, diffusion = create_model_and_diffusion(**opts)
    images = np.random.default_rng(0).integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8)
    data = BatchStream(ImageDataset(images, None), 4, seed=0)
    config = TrainConfig(
        batch_size=4, microbatch=microbatch, precision=precision, max_nonfinite_steps=max_nonfinite_steps,
        log_interval=log_interval, save_interval=save_interval, optimizer_impl=optimizer_impl, total_steps=total_steps,
    )
    return TrainLoop(
        model=model, diffusion=diffusion, data=data, config=config, log_dir=str(tmp_path), resume=resume,
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


@pytest.mark.parametrize("optimizer_impl", ["fused", "foreach"])  # skipped on the device / on the host
def test_fp32_nan_step_is_skipped_and_training_goes_on(tmp_path, optimizer_impl):
    loop = make_loop(tmp_path, optimizer_impl=optimizer_impl)
    assert loop.mixed.skips_on_device == (optimizer_impl == "fused")
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
    with pytest.raises(NonFiniteError, match="--max_nonfinite_steps 3"):
        loop.run_loop()
    assert loop.step == 3  # three failed updates (steps 0-2), noticed at the log dump after them
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".pt")]


def test_a_streak_across_a_log_interval_is_counted_whole(tmp_path):
    """The streak is tracked on the device and checked at dumps: 2 NaN steps before the dump at
    step 5 and 1 after it make 3 in a row, which stops the run at the next dump (step 10)."""
    loop = make_loop(tmp_path, max_nonfinite_steps=3, log_interval=5)
    loop.model.register_forward_hook(NaNAt({4, 5, 6}))  # calls 4-6 are steps 3-5
    loop.config.total_steps = 20
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row .* by step 10"):
        loop.run_loop()
    assert loop.step == 10


def test_separate_nan_steps_do_not_stop_the_run(tmp_path):
    loop = make_loop(tmp_path, max_nonfinite_steps=2, log_interval=5)
    loop.model.register_forward_hook(NaNAt({2, 4, 6}))
    loop.config.total_steps = 8
    loop.run_loop()
    assert loop.step == 8
    rows = list(open(os.path.join(tmp_path, "progress.csv")))
    header = rows[0].strip().split(",")
    assert [int(float(r.split(",")[header.index("skipped_steps")])) for r in rows[1:]] == [2, 1]


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    loop = make_loop(tmp_path)
    with torch.no_grad():
        loop.params[0].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError):
        loop.save()
    assert RunDir(tmp_path).latest(verify=False) is None


@pytest.mark.parametrize("optimizer_impl", ["fused", "foreach"])
def test_fp16_nan_lowers_the_loss_scale_and_skips(tmp_path, optimizer_impl):
    loop = make_loop(tmp_path, precision="fp16", optimizer_impl=optimizer_impl)
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
    assert_microbatches_agree(lambda micro: make_loop(tmp_path / str(micro), microbatch=micro))


def test_logged_losses_are_weighted_means_per_quartile(tmp_path):
    """As the original's log_loss_dict: each term times its sampler weight, averaged over the
    batch and over the examples of each timestep quartile (float64 recomputation)."""
    loop = make_loop(tmp_path)
    T = loop.diffusion.num_timesteps
    rng = np.random.default_rng(1)
    t = torch.tensor([0, 3, T // 4, T // 2, T // 2 + 1, T - 1, 2, T - 2])
    losses = {"loss": torch.tensor(rng.normal(size=8)), "mse": torch.tensor(rng.random(8))}
    weights = torch.tensor(rng.random(8) + 0.5, dtype=torch.float32)
    log_losses(loop.logger, t, losses, weights, T)
    t2 = torch.tensor([T - 1, 1])
    losses2 = {k: torch.tensor(rng.random(2)) for k in losses}
    log_losses(loop.logger, t2, losses2, torch.ones(2), T)
    got = loop.logger._reduced_means()
    all_t = np.concatenate([t.numpy(), t2.numpy()])
    quartile = np.minimum(4 * all_t // T, 3)
    for key in losses:
        values = np.concatenate([losses[key].numpy() * weights.double().numpy(), losses2[key].numpy()])
        assert got[key] == pytest.approx(values.mean(), rel=1e-6)
        for q in range(4):
            assert got[f"{key}_q{q}"] == pytest.approx(values[quartile == q].mean(), rel=1e-6)


def test_the_original_keyword_form_trains_from_load_data(tmp_path):
    """improved-diffusion's image_train.py: load_data's float batches into TrainLoop(batch_size=...,
    resume_checkpoint=...), checkpoints in the module logger's directory."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    torch.manual_seed(0)
    opts = model_and_diffusion_defaults()
    opts.update(TINY_MODEL)
    model, diffusion = create_model_and_diffusion(**opts)
    previous = logger_module.get_current()
    logger_module.configure(str(tmp_path / "run"), stdout=False, tensorboard=False)
    try:
        loop = TrainLoop(
            model=model, diffusion=diffusion, data=load_data(data_dir=str(folder), batch_size=2, image_size=8),
            batch_size=2, microbatch=-1, lr=1e-4, ema_rate="0.9999", log_interval=1, save_interval=2,
            resume_checkpoint="", use_fp16=False, fp16_scale_growth=1e-3,
            schedule_sampler=UniformSampler(diffusion), weight_decay=0.0, lr_anneal_steps=3,
        )
        loop.run_loop()
    finally:
        logger_module._current = previous
    assert loop.config.precision == "fp32" and loop.config.ema_rate == (0.9999,)
    assert RunDir(tmp_path / "run").latest(verify=False)[0] == 3
    assert os.path.isfile(tmp_path / "run" / "ema_0.9999_000002.pt")
    with pytest.raises(TypeError, match="not both"):
        TrainLoop(model=model, diffusion=diffusion, data=None, config=TrainConfig(), batch_size=2)
