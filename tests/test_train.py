"""
End-to-end training: launchers, exact resume, kills at random moments, bad input.

Runs scripts/image_train.py as a user would, on a tiny model, in subprocesses.
"""

import csv
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.run.run_dir import RunDir
from tiny import PYTHON, ROOT, TINY_MODEL, assert_identical, env, flags, make_npz, mpiexec, run_script, torchrun

ALL_METHODS = {
    "schedule_sampler": "clts",
    "clts_sigma": 0.3,
    "clts_target_steps": 4,
    "momentum_decay": True,
    "lr_compensation": True,
    "md_beta_min": 0.6,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("data") / "train.npz", n=24)


def train_args(data, log_dir, **extra):
    opts = dict(TINY_MODEL, data_dir=data, log_dir=log_dir, batch_size=4, log_interval=2, save_interval=4, ema_rate="0.9,0.99")
    opts.update(extra)
    return flags(opts)


def load_checkpoint_files(log_dir, step):
    names = [ckpt.model_name(step), ckpt.ema_name(0.9, step), ckpt.ema_name(0.99, step), ckpt.opt_name(step)]
    return {n: torch.load(os.path.join(log_dir, n), weights_only=True) for n in names}


def read_progress(log_dir):
    with open(os.path.join(log_dir, "progress.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("launcher_name", ["plain", "mpiexec"])
def test_exact_resume_with_all_methods(data, tmp_path, launcher_name):
    """2N steps straight == N steps, stop, --resume auto, N more (bitwise on CPU). The resumed
    run keeps its data on the device (--data_on_device), which must change nothing either."""
    launcher = mpiexec(2) if launcher_name == "mpiexec" else ()
    n = 4
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    on_device = dict(ALL_METHODS, data_on_device=True)
    run_script("image_train.py", train_args(data, straight, total_steps=2 * n, **ALL_METHODS), launcher)
    run_script("image_train.py", train_args(data, resumed, total_steps=2 * n, stop_at=n, **on_device), launcher)
    assert RunDir(resumed).latest(verify=False)[0] == n
    proc = run_script("image_train.py", train_args(data, resumed, total_steps=2 * n, **on_device), launcher)
    assert f"resumed from step {n}" in proc.stdout
    assert_identical(load_checkpoint_files(straight, 2 * n), load_checkpoint_files(resumed, 2 * n))
    rows = read_progress(resumed)
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    if launcher_name == "mpiexec":
        state = torch.load(resumed / ckpt.state_name(2 * n), weights_only=True)
        assert state["world_size"] == 2 and len(state["ranks"]) == 2
        # the two ranks saw different data
        assert state["ranks"][0]["rng_torch"].tolist() != state["ranks"][1]["rng_torch"].tolist()


def test_torchrun_two_processes(data, tmp_path):
    log_dir = tmp_path / "run"
    proc = run_script("image_train.py", train_args(data, log_dir, total_steps=4), torchrun(2))
    assert "world size 2" in proc.stdout
    step, state = RunDir(log_dir).latest(verify=False)
    assert step == 4 and state["world_size"] == 2
    assert len(read_progress(log_dir)) == 2


def test_killed_runs_resume_from_newest_intact_checkpoint(data, tmp_path):
    """SIGKILL at random moments (mostly while saving, every step saves); the end result is
    the same as an uninterrupted run, and --resume auto never picks a partial checkpoint."""
    total = 12
    args_straight = train_args(data, tmp_path / "straight", total_steps=total, save_interval=1, dropout=0.0)
    run_script("image_train.py", args_straight)
    log_dir = tmp_path / "killed"
    args = train_args(data, log_dir, total_steps=total, save_interval=1, dropout=0.0, keep_checkpoints=3)
    cmd = [PYTHON, os.path.join(ROOT, "scripts", "image_train.py")] + [str(a) for a in args]
    rng = random.Random(0)
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait for the first checkpoint of this attempt, then kill at a random moment
        deadline = time.time() + 120
        before = RunDir(log_dir).latest(verify=False)
        while time.time() < deadline and proc.poll() is None:
            now = RunDir(log_dir).latest(verify=False)
            if now is not None and now[0] != (before[0] if before else None):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        found = RunDir(log_dir).latest(verify=False)
        assert found is not None
        step, state = found
        for name in state["files"]:  # every file of the chosen checkpoint loads
            torch.load(log_dir / name, weights_only=True)
        if step == total:
            break
    assert kills >= 2
    run_script("image_train.py", args)  # finishes the run, or finds it finished
    # Leftovers of the kills are cleaned up: temp files of interrupted saves, and the rows
    # logged after the checkpoint a kill went back to.
    assert not [n for n in os.listdir(log_dir) if ".tmp" in n]
    steps = [int(float(r["step"])) for r in read_progress(log_dir)]
    assert steps == sorted(set(steps)), steps
    assert_identical(
        load_checkpoint_files(tmp_path / "straight", total), load_checkpoint_files(log_dir, total)
    )
    states = [n for n in os.listdir(log_dir) if ckpt.STATE_PATTERN.match(n)]
    # --keep_checkpoints 3, plus at most one left by a kill between a save and its pruning
    assert len(states) <= 4


def test_partial_checkpoints_are_never_picked(data, tmp_path):
    """Leftovers of a crash while saving: temp files, a checkpoint without its state file,
    a state file whose files are truncated. Resume picks the newest intact one."""
    log_dir = tmp_path / "run"
    run_script("image_train.py", train_args(data, log_dir, total_steps=4, save_interval=2))
    # step 6: files written, state file never renamed into place
    for name in (ckpt.model_name(4), ckpt.opt_name(4)):
        data_bytes = (log_dir / name).read_bytes()
        (log_dir / name.replace("000004", "000006")).write_bytes(data_bytes)
    (log_dir / (ckpt.state_name(6) + ".tmp123")).write_bytes(b"partial")
    # step 8: a state file whose model file was cut short
    state = torch.load(log_dir / ckpt.state_name(4), weights_only=True)
    state["step"] = 8
    state["files"] = {n.replace("000004", "000008"): s for n, s in state["files"].items()}
    for n in state["files"]:
        (log_dir / n).write_bytes((log_dir / n.replace("000008", "000004")).read_bytes())
    model8 = log_dir / ckpt.model_name(8)
    model8.write_bytes(model8.read_bytes()[:100])
    torch.save(state, log_dir / ckpt.state_name(8))
    assert RunDir(log_dir).latest(verify=False)[0] == 4
    proc = run_script("image_train.py", train_args(data, log_dir, total_steps=6, save_interval=2))
    assert "resumed from step 4" in proc.stdout


@pytest.mark.parametrize("hold_beta1", [False, True])
def test_md_lrc_clts_schedules_logged_every_step(data, tmp_path, hold_beta1):
    """progress.csv rows (--log_interval 1) hold the beta1 / lr / lambda of that step's update;
    with --md_hold_beta1 the lr follows the same curve while beta1 stays at 0.9."""
    log_dir = tmp_path / "run"
    k_total, lr = 10, 2e-4
    run_script(
        "image_train.py",
        train_args(
            data, log_dir, total_steps=k_total, log_interval=1, lr=lr, md_beta_init=0.9, md_beta_min=0.5,
            momentum_decay=True, lr_compensation=True, schedule_sampler="clts", clts_target_steps=4,
            clts_lambda_max=0.8, md_hold_beta1=hold_beta1,
        ),
    )
    rows = read_progress(log_dir)
    assert len(rows) == k_total
    for row in rows:
        k = int(row["step"]) - 1  # the row after update k
        r = 1 - k / k_total
        beta = max(0.5, 0.9 * r / (0.1 + 0.9 * r))
        assert float(row["beta1"]) == (0.9 if hold_beta1 else pytest.approx(beta, rel=1e-12))
        assert float(row["lr"]) == pytest.approx(lr * 0.1 / (1 - beta), rel=1e-12)
        assert float(row["clts_lambda"]) == pytest.approx(0.8 * min(k / 4, 1.0), rel=1e-12)


def test_without_md_beta_and_lr_stay(data, tmp_path):
    log_dir = tmp_path / "run"
    run_script("image_train.py", train_args(data, log_dir, total_steps=3, log_interval=1, lr_compensation=True))
    for row in read_progress(log_dir):
        assert float(row["beta1"]) == 0.9
        assert float(row["lr"]) == 1e-4


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"momentum_decay": True}, "--total_steps"),
        ({"momentum_decay": True, "total_steps": 5, "md_beta_min": 0.95}, "--md_beta_min"),
        ({"md_hold_beta1": True, "momentum_decay": True, "total_steps": 5}, "--md_hold_beta1"),
        ({"schedule_sampler": "clts", "clts_mu": 1.5, "total_steps": 5}, "clts_mu"),
        ({"schedule_sampler": "clts", "clts_sigma": 0.0, "total_steps": 5}, "clts_sigma"),
        ({"schedule_sampler": "nope", "total_steps": 5}, "schedule_sampler"),
        ({"precision": "fp8", "total_steps": 5}, "--precision"),
        ({"bogus_flag": 1}, "unrecognized arguments: --bogus_flag"),
    ],
)
def test_bad_options_fail_clearly(data, tmp_path, extra, message):
    proc = run_script("image_train.py", train_args(data, tmp_path / "run", **extra), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path).glob("run/model*.pt"))


def test_bad_data_fails_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script("image_train.py", train_args(empty, tmp_path / "run", total_steps=2), check=False)
    assert proc.returncode != 0 and str(empty) in proc.stderr
    missing = tmp_path / "missing"
    proc = run_script("image_train.py", train_args(missing, tmp_path / "run", total_steps=2), check=False)
    assert proc.returncode != 0 and str(missing) in proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    make_png = [PYTHON, "-c", "from PIL import Image; Image.new('RGB', (8, 8), (9, 9, 9)).save('%s')"]
    for name in ("a_0.png", "b_1.png"):
        subprocess.run([make_png[0], make_png[1], make_png[2] % (broken / name)], check=True)
    (broken / "c_2.png").write_bytes((broken / "a_0.png").read_bytes()[:30])
    proc = run_script("image_train.py", train_args(broken, tmp_path / "run", total_steps=2), check=False)
    assert proc.returncode != 0 and "c_2.png" in proc.stderr


def test_resume_with_other_architecture_lists_keys(data, tmp_path):
    log_dir = tmp_path / "run"
    run_script("image_train.py", train_args(data, log_dir, total_steps=2))
    proc = run_script("image_train.py", train_args(data, log_dir, total_steps=4, num_channels=64), check=False)
    assert proc.returncode != 0
    assert "shape mismatches" in proc.stderr and "input_blocks.0.0.weight" in proc.stderr
    # the original's flag, pointing at a model file from another log dir
    other = tmp_path / "other"
    proc = run_script(
        "image_train.py",
        train_args(data, other, total_steps=4, num_channels=64, resume_checkpoint=log_dir / ckpt.model_name(2)),
        check=False,
    )
    assert proc.returncode != 0
    assert "shape mismatches" in proc.stderr and "input_blocks.0.0.weight" in proc.stderr
    assert not list(other.glob("model*.pt"))


def test_config_round_trip(data, tmp_path):
    """The saved effective config, passed back with --config, gives the same run."""
    first = tmp_path / "first"
    run_script("image_train.py", train_args(data, first, total_steps=3, **ALL_METHODS))
    import json

    cfg = json.loads((first / "config.json").read_text())
    # Where and how the run started is not part of it: reusing the file starts a new run.
    assert not {"log_dir", "resume", "resume_checkpoint", "stop_at", "dry_run"} & set(cfg)
    run_script("image_train.py", ["--config", first / "config.json", "--log_dir", tmp_path / "second"])
    assert_identical(load_checkpoint_files(first, 3), load_checkpoint_files(tmp_path / "second", 3))
    (tmp_path / "bad.json").write_text(json.dumps({"no_such_option": 1}))
    proc = run_script("image_train.py", ["--config", tmp_path / "bad.json"], check=False)
    assert proc.returncode != 0 and "no_such_option" in proc.stderr


def test_fid_during_training_and_curves(data, tmp_path):
    """--eval_interval logs a finite FID of the EMA model at the right steps; plot_curves
    draws two runs. A small TorchScript feature network stands in for Inception here
    (tests/test_fid.py runs the real one)."""
    import json
    import math

    from torch import nn

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 8, stride=8)

        def forward(self, x):
            return torch.relu(self.conv(x)).mean(dim=(2, 3))

    torch.manual_seed(0)
    net = tmp_path / "features.pt"
    torch.jit.script(Features().eval()).save(str(net))
    ref = tmp_path / "ref.npz"
    run_script("fid.py", ["ref", "--source", data, "--out", ref, "--inception", net, "--device", "cpu"])
    runs = []
    for name in ("a", "b"):
        log_dir = tmp_path / name
        run_script(
            "image_train.py",
            train_args(
                data, log_dir, total_steps=4, eval_interval=2, eval_num_samples=6, eval_batch_size=4,
                eval_respacing="ddim4", eval_ref_stats=ref, inception=net, seed=len(runs),
            ),
        )
        rows = read_progress(log_dir)
        fids = {int(r["step"]): float(r["fid"]) for r in rows if r.get("fid")}
        assert sorted(fids) == [2, 4] and all(math.isfinite(v) for v in fids.values())
        runs.append(str(log_dir))
    out = tmp_path / "curves.png"
    run_script("plot_curves.py", runs + ["--out", out])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_none_refuses_a_log_dir_with_checkpoints(data, tmp_path):
    log_dir = tmp_path / "run"
    run_script("image_train.py", train_args(data, log_dir, total_steps=2))
    before = sorted(os.listdir(log_dir))
    proc = run_script("image_train.py", train_args(data, log_dir, total_steps=4, resume="none"), check=False)
    assert proc.returncode == 2
    assert "--resume none" in proc.stderr and "step 2" in proc.stderr and "--resume auto" in proc.stderr
    assert sorted(os.listdir(log_dir)) == before


def test_resume_notes_changed_options_and_stop_at_behind(data, tmp_path):
    log_dir = tmp_path / "run"
    run_script("image_train.py", train_args(data, log_dir, total_steps=6, stop_at=2))
    proc = run_script("image_train.py", train_args(data, log_dir, total_steps=6, stop_at=4, lr=5e-4))
    assert "options differ from the checkpoint's run" in proc.stdout and "lr 0.0001 -> 0.0005" in proc.stdout
    proc = run_script("image_train.py", train_args(data, log_dir, total_steps=6, stop_at=3, lr=5e-4))
    assert "nothing to train: the run is at step 4" in proc.stdout


def test_weights_without_their_training_state_start_a_fine_tune(data, tmp_path):
    """As the original: a weights file without a step in its name starts at step 0; missing
    EMA files start from the weights, a missing optimizer file starts fresh."""
    source = tmp_path / "source"
    run_script("image_train.py", train_args(data, source, total_steps=2))
    released = tmp_path / "released"
    released.mkdir()
    (released / "pretrained.pt").write_bytes((source / ckpt.model_name(2)).read_bytes())
    tune = tmp_path / "tune"
    proc = run_script("image_train.py", train_args(data, tune, total_steps=1, resume_checkpoint=released / "pretrained.pt"))
    assert "no step in its name" in proc.stdout and "starts afresh" in proc.stdout
    weights = torch.load(released / "pretrained.pt", weights_only=True)
    tuned = load_checkpoint_files(tune, 1)
    for rate in (0.9, 0.99):  # the EMA started from the given weights: one lerp step away
        ema = tuned[ckpt.ema_name(rate, 1)]
        model = tuned[ckpt.model_name(1)]
        for key, value in weights.items():
            torch.testing.assert_close(ema[key], rate * value + (1 - rate) * model[key], rtol=1e-5, atol=1e-6)
    # A model file whose optimizer file is gone continues at its step with a fresh AdamW.
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in (ckpt.model_name(2), ckpt.ema_name(0.9, 2), ckpt.ema_name(0.99, 2)):
        (partial / name).write_bytes((source / name).read_bytes())
    proc = run_script("image_train.py", train_args(data, tmp_path / "cont", total_steps=3, resume=partial / ckpt.model_name(2)))
    assert "optimizer file opt000002.pt" in proc.stdout
    assert RunDir(tmp_path / "cont").latest(verify=False)[0] == 3


def test_log_dir_that_cannot_hold_a_run(data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_script("image_train.py", train_args(data, afile, total_steps=1), check=False)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and str(afile) in proc.stderr
    proc = run_script("image_train.py", train_args(data, afile / "sub", total_steps=1), check=False)
    assert proc.returncode == 2 and "cannot create it" in proc.stderr


def test_class_conditional_run_records_its_classes(tmp_path):
    labelled = make_npz(tmp_path / "labelled.npz", n=12, classes=3)
    log_dir = tmp_path / "run"
    run_script("image_train.py", train_args(labelled, log_dir, total_steps=1, class_cond=True))
    import json

    cfg = json.loads((log_dir / "config.json").read_text())
    assert cfg["data_num_classes"] == 3 and cfg["class_cond"] is True
    # The record is skipped when the file is read back as --config.
    run_script("image_train.py", ["--config", log_dir / "config.json", "--log_dir", tmp_path / "again", "--dry_run", "True"])
