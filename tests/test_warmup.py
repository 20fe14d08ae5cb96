"""
Learning-rate and EMA warm-up: the logged schedules against an independent float64
computation, the EMA recursion against numpy, and exact resume in the middle of both ramps.
"""

import os

import numpy as np
import pytest
import torch

from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.options import config
from improved_diffusion.run.ema import EMA, warmup_rate
from improved_diffusion.train_util import TrainConfig
from test_train import ALL_METHODS, assert_identical, load_checkpoint_files, read_progress, train_args
from tiny import make_npz, run_script


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("data") / "train.npz", n=24)


def reference_lr(k, lr, warmup, anneal=0, md=None):
    """lr_k = base(k) * min(1, (k+1)/W) * LRC(k), in float64 numpy, written from docs/methods.md."""
    k = np.float64(k)
    base = lr * (1 - min(k / anneal, 1)) if anneal else np.float64(lr)
    ramp = min(np.float64(1), (k + 1) / warmup) if warmup else np.float64(1)
    lrc = np.float64(1)
    if md is not None:
        beta_init, beta_min, total = md
        r = max(0.0, 1 - k / total)
        beta = max(beta_min, beta_init * r / ((1 - beta_init) + beta_init * r))
        lrc = (1 - beta_init) / (1 - beta)
    return base * ramp * lrc


def test_lr_and_ema_warmup_logged_and_ema_recursion(data, tmp_path):
    """Warm-up over an anneal: progress.csv's lr and ema_decay columns each step; every EMA at
    every step is the float64 recursion of the saved weights."""
    log_dir = tmp_path / "run"
    k_total, lr, w = 7, 3e-4, 4
    run_script("image_train.py", train_args(
        data, log_dir, total_steps=k_total, lr=lr, lr_warmup_steps=w, lr_anneal_steps=10, ema_warmup=True,
        log_interval=1, save_interval=1,
    ))
    rows = read_progress(log_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, k_total + 1))
    for row in rows:
        k = int(row["step"]) - 1  # the row after update k
        assert float(row["lr"]) == pytest.approx(reference_lr(k, lr, w, anneal=10), rel=1e-12)
        assert float(row["ema_decay"]) == pytest.approx(min(0.9, (1 + k) / (10 + k)), rel=1e-12)
        assert float(row["beta1"]) == 0.9

    # EMA of rate r after update k: e_{k+1} = d_k e_k + (1 - d_k) w_{k+1}, d_k = min(r, (1+k)/(10+k)),
    # run in float64 from the saved step-1 average over the saved weights of steps 2..K.
    files = {step: load_checkpoint_files(log_dir, step) for step in range(1, k_total + 1)}
    for rate in (0.9, 0.99):
        name = lambda step: ckpt.ema_name(rate, step)  # noqa: E731
        ema = {key: v.double().numpy() for key, v in files[1][name(1)].items()}
        for k in range(1, k_total):
            d = min(rate, (1.0 + k) / (10.0 + k))
            weights = files[k + 1][ckpt.model_name(k + 1)]
            ema = {key: d * e + (1 - d) * weights[key].double().numpy() for key, e in ema.items()}
            saved = files[k + 1][name(k + 1)]
            for key, e in ema.items():
                np.testing.assert_allclose(saved[key].double().numpy(), e, rtol=1e-5, atol=1e-6, err_msg=f"{key} k={k}")


def test_warmup_composes_with_md_and_lrc(data, tmp_path):
    log_dir = tmp_path / "run"
    k_total, lr, w = 8, 2e-4, 5
    run_script("image_train.py", train_args(
        data, log_dir, total_steps=k_total, lr=lr, lr_warmup_steps=w, log_interval=1,
        momentum_decay=True, lr_compensation=True, md_beta_init=0.9, md_beta_min=0.6,
    ))
    rows = read_progress(log_dir)
    assert len(rows) == k_total and "ema_decay" not in rows[0]  # no EMA column without --ema_warmup
    for row in rows:
        k = int(row["step"]) - 1
        assert float(row["lr"]) == pytest.approx(reference_lr(k, lr, w, md=(0.9, 0.6, k_total)), rel=1e-12)


def test_exact_resume_mid_warmup(data, tmp_path):
    """N steps + resume + N == 2N bitwise, stopped while both ramps are still rising (W > 2N)."""
    n = 3
    extra = dict(ALL_METHODS, lr_warmup_steps=2 * n + 2, ema_warmup=True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("image_train.py", train_args(data, straight, total_steps=2 * n, **extra))
    run_script("image_train.py", train_args(data, resumed, total_steps=2 * n, stop_at=n, **extra))
    proc = run_script("image_train.py", train_args(data, resumed, total_steps=2 * n, **extra))
    assert f"resumed from step {n}" in proc.stdout
    assert_identical(load_checkpoint_files(straight, 2 * n), load_checkpoint_files(resumed, 2 * n))
    state = torch.load(os.path.join(resumed, ckpt.state_name(2 * n)), weights_only=True)
    assert state["schedules"]["ema_decay"] == min(0.9, (1 + 2 * n) / (10 + 2 * n))


def test_ema_update_matches_numpy():
    """EMA.update with the ramped rates (and a skipped step) against the float64 recursion."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    rates = (0.999, 0.5)
    ema = EMA(model, rates)
    reference = [[p.detach().double().numpy().copy() for p in model.parameters()] for _ in rates]
    for k in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        finite = torch.tensor(k != 5)  # step 5 is skipped: the averages stay
        step_rates = ema.rates_at(k, warmup=True)
        assert step_rates == tuple(min(r, (1 + k) / (10 + k)) for r in rates)
        ema.update(finite, step_rates)
        if k == 5:
            continue
        for i, d in enumerate(step_rates):
            reference[i] = [d * e + (1 - d) * p.detach().double().numpy() for e, p in zip(reference[i], model.parameters())]
    for i in range(len(rates)):
        for got, want in zip(ema.params[i], reference[i]):
            np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6, atol=1e-6)
    assert ema.rates_at(10**6, warmup=True) == rates and ema.rates_at(0) == rates


def test_warmup_rate():
    assert warmup_rate(0.9999, 0) == 0.1
    assert warmup_rate(0.9999, 90) == 0.91
    assert warmup_rate(0.9, 10**6) == 0.9
    k_reached = round((10 * 0.999 - 1) / (1 - 0.999))  # where the ramp meets the rate
    assert warmup_rate(0.999, k_reached - 10) < 0.999 and warmup_rate(0.999, k_reached + 10) == 0.999


def test_warmup_options():
    assert config.BY_NAME["lr_warmup_steps"].default == 0 and config.BY_NAME["ema_warmup"].default is False
    assert TrainConfig().lr_warmup_steps == 0 and TrainConfig().ema_warmup is False
    with pytest.raises(ValueError, match="--lr_warmup_steps must be >= 0"):
        config.BY_NAME["lr_warmup_steps"].validate(-1)
    with pytest.raises(ValueError, match="--lr_warmup_steps must be >= 0"):
        TrainConfig(lr_warmup_steps=-2)
