"""
The exactness-sensitive tests under every kernel choice this CPU supports.

PyTorch picks its CPU kernels by `ATEN_CPU_CAPABILITY` (default / avx2 / avx512), oneDNN
(convolutions) by `ONEDNN_MAX_CPU_ISA`, MKL (matrix products) by `MKL_ENABLE_INSTRUCTIONS`.
Each choice rounds float32 differently; a test that passes under one and fails under another
pins rounding instead of behaviour. This module reruns those tests under each setting, in a
fresh process (the variables are read once, at start-up).

It takes a few minutes, so it runs only when asked for (`-m kernels`):

    bash scripts/test.sh -m kernels
"""

import os
import subprocess

import pytest

from tiny import PYTHON, ROOT, env

pytestmark = pytest.mark.kernels

# The tests whose numbers come from two different kernels, or are pinned.
SENSITIVE = [
    "tests/test_pinned_weights.py",
    "tests/test_fast_path.py",
    "tests/test_sampling.py",
    "tests/test_gan.py",
    "tests/test_metrics.py",
    "tests/test_rivals.py",
    "tests/test_diffusion.py",
]


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def settings():
    """(variable, value) pairs that this CPU can run; the most capable ones are the defaults."""
    flags = cpu_flags()
    avx2 = "avx2" in flags and "fma" in flags
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    out = [("ATEN_CPU_CAPABILITY", "default")]
    out += [("ATEN_CPU_CAPABILITY", "avx2")] if avx2 else []
    out += [("ATEN_CPU_CAPABILITY", "avx512")] if avx512 else []
    out += [("ONEDNN_MAX_CPU_ISA", "SSE41")]
    out += [("ONEDNN_MAX_CPU_ISA", "AVX2")] if avx512 and avx2 else []
    out += [("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")]
    out += [("MKL_ENABLE_INSTRUCTIONS", "AVX2")] if avx512 and avx2 else []
    return out


@pytest.mark.parametrize("variable, value", settings(), ids=lambda v: str(v))
def test_exactness_sensitive_tests_pass_under(variable, value):
    e = env(**{variable: value})
    cmd = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not kernels", *SENSITIVE]
    proc = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f"{variable}={value}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
