"""
Pinned weights: a fixed tiny configuration reaches exactly these weights after a few steps.

Recorded before the option-table / TrainLoop redesign (issue 12) and kept since: any change
of numbers in the training path (initialisation, data order, timesteps, noise, loss, AdamW
with MD / LRC, CLTS, EMA) changes the digest. CPU, one thread (tiny.env), fp32. The digests
are of this machine kind's CPU kernels (x86-64, AVX2); another CPU may round differently.
"""

import hashlib
import os

import torch

from improved_diffusion import checkpoint as ckpt
from tiny import TINY_MODEL, flags, make_npz, run_script

STEPS = 6
PINNED = {
    "model": "d9b464faa99ca771d4c027e316d531e66465898f377ddbb88341c8fa594b7124",
    "ema_0.99": "7224a30e940ebf529fb700eb02276044a6fc4c9fae97fbe6eb16ee9a54ab5272",
    "opt": "ad1bb48667cda989d36c87f4216a820d7b97ab3096e9d0740052334c3c42a68a",
}


def digest(state):
    """SHA-256 of every tensor's bytes in key order (nested dicts and lists walked)."""
    h = hashlib.sha256()

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            h.update(path.encode())
            h.update(obj.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                walk(obj[key], f"{path}.{key}")
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]")
        else:
            h.update(f"{path}={obj!r}".encode())

    walk(state, "")
    return h.hexdigest()


def test_fixed_tiny_run_reaches_the_pinned_weights(tmp_path):
    data = make_npz(tmp_path / "train.npz", n=24, classes=None)
    log_dir = tmp_path / "run"
    opts = dict(
        TINY_MODEL, data_dir=data, log_dir=log_dir, batch_size=4, microbatch=2, log_interval=3,
        save_interval=STEPS, total_steps=STEPS, ema_rate="0.99", lr=3e-4, seed=7, precision="fp32",
        schedule_sampler="clts", clts_sigma=0.3, clts_target_steps=4, momentum_decay=True,
        lr_compensation=True, md_beta_min=0.6, grad_clip=1.0,
    )
    run_script("image_train.py", flags(opts))
    load = lambda name: torch.load(os.path.join(log_dir, name), weights_only=True)  # noqa: E731
    got = {
        "model": digest(load(ckpt.model_name(STEPS))),
        "ema_0.99": digest(load(ckpt.ema_name(0.99, STEPS))),
        "opt": digest(load(ckpt.opt_name(STEPS))),
    }
    assert got == PINNED, got
