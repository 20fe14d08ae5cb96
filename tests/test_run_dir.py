"""
A run directory that cannot be corrupted: one writer at a time (the run lock), checkpoints
verified by checksums (fallback to the newest intact one), one clear line for a full disk,
a refused unsafe file, and a diverged run that needs an explicit choice to continue.
"""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.run import run_dir, run_lock
from improved_diffusion.run.run_dir import RunDir
from improved_diffusion.train_util import NonFiniteError, TrainLoop
from test_train import assert_identical, load_checkpoint_files, read_progress, train_args
from test_train_loop import NaNAt, make_loop
from tiny import PYTHON, ROOT, env, make_npz, mpiexec, run_script


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("data") / "train.npz", n=24)


# ---------------------------------------------------------------------------------------
# One writer per run directory
# ---------------------------------------------------------------------------------------


def test_two_runs_started_together_into_one_log_dir(data, tmp_path):
    """Exactly one runs; the other exits with the lock message naming the holder; the
    directory holds one consistent run (its options, its rows once each)."""
    log_dir = tmp_path / "run"
    procs = []
    for lr in ("0.001", "0.002"):
        args = train_args(data, log_dir, total_steps=6, save_interval=3, lr=lr)
        cmd = [PYTHON, os.path.join(ROOT, "scripts", "image_train.py")] + [str(a) for a in args]
        procs.append(subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2][-1500:] for r in results]
    winner = 0 if results[0][0] == 0 else 1
    loser_err = results[1 - winner][2]
    assert "is in use by another run" in loser_err and f"pid {procs[winner].pid}" in loser_err
    assert loser_err.count("\n") <= 3  # one error line (plus the debug hint)
    saved = json.loads((log_dir / "config.json").read_text())
    assert saved["lr"] == (0.001, 0.002)[winner]
    steps = [int(float(r["step"])) for r in read_progress(log_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert not (log_dir / run_lock.LOCK_NAME).exists()  # released at the end


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(data, tmp_path):
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    lock = log_dir / run_lock.LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "x", "command": "y"}))
    proc = run_script("image_train.py", train_args(data, log_dir, total_steps=2, save_interval=2))
    assert "taking over the lock of a run that is gone" in proc.stdout + proc.stderr
    assert not lock.exists()
    # A live holder (this test process) refuses, on every rank of an mpiexec run.
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "command": "t"}))
    for launcher in ((), mpiexec(2)):
        proc = run_script("image_train.py", train_args(data, log_dir, total_steps=4, save_interval=2),
                          launcher=launcher, check=False)
        assert proc.returncode != 0 and f"pid {os.getpid()}" in proc.stderr, proc.stderr[-2000:]
    assert RunDir(log_dir).latest(verify=False)[0] == 2  # untouched
    # Another host's lock cannot be checked from here: refused, with how to clear it.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "now", "command": "t"}))
    proc = run_script("image_train.py", train_args(data, log_dir, total_steps=4), check=False)
    assert proc.returncode == 2 and "if it is gone, remove" in proc.stderr


def test_the_lock_under_mpiexec_is_taken_once_and_released(data, tmp_path):
    log_dir = tmp_path / "run"
    run_script("image_train.py", train_args(data, log_dir, total_steps=2, save_interval=2), launcher=mpiexec(2))
    assert RunDir(log_dir).latest(verify=False)[0] == 2
    assert not (log_dir / run_lock.LOCK_NAME).exists()


def test_a_failed_start_leaves_no_files_in_a_new_log_dir(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    log_dir = tmp_path / "new"
    proc = run_script("image_train.py", ["--data_dir", bad, "--log_dir", log_dir, "--image_size", "8"], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
    assert not log_dir.exists()


# ---------------------------------------------------------------------------------------
# Verified checkpoints
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(data, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("ckpt") / "run"
    run_script("image_train.py", train_args(data, log_dir, total_steps=4, save_interval=2))
    return log_dir


def _damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    elif how == "zeroed":
        raw = bytearray(len(raw))
    else:  # one flipped bit in the tensor data near the end (loads silently without checksums)
        raw[len(raw) - 300] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "zeroed", "bitflip"])
@pytest.mark.parametrize("kind", ["model", "ema", "opt", "state"])
def test_damaged_files_are_found_and_skipped(two_checkpoints, tmp_path, capsys, kind, how):
    log_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, log_dir)
    name = {"model": ckpt.model_name(4), "ema": ckpt.ema_name(0.9, 4), "opt": ckpt.opt_name(4),
            "state": ckpt.state_name(4)}[kind]
    _damage(log_dir / name, how)
    capsys.readouterr()
    step, _ = RunDir(log_dir).latest()
    assert step == 2
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and said[0].startswith(f"checkpoint 000004 is damaged ({name}") and "resuming from 000002" in said[0]


def test_resume_auto_falls_back_and_resume_path_refuses_a_damaged_file(data, two_checkpoints, tmp_path):
    log_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, log_dir)
    _damage(log_dir / ckpt.opt_name(4), "bitflip")
    proc = run_script("image_train.py", ["--resume", log_dir / ckpt.model_name(4)] +
                      train_args(data, tmp_path / "other", total_steps=6), check=False)
    assert proc.returncode == 2
    assert "checkpoint 000004 is damaged (opt000004.pt: checksum mismatch)" in proc.stderr
    proc = run_script("image_train.py", train_args(data, log_dir, total_steps=4, save_interval=2))
    assert "checkpoint 000004 is damaged (opt000004.pt: checksum mismatch); resuming from 000002" in proc.stdout
    # Redone from step 2, the run ends where the undamaged one ended.
    assert_identical(load_checkpoint_files(two_checkpoints, 4), load_checkpoint_files(log_dir, 4))


def test_an_unsafe_file_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "model000001.pt"
    torch.save({"w": torch.zeros(2), "x": socket.socket}, path)  # a global that weights_only refuses
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.read_file(str(path), "model")
    text = str(err.value)
    assert "refused" in text and str(path) in text and "weights_only=False" not in text


# ---------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------


def test_disk_full_during_a_save_is_one_line_and_nothing_is_lost(tmp_path, monkeypatch):
    """An injected ENOSPC at the second checkpoint's optimizer file: one message naming the
    cause, the size needed and the newest intact checkpoint; no stray files; a rerun
    continues and ends where an uninterrupted run ends."""
    make_loop(tmp_path / "straight", save_interval=2, total_steps=4).run_loop()
    loop = make_loop(tmp_path / "full", save_interval=2, total_steps=4)
    real_save = torch.save

    def full_disk_at_step_4(obj, f, *a, **k):
        if ckpt.opt_name(4) in str(getattr(f, "name", "")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk_at_step_4)
    with pytest.raises(ckpt.CheckpointError) as err:
        loop.run_loop()
    text = str(err.value)
    assert "\n" not in text and "No space left on device" in text and ckpt.opt_name(4) in text
    assert "MiB" in text and "the newest intact checkpoint is 000002" in text
    files = os.listdir(tmp_path / "full")
    assert not [n for n in files if ".tmp" in n] and ckpt.model_name(4) not in files
    monkeypatch.setattr(torch, "save", real_save)

    again = make_loop(tmp_path / "full", save_interval=2, total_steps=4, resume="auto")
    assert again.step == 2
    again.run_loop()
    assert_identical(load_checkpoint_files_one_ema(tmp_path / "straight"), load_checkpoint_files_one_ema(tmp_path / "full"))


def load_checkpoint_files_one_ema(log_dir, step=4):
    names = [ckpt.model_name(step), ckpt.ema_name(0.9999, step), ckpt.opt_name(step)]
    return {n: torch.load(os.path.join(log_dir, n), weights_only=True) for n in names}


# ---------------------------------------------------------------------------------------
# A diverged run
# ---------------------------------------------------------------------------------------


def test_a_diverged_run_names_its_checkpoint_and_needs_an_explicit_choice(tmp_path):
    log_dir = tmp_path / "run"
    loop = make_loop(log_dir, max_nonfinite_steps=3, log_interval=1, save_interval=2, total_steps=20)
    loop.model.register_forward_hook(NaNAt(set(range(6, 100))))  # finite steps 0-4, then NaN
    with pytest.raises(NonFiniteError) as err:
        loop.run_loop()
    text = str(err.value)
    assert "newest checkpoint from before the streak is 000004" in text
    assert f"--resume {log_dir / ckpt.model_name(4)}" in text and "--lr LOWER_LR" in text
    assert json.loads((log_dir / run_dir.DIVERGED).read_text())["checkpoint_before_streak"] == 4
    written = RunDir(log_dir).steps()
    assert max(written) > 4  # checkpoints were written during the streak

    with pytest.raises(ckpt.CheckpointError, match="diverged"):
        make_loop(log_dir, resume="auto")
    chosen = make_loop(log_dir, resume=str(log_dir / ckpt.model_name(4)))
    assert chosen.step == 4 and not (log_dir / run_dir.DIVERGED).exists()
    assert RunDir(log_dir).steps() == [4, 2]  # the streak's checkpoints are set aside
    assert sorted(RunDir(log_dir / run_dir.SUPERSEDED).steps()) == sorted(s for s in written if s > 4)


def test_a_run_that_diverges_before_any_checkpoint_says_so(tmp_path):
    loop = make_loop(tmp_path / "run", max_nonfinite_steps=3)
    loop.model.register_forward_hook(NaNAt({"all"}))
    loop.config.total_steps = 10
    with pytest.raises(NonFiniteError, match="No checkpoint from before the streak exists"):
        loop.run_loop()


