"""
Shared pytest setup: make the repository importable without installing it.
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# End-to-end modules (subprocess training runs, mpiexec, kills): `pytest -m "not slow"` runs
# the quick rest (scripts/test.sh passes its arguments on to pytest).
SLOW_MODULES = {"test_train", "test_run_dir", "test_slurm", "test_warmup", "test_gpu_check", "test_study",
                "test_run_config", "test_gan", "test_classifier", "test_guidance", "test_super_res"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end test (training runs in subprocesses)")
    config.addinivalue_line("markers", "kernels: reruns the exactness-sensitive tests under every CPU kernel "
                                       "setting (minutes; only with -m kernels)")


def pytest_collection_modifyitems(config, items):
    import pytest

    asked_for_kernels = "kernels" in (config.getoption("-m") or "")
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if "kernels" in item.keywords and not asked_for_kernels:
            item.add_marker(pytest.mark.skip(reason="the kernel matrix runs with -m kernels (bash scripts/test.sh -m kernels)"))
