"""
The run lock (improved_diffusion/run/run_lock.py) in the real world: starts racing over a stale
lock, a holder whose pid now belongs to another process (a restarted container, a reused pid),
malformed lock files and a disk that fills while the lock is written.
"""

import errno
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys

import pytest

from improved_diffusion.run import run_lock
from tiny import ROOT, env


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale_record(**changes):
    return {"host": socket.gethostname(), "pid": _dead_pid(), "started": "x", "command": "y", **changes}


def _racer(dirs, start, done, results):
    """One start per folder, all racers at once (`start`); a holder stays alive until every
    racer of that folder has tried (`done`), so that a loser sees a live holder."""
    for folder in dirs:
        start.wait()
        try:
            run_lock.acquire(folder, log=lambda *a: None)
            results.put((folder, "held"))
        except run_lock.RunLockError as e:
            results.put((folder, str(e)))
        done.wait()


def test_starts_racing_over_a_stale_lock_give_exactly_one_holder(tmp_path):
    trials, racers = 60, 3
    dirs = [str(tmp_path / f"run{i}") for i in range(trials)]
    for folder in dirs:
        os.makedirs(folder)
        with open(os.path.join(folder, run_lock.LOCK_NAME), "w") as f:
            json.dump(_stale_record(), f)
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Barrier(racers), ctx.Barrier(racers), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(dirs, start, done, results)) for _ in range(racers)]
    for p in procs:
        p.start()
    outcomes = {}
    for _ in range(trials * racers):
        folder, outcome = results.get(timeout=120)
        outcomes.setdefault(folder, []).append(outcome)
    for p in procs:
        p.join(timeout=60)
    holders = [sum(o == "held" for o in outcomes[folder]) for folder in dirs]
    assert holders == [1] * trials, f"{sum(h != 1 for h in holders)} of {trials} races without exactly one holder"
    refused = [o for folder in dirs for o in outcomes[folder] if o != "held"]
    assert all("is in use by another run" in o for o in refused), refused[:3]


def _lock_holding(tmp_path, record):
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    (folder / run_lock.LOCK_NAME).write_text(record if isinstance(record, str) else json.dumps(record))
    return folder


def _me(**changes):
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": "x", "command": "y",
            "boot_id": run_lock._boot_id(), "start_ticks": run_lock._start_ticks(os.getpid()), **changes}


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="no /proc: only the pid can be checked here")
@pytest.mark.parametrize("other", [{"start_ticks": 1}, {"boot_id": "a-boot-before-a-restart"}])
def test_a_lock_of_another_process_with_a_live_pid_is_taken_over(tmp_path, other):
    """The lock names this very pid (alive), but another start time (a reused pid) or another
    boot: its process is gone."""
    folder = _lock_holding(tmp_path, _me(**other))
    said = []
    path = run_lock.acquire(str(folder), log=said.append)
    assert "taking over the lock of a run that is gone" in said[0]
    assert json.loads(open(path).read())["start_ticks"] == run_lock._start_ticks(os.getpid())
    run_lock.release(path)


def test_the_same_process_still_holds_its_lock(tmp_path):
    folder = _lock_holding(tmp_path, _me())
    with pytest.raises(run_lock.RunLockError, match=f"is in use by another run \\(pid {os.getpid()} "):
        run_lock.acquire(str(folder), log=print)


NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _namespace_works():
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(NAMESPACE + ["true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _namespace_works(), reason="unshare --pid --fork --mount-proc is not permitted here")
def test_a_restarted_container_takes_over_the_lock_of_its_previous_life(tmp_path):
    """A container's first process is pid 1: killed, and started again in a new container (a
    new pid namespace), the run finds a lock held by pid 1, which runs: itself."""
    take = ("import os, sys; from improved_diffusion.run import run_lock; "
            "run_lock.acquire(sys.argv[1]); print(os.getpid(), flush=True); os._exit(0)")  # killed: no release
    cmd = NAMESPACE + [sys.executable, "-c", take, str(tmp_path)]
    first = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and first.stdout.split() == ["1"], first.stderr
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == 1
    again = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr[-1500:]
    assert "taking over the lock of a run that is gone (pid 1 " in again.stdout


@pytest.mark.parametrize("record", [
    {"pid": 0}, {"pid": -1}, {"pid": 10**30}, {"pid": True}, [1, 2], "not json", ""])
def test_a_malformed_lock_is_taken_over_after_a_wait(tmp_path, record, monkeypatch):
    if isinstance(record, dict):
        record = {"host": socket.gethostname(), **record}
    folder = _lock_holding(tmp_path, record)
    waits = []
    monkeypatch.setattr(run_lock.time, "sleep", waits.append)
    said = []
    path = run_lock.acquire(str(folder), log=said.append)
    assert waits == [1.0]  # read again, in case it was being written
    assert said == ["note: taking over the lock of a run that is gone (a lock file that is no run's record)"]
    assert json.loads(open(path).read())["pid"] == os.getpid()
    run_lock.release(path)


def test_a_folder_named_run_lock_is_refused_in_one_line(tmp_path):
    (tmp_path / run_lock.LOCK_NAME).mkdir()
    with pytest.raises(run_lock.RunLockError) as err:
        run_lock.acquire(str(tmp_path), log=print)
    text = str(err.value)
    assert "\n" not in text and "is a folder" in text and f"rmdir {tmp_path / run_lock.LOCK_NAME}" in text


def test_a_full_disk_while_writing_the_lock_leaves_no_lock(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_lock.os, "fsync", full)
    with pytest.raises(run_lock.RunLockError) as err:
        run_lock.acquire(str(tmp_path), log=print)
    lock = tmp_path / run_lock.LOCK_NAME
    assert str(err.value) == f"cannot write the lock {lock}: No space left on device"
    assert not lock.exists()
