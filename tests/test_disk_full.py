"""
A full disk (issue 29): the logs, config.json, a checkpoint or the samples cannot be written.
Each ends in one `error:` line naming the file, nothing is lost, and the same command run
again once there is space continues where the run was.

The disks are real: /dev/full (every write fails with ENOSPC) for the logs, and a small tmpfs
filled to the last byte for the rest (mounting needs root; those tests are skipped without).
"""

import os
import subprocess
import time
import uuid

import numpy as np
import pytest

from improved_diffusion.evaluation.sampling import write_samples
from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.run.preemption import RunWriteError
from improved_diffusion.run.run_dir import RunDir
from test_train import assert_identical, load_checkpoint_files, train_args
from test_train_loop import make_loop
from tiny import PYTHON, ROOT, env, make_npz, run_script

ENOSPC_TEXT = os.strerror(28)  # "No space left on device"


def mounted_tmpfs(path, size):
    """A tmpfs of `size` at `path` (made), or a skip where it cannot be mounted."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {proc.stderr.strip()}")
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs at tmp_path/disk, unmounted afterwards."""
    yield mounted_tmpfs(tmp_path / "disk", "512k")
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], capture_output=True)


@pytest.fixture
def run_disk(tmp_path):
    """A 64 MiB tmpfs at tmp_path/disk: room for the tiny model's checkpoints (about 15 MiB each)."""
    yield mounted_tmpfs(tmp_path / "disk", "64m")
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], capture_output=True)


def fill(folder):
    """Write a filler file into `folder` until its file system is full; returns its path."""
    path = os.path.join(folder, f"filler-{uuid.uuid4().hex}")
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    with open(path, "ab", buffering=0) as f:  # the last bytes of a page the 4 KiB write missed
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass
    return path


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_failed_log_write_saves_the_step_then_stops_in_one_line(tmp_path):
    """progress.jsonl on /dev/full from step 4: the loop saves a checkpoint of step 4 (its disk
    has space) and stops with RunWriteError naming the logs and that checkpoint; before, the
    write raised a traceback and the steps since the last save were lost."""
    loop = make_loop(tmp_path, total_steps=3)
    loop.run_loop()
    loop.config.total_steps = 8
    loop.logger.jsonl = open("/dev/full", "w")
    with pytest.raises(RunWriteError) as err:
        loop.run_loop()
    message = str(err.value)
    assert "progress.csv / progress.jsonl" in message and ENOSPC_TEXT in message
    assert "a checkpoint of step 4 was written" in message and "\n" not in message
    assert loop.step == 4 and RunDir(str(tmp_path)).latest()[0] == 4


def test_config_and_samples_on_a_full_disk_fail_in_one_line(small_disk):
    fill(small_disk)
    with pytest.raises(ckpt.CheckpointError, match=f"config.json: {ENOSPC_TEXT}; no checkpoint yet"):
        RunDir(str(small_disk)).write_config({"lr": 1e-4})
    assert not [f for f in os.listdir(small_disk) if f.startswith("config.json")]  # no temporary file left
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ckpt.CheckpointError, match=f"samples.npz: {ENOSPC_TEXT}"):
        write_samples(str(small_disk / "samples.npz"), [images])
    assert not [f for f in os.listdir(small_disk) if f.startswith("samples")]


@pytest.mark.slow
def test_a_disk_filled_during_training_loses_nothing(tmp_path, run_disk):
    """The disk fills up while a run trains: one `error:` line (a log write or a save, whichever
    meets it first), exit 2, no stray file; freed, the same command ends bitwise where an
    uninterrupted run ends."""
    data = make_npz(tmp_path / "train.npz", n=16)
    args = train_args(data, run_disk / "run", log_interval=1, save_interval=2, keep_checkpoints=1,
                      total_steps=30, num_channels=32)
    cmd = [PYTHON, os.path.join(ROOT, "scripts", "image_train.py")] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.exists(run_disk / "run" / ckpt.state_name(4)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    filler = fill(run_disk)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ENOSPC_TEXT in errors[0] and "Traceback" not in err, err[-3000:]
    assert not [f for f in os.listdir(run_disk / "run") if ".tmp" in f]
    os.remove(filler)

    run_script("image_train.py", args)
    straight = tmp_path / "straight"
    run_script("image_train.py", train_args(data, straight, log_interval=1, save_interval=2, keep_checkpoints=1,
                                            total_steps=30, num_channels=32))
    assert_identical(load_checkpoint_files(run_disk / "run", 30), load_checkpoint_files(straight, 30))
