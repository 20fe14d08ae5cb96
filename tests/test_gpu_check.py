"""scripts/gpu_check.sh, the one prepared GPU run, dry-runs on the CPU at toy size."""

import json
import os
import subprocess

from tiny import PYTHON, ROOT, env


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry_run", "--skip_compile", "--out", str(out)],
        env={**env(), "PYTHON": PYTHON}, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for name in ("tests", "compare", "ddim10k", "big_b8"):
        assert f"{name}: ok" in summary, summary
    assert "compiled" not in summary and "graphs" not in summary  # --skip_compile
    compare = json.loads((out / "compare.json").read_text())
    assert compare["speedup"]["train"] > 0 and compare["fast"]["profile"]["steps"] == 3
    assert (out / "profile_demo.txt").read_text().strip()
    ddim = json.loads((out / "ddim10k.json").read_text())["run"]["sample_images"]
    assert ddim["num_samples"] == 8 and ddim["seconds"] > 0
    assert "SPEC section 6 targets" in summary and "CLTS + MDLRC < 1% of a step" in summary


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--budgte", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--budgte'" in proc.stderr
