"""scripts/demo_report.py: the demo's report folder, and that a rerun keeps the first run's time."""

import csv
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from tiny import ROOT, run_script

CONFIG = {"image_size": 16, "total_steps": 100, "batch_size": 8, "lr": 0.002, "ema_rate": "0.995",
          "log_interval": 50, "schedule_sampler": "clts", "clts_mu": 0.3, "clts_sigma": 1.0,
          "clts_target_steps": 20, "momentum_decay": True, "md_beta_init": 0.9, "md_beta_min": 0.5,
          "lr_compensation": True, "eval_num_samples": 50, "eval_respacing": "ddim50"}


@pytest.fixture
def demo_run(tmp_path):
    """A finished demo's OUT folder as demo.sh leaves it before the report, and the data."""
    run = tmp_path / "demo"
    (run / "train").mkdir(parents=True)
    (run / "report").mkdir()
    (run / "train" / "config.json").write_text(json.dumps(CONFIG))
    with open(run / "train" / "progress.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr", "beta1", "images_per_sec", "fid"])
        w.writerow([50, 0.2512, 0.002, 0.8, 100.0, ""])
        w.writerow([100, 0.1234, 0.0006, 0.5, 120.0, 87.65])
    rng = np.random.default_rng(0)
    np.savez(run / "report" / "samples.npz", rng.integers(0, 256, (64, 16, 16, 1), dtype=np.uint8))
    (run / "report" / "digits.json").write_text(json.dumps({
        "threshold": 0.9, "heldout_accuracy": 0.97,
        "heldout": {"num_images": 500, "recognisable": 0.9, "class_counts": [45] * 10, "not_a_digit": 2},
        "samples": {"num_images": 64, "recognisable": 0.625, "class_counts": [4] * 10, "not_a_digit": 3}}))
    data = tmp_path / "digits.npz"
    np.savez(data, rng.integers(0, 256, (200, 16, 16, 1), dtype=np.uint8), np.repeat(np.arange(10), 20))
    return run, data


def report(run, data, *args):
    run_script("demo_report.py", [run, "--data", data, *args])
    return (run / "report" / "report.md").read_text()


def test_report_numbers_and_figures(demo_run):
    run, data = demo_run
    text = report(run, data, "--seconds", "600", "--stages", "install=170,train=300", "--record_time")
    # The loss quoted is the last row of progress.csv, the last point of the (unsmoothed) curve.
    assert "| training loss at step 100 | 0.1234 (mean over the steps since the previous log point" in text
    assert "**62%** of 64" in text and "90% recognisable, accuracy 97.0%" in text
    assert "**87.7**" in text and "50 samples" in text
    assert "**10.0 min** (install 170 s, train 300 s)" in text
    assert "CLTS (mu 0.3" in text and "MD (beta1 0.9 -> 0.5)" in text and "LRC" in text
    # Both grids enlarged 4x: 8 images of 16 px plus 2 px gaps -> 146 px -> 584 px each.
    width, height = Image.open(run / "report" / "samples_vs_real.png").size
    assert width >= 2 * 584 and height >= 584
    assert Image.open(run / "report" / "curves.png").size[0] > 0


def test_rerun_keeps_the_first_runs_time(demo_run):
    run, data = demo_run
    report(run, data, "--seconds", "600", "--stages", "install=170,train=300", "--record_time")
    recorded = json.loads((run / "timing.json").read_text())
    assert recorded["seconds"] == 600 and recorded["stages"] == [["install", 170.0], ["train", 300.0]]
    text = report(run, data, "--seconds", "30", "--stages", "install=1,train=2")
    assert json.loads((run / "timing.json").read_text()) == recorded
    assert "**10.0 min** (install 170 s, train 300 s)" in text
    assert "| this rerun (training already done or resumed) | 0.5 min |" in text


def test_without_a_recorded_time_and_without_digits_json(demo_run):
    run, data = demo_run
    (run / "report" / "digits.json").unlink()
    text = report(run, data, "--seconds", "30")
    assert not (run / "timing.json").exists()
    assert "time of the demo" not in text and "recognisable" not in text
    assert "| this rerun (training already done or resumed) | 0.5 min |" in text


def test_errors(demo_run):
    run, data = demo_run
    proc = run_script("demo_report.py", [run, "--data", data, "--stages", "install:3"], check=False)
    assert proc.returncode == 2 and "expected NAME=SECONDS" in proc.stderr
    (run / "report" / "samples.npz").unlink()
    proc = run_script("demo_report.py", [run, "--data", data], check=False)
    assert proc.returncode == 2 and "samples.npz not found" in proc.stderr


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stand-in interpreter: log the command; the training call leaves a checkpoint, as a real one would.
echo "$*" >> "$CALLS"
case "$1" in
  scripts/image_train.py) mkdir -p "$OUT/train" && touch "$OUT/train/state000010.pt" ;;
  scripts/launch/config_flags.py) echo "$OUT/train/ema_0.995_000010.pt" ;;
esac
"""


def test_demo_sh_records_the_time_only_when_it_trained_from_scratch(tmp_path):
    """demo.sh passes --record_time to the report on the run that trains from step 0, not on a rerun."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "demo.sh").write_text(open(os.path.join(ROOT, "scripts", "demo.sh")).read())
    (repo / "scripts" / "install.sh").write_text("")
    fake_bin = repo / ".venv" / "bin"
    fake_bin.mkdir(parents=True)
    (fake_bin / "python").write_text(FAKE_PYTHON)
    (fake_bin / "python").chmod(0o755)
    (fake_bin / "activate").write_text(f'export PATH="{fake_bin}:$PATH"\n')
    (repo / "data" / "demo").mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, OUT=str(tmp_path / "out"), STEPS="10", CALLS=str(calls))
    for key in ("EVAL_SAMPLES", "REF_IMAGES", "VIRTUAL_ENV"):
        env.pop(key, None)

    def run():
        calls.write_text("")
        proc = subprocess.run(["bash", str(repo / "scripts" / "demo.sh")], env=env, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return calls.read_text().splitlines()

    first = run()
    assert [c.split()[0] for c in first] == [
        "datasets/mnist_demo.py", "scripts/fid.py", "scripts/image_train.py", "scripts/launch/config_flags.py",
        "scripts/image_sample.py", "scripts/digit_score.py", "scripts/fid.py", "scripts/demo_report.py"]
    assert "--channels 1" in first[0] and "--total_steps 10 --clts_target_steps 2" in first[2]
    report = first[-1]
    assert report.endswith("--record_time") and "--stages install=" in report and ",score=" in report
    assert "--record_time" not in run()[-1]
