"""
One writer per run directory: a lock file that a training run holds for its whole life.

Two runs writing into one --log_dir corrupt it silently (one resumes the other's live
checkpoint, both write the same files and interleave their logged rows). The lock is
`LOG_DIR/run.lock`, holding the holder's host, pid, start time and command, and what makes
its process unique on this machine: the boot id and the process's start time in clock ticks
since boot (Linux /proc). A lock whose process is gone is taken over with a note; one held by
a live process, or by another host (whose processes cannot be seen from here), refuses the new
run with a message naming the holder. Rank 0 takes it for all ranks (run_dir.py).

Gone means: no process has the pid, or the one that has it is another process: it started at
another time (the pid was reused, or a restarted container's first process is pid 1 again),
or the machine has rebooted since (another boot id). Where /proc is missing (macOS), only the
pid is checked. A lock file that is not a record (empty, not JSON, a pid of 0, -1 or beyond
any pid) is taken for one that is being written, read again after a second, and then taken
over as left by a crash; a folder named run.lock is refused with how to clear it.

Why exactly one of several starts gets the lock. Every start decides under an exclusive
flock of `LOG_DIR/run.lock.guard` (a file that stays; removing it would let two starts lock
two different files): it reads run.lock, and either refuses (a live holder), or removes a
stale one, and creates its own with O_EXCL, writes it completely and only then lets the
guard go. So the starts decide one after another, each seeing the lock its predecessor left:
of starts racing over a stale lock the first takes it over and every later one finds a live
holder. The kernel drops a flock when its process dies, so a start killed while deciding
leaves no guard behind (a lock it left half-written is taken over as above). Where the file
system has no flock (some network file systems), starts decide unguarded: O_EXCL still gives
a free lock to exactly one of them, but two taking over one stale lock at the same instant
may both succeed.
"""

import atexit
import datetime
import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = "run.lock"
GUARD_SUFFIX = ".guard"
MAX_PID = 2**31 - 1  # no system gives larger pids (Linux: at most 2**22)


class RunLockError(ValueError):
    pass


def _boot_id():
    """This boot's id (Linux), or None where there is none to read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _start_ticks(pid):
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: count from its end
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _alive(holder):
    """Whether the lock's process still runs: its pid exists and, where /proc tells, it is the
    same process (same boot, same start time)."""
    pid = holder["pid"]
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    ticks = _start_ticks(pid)
    return holder.get("start_ticks") is None or ticks is None or ticks == holder["start_ticks"]


def _read(path):
    """The holder's record, or None when it is not one (empty, half-written, not JSON, no
    usable pid)."""
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    pid = info.get("pid") if isinstance(info, dict) else None
    return info if type(pid) is int and 0 < pid <= MAX_PID else None


def _describe(info):
    return f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}: {info.get('command', '?')}"


def _guard(path):
    """An exclusive flock on `path` + ".guard" (its descriptor; closing it lets go), or None
    where the file system has no flock."""
    guard = path + GUARD_SUFFIX
    try:
        fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        raise RunLockError(f"cannot open the lock guard {guard}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # ENOLCK, EOPNOTSUPP, ...: decide unguarded (see the module's docstring)
        os.close(fd)
        return None
    return fd


def acquire(log_dir, log=print):
    """Take the lock of `log_dir` for this process (released at exit); RunLockError if held."""
    path = os.path.join(log_dir, LOCK_NAME)
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "boot_id": _boot_id(),
        "start_ticks": _start_ticks(os.getpid()),
    }
    guard = _guard(path)
    try:
        for _ in range(3):
            if _create(path, me):
                atexit.register(release, path)
                return path
            _take_over_if_stale(path, log_dir, me["host"], log)
    finally:
        if guard is not None:
            os.close(guard)
    raise RunLockError(f"--log_dir {log_dir}: could not take {path} (other runs keep starting there)")


def _create(path, me):
    """Create the lock holding `me`: False when one exists; a failed write leaves none."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        raise RunLockError(f"cannot create the lock {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: no empty lock may stay behind
        try:
            os.remove(path)
        except OSError:
            pass
        raise RunLockError(f"cannot write the lock {path}: {os.strerror(e.errno) if e.errno else e}") from None
    return True


def _take_over_if_stale(path, log_dir, host, log):
    """Remove the lock at `path` when its process is gone; RunLockError when it lives."""
    if os.path.isdir(path):
        raise RunLockError(f"{path} is a folder, not a run's lock file: remove it (rmdir {path}) and start again")
    holder = _read(path)
    if holder is None and os.path.exists(path):  # being written this instant, or left by a crash
        time.sleep(1.0)
        holder = _read(path)
    if holder is not None and (holder.get("host") != host or _alive(holder)):
        gone = "" if holder.get("host") == host else (
            f"; its host is not this one, so whether it still runs cannot be seen from here: if it is "
            f"gone, remove {path}")
        raise RunLockError(
            f"--log_dir {log_dir} is in use by another run ({_describe(holder)}){gone}. Wait for it to "
            "finish, or choose another --log_dir"
        )
    what = _describe(holder) if holder else "a lock file that is no run's record"
    log(f"note: taking over the lock of a run that is gone ({what})")
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise RunLockError(f"cannot remove the stale lock {path}: {e.strerror}") from None


def release(path):
    """Remove the lock if this process holds it (never another run's)."""
    holder = _read(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
