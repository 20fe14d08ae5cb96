"""A tiny model and data set that every end-to-end test shares (seconds per run on a CPU)."""

import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
BIN = os.path.dirname(PYTHON)

TINY_MODEL = {
    "image_size": 8,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "4",
    "num_heads": 2,
    "diffusion_steps": 40,
    "noise_schedule": "cosine",
    "learn_sigma": True,
    "dropout": 0.1,
}


def flags(d):
    out = []
    for k, v in d.items():
        out += [f"--{k}", str(v)]
    return out


def make_npz(path, n=16, size=8, seed=0, classes=None):
    """Smooth random colour images (uint8 NHWC), optionally with labels."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 1, 1, 3))
    ramp = np.linspace(0, 60, size)[None, :, None, None]
    images = np.clip(base + ramp + rng.normal(0, 10, size=(n, size, size, 3)), 0, 255).astype(np.uint8)
    arrays = {"arr_0": images}
    if classes:
        arrays["arr_1"] = rng.integers(0, classes, size=n)
    np.savez(path, **arrays)
    return path


def env(**overrides):
    e = dict(os.environ, **overrides)
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.pop("OPENAI_LOGDIR", None)
    return e


def run_script(script, args, launcher=(), timeout=600, check=True, env_overrides=None):
    """Run scripts/<script> (optionally under mpiexec/torchrun, with extra environment
    variables); returns the CompletedProcess."""
    cmd = list(launcher) + [PYTHON, os.path.join(ROOT, "scripts", script)] + [str(a) for a in args]
    proc = subprocess.run(cmd, env=env(**(env_overrides or {})), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def mpiexec(n):
    return [os.path.join(BIN, "mpiexec"), "-n", str(n)]


def torchrun(n):
    return [os.path.join(BIN, "torchrun"), "--standalone", f"--nproc_per_node={n}", "--no-python"]


def assert_identical(a, b, path="checkpoint"):
    """Bitwise equality of nested state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs (max abs diff {(a.float() - b.float()).abs().max()})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


def assert_microbatches_agree(make_loop, microbatches=(-1, 1, 2)):
    """One step from the same draws gives the same gradient whatever --microbatch is:
    `make_loop(microbatch)` builds a TrainLoop. The same float32 sums in another order, so
    rtol 1e-5 (and atol 1e-7 for entries near zero), far below a weighting error's size."""
    grads = []
    for micro in microbatches:
        loop = make_loop(micro)
        torch.manual_seed(5)
        np.random.seed(5)
        loop.run_step(*next(loop.data))
        grads.append([p.grad.clone() for p in loop.params])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
