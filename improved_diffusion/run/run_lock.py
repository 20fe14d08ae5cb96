"""
One writer per run directory: a lock file that a training run holds for its whole life.

Two runs writing into one --log_dir corrupt it silently (one resumes the other's live
checkpoint, both write the same files and interleave their logged rows). The lock is
`LOG_DIR/run.lock`, created with O_EXCL (atomic, so of two runs started at the same moment
exactly one gets it), holding the holder's host, pid, start time and command. A lock whose
process is gone (a killed run, on this host) is taken over with a note; one held by a live
process, or by another host (whose processes cannot be seen from here), refuses the new run
with a message naming the holder. Rank 0 takes it for all ranks.
"""

import atexit
import datetime
import json
import os
import socket
import sys
import time

LOCK_NAME = "run.lock"


class RunLockError(ValueError):
    pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read(path):
    """The holder's record, or None when the file is empty or not JSON (a half-written lock)."""
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _describe(info):
    return f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}: {info.get('command', '?')}"


def acquire(log_dir, log=print):
    """Take the lock of `log_dir` for this process (released at exit); RunLockError if held."""
    path = os.path.join(log_dir, LOCK_NAME)
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # being written this instant, or left empty by a crash
                time.sleep(1.0)
                holder = _read(path)
            if holder is not None and (holder.get("host") != me["host"] or _alive(holder["pid"])):
                gone = "" if holder.get("host") == me["host"] else (
                    f"; its host is not this one, so whether it still runs cannot be seen from here: if it is "
                    f"gone, remove {path}")
                raise RunLockError(
                    f"--log_dir {log_dir} is in use by another run ({_describe(holder)}){gone}. Wait for it to "
                    "finish, or choose another --log_dir"
                )
            what = _describe(holder) if holder else "an empty lock file"
            log(f"note: taking over the lock of a run that is gone ({what})")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        atexit.register(release, path)
        return path
    raise RunLockError(f"--log_dir {log_dir}: could not take {path} (other runs keep starting there)")


def release(path):
    """Remove the lock if this process holds it (never another run's)."""
    holder = _read(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
