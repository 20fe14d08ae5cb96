"""
Pinned weights: a fixed tiny run reaches these weights, whatever CPU computes it.

Any change of numbers in the training path (initialisation, data order, timesteps, noise,
loss, AdamW with MD / LRC, CLTS, gradient clipping, EMA) moves the weights of this run.
It runs through `scripts/image_train.py` with `--precision fp64`: weights drawn in float64,
float64 inputs, noise, activations and optimizer (precision.py). A float32 run cannot be
pinned: the CPU's kernels (vector width, fused multiply-adds, oneDNN / MKL code paths) round
float32 differently, and Adam turns those differences into ~1e-6 weight changes.

What is compared (tests/data/pinned_fp64.json, small): for every floating tensor of the model,
the EMA and the optimizer state after 6 steps, two projections on fixed +-1 vectors, which
every entry moves. The tolerance (`TOL`, relative to the largest entry of that kind of state
times sqrt(numel), the size of a projection of noise of that scale):
- Rounding: float64's unit roundoff is 1.1e-16; over 6 steps of this run the ATen kernels
  `ATEN_CPU_CAPABILITY=default / avx2 / avx512`, oneDNN at `ONEDNN_MAX_CPU_ISA=AVX2`, MKL at
  `MKL_ENABLE_INSTRUCTIONS=AVX2`, 2 threads and the single-tensor AdamW differ from each
  other by at most 1.7e-14 in this measure (AMD EPYC, AVX-512, torch 2.14).
- Behaviour: `--lr` changed by 1e-6 relative moves it by 2.1e-9, `--md_beta_min` by 1e-6
  relative by 1.1e-7 (test_a_tiny_change_of_one_constant_fails_the_comparison checks the lr).
TOL = 1e-11 sits 600x above the rounding and 200x below that 1e-6 change.

To re-pin after an intended change of behaviour: `python tests/test_pinned_weights.py --write`.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

from improved_diffusion.run import checkpoint as ckpt
from tiny import ROOT, TINY_MODEL, flags, make_npz, run_script

STEPS = 6
TOL = 1e-11
REFERENCE = os.path.join(ROOT, "tests", "data", "pinned_fp64.json")
OPTIONS = dict(
    TINY_MODEL, batch_size=4, microbatch=2, log_interval=3, save_interval=STEPS, total_steps=STEPS,
    ema_rate="0.99", lr=3e-4, seed=7, precision="fp64", schedule_sampler="clts", clts_sigma=0.3,
    clts_target_steps=4, momentum_decay=True, lr_compensation=True, md_beta_min=0.6, grad_clip=1.0,
)


def floating_tensors(state, prefix):
    """{path: float64 numpy vector} of every floating tensor in a nested state (sorted paths)."""
    out = {}

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.numel() > 1:
                out[path] = obj.detach().double().flatten().numpy()
        elif isinstance(obj, dict):
            for key in obj:
                walk(obj[key], f"{path}.{key}")
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]")

    walk(state, prefix)
    return dict(sorted(out.items()))


def kind(path):
    """model, ema, exp_avg or exp_avg_sq: entries of one kind share a scale."""
    return path.rsplit(".", 1)[-1] if path.startswith("opt") else path.split(".", 1)[0]


def summarize(log_dir):
    """Two projections per tensor on +-1 vectors (seeded by the tensor's index), and the scales."""
    load = lambda name: torch.load(os.path.join(log_dir, name), weights_only=True)  # noqa: E731
    tensors = {}
    tensors.update(floating_tensors(load(ckpt.model_name(STEPS)), "model"))
    tensors.update(floating_tensors(load(ckpt.ema_name(0.99, STEPS)), "ema"))
    tensors.update(floating_tensors(load(ckpt.opt_name(STEPS))["state"], "opt"))
    projections, scales = {}, {}
    for i, (path, values) in enumerate(tensors.items()):
        signs = np.random.default_rng(i).integers(0, 2, size=(2, values.size)) * 2.0 - 1.0
        projections[path] = {"numel": values.size, "projections": (signs @ values).tolist()}
        scales[kind(path)] = max(scales.get(kind(path), 0.0), float(np.abs(values).max()))
    return {"projections": projections, "scales": scales}


def pinned_run(tmp_path, env=None, **changes):
    data = make_npz(tmp_path / "train.npz", n=24, classes=None)
    log_dir = tmp_path / "run"
    run_script("image_train.py", flags({**OPTIONS, **changes, "data_dir": data, "log_dir": log_dir}), env_overrides=env)
    return summarize(log_dir)


def worst_deviation(got, reference):
    """max over tensors of |projection difference| / (scale of its kind x sqrt(numel))."""
    assert sorted(got["projections"]) == sorted(reference["projections"]), "the run's tensors changed"
    worst = 0.0
    for path, ref in reference["projections"].items():
        new = got["projections"][path]
        assert new["numel"] == ref["numel"], path
        size = reference["scales"][kind(path)] * np.sqrt(ref["numel"])
        diff = np.abs(np.subtract(new["projections"], ref["projections"])).max()
        worst = max(worst, float(diff / size))
    return worst


def load_reference():
    with open(REFERENCE) as f:
        return json.load(f)


@pytest.mark.parametrize("kernels", [None, {"ATEN_CPU_CAPABILITY": "default"}], ids=["native", "aten-default"])
def test_fixed_tiny_run_reaches_the_pinned_weights(tmp_path, kernels):
    """The CPU's own kernels, and PyTorch's plain C++ ones (no vector instructions)."""
    deviation = worst_deviation(pinned_run(tmp_path, env=kernels), load_reference())
    assert deviation <= TOL, f"deviation {deviation:.3g} > {TOL:g}: the training step's numbers changed"


@pytest.mark.slow
def test_a_tiny_change_of_one_constant_fails_the_comparison(tmp_path):
    """The tolerance is far below a behavioural change: lr 1e-6 relative higher is caught."""
    deviation = worst_deviation(pinned_run(tmp_path, lr=OPTIONS["lr"] * (1 + 1e-6)), load_reference())
    assert deviation > 20 * TOL, f"lr x (1 + 1e-6) moved the weights by only {deviation:.3g}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_pinned_weights.py --write   (re-pins tests/data/pinned_fp64.json)")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        summary = pinned_run(Path(tmp))
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    with open(REFERENCE, "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    print(f"wrote {REFERENCE}")
