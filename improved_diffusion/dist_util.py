"""
One process group, whoever launched us: `mpiexec`, `torchrun`, `srun`, or a plain `python`.

Everything here works without initialisation (world size 1), and every function that runs
a collective must be called by every rank: no rank-0-only branches around collectives.

Which launcher started us is read from the environment, first match wins:

1. torchrun (RANK and WORLD_SIZE set): `env://`, also across nodes (`--nnodes`, a rendezvous
   endpoint), and under `srun` when srun starts one torchrun per node.
2. mpiexec (an MPI size variable above 1): rank and size from MPI.COMM_WORLD. MPI wins over
   SLURM's variables because `mpiexec` inside a batch script (or Open MPI's `mpirun`, which
   starts its daemons with srun) leaves the batch shell's or the daemon's SLURM_PROCID in
   every rank's environment, where it is wrong.
3. srun (SLURM_PROCID and a step id set): rank SLURM_PROCID, world SLURM_NTASKS, local rank
   SLURM_LOCALID; rank 0's host is the first node of the step's node list and the port
   comes from the job id, MASTER_ADDR / MASTER_PORT override both. A batch script's own
   shell has SLURM_PROCID=0 but no step id: a plain `python` there (or in `salloc`, or in a
   one-task step) runs as one process.
4. anything else: one process, no process group (all helpers below still work).
"""

import atexit
import datetime
import io
import itertools
import os
import re
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

# Environment variables that MPI launchers set for their children.
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
# srun sets a step id for every task it starts; sbatch's batch shell has none.
_SLURM_STEP_VARS = ("SLURM_STEP_ID", "SLURM_STEPID")
# Where rank 0 runs: the first node of the step's node list (srun sets all three).
_SLURM_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
# The rendezvous port of a SLURM job: 15000 + job id mod 15000, below Linux's ephemeral ports.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 15000, 15000
# The process group's --dist_timeout (seconds), once set up; the gloo group of cpu_group().
_TIMEOUT = None
_CPU_GROUP = None


def _mpi_world_size(environ=None):
    environ = os.environ if environ is None else environ
    for var in _MPI_SIZE_VARS:
        if var in environ:
            return int(environ[var])
    return 1


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def detect_launcher(environ=None):
    """
    'torchrun', 'mpiexec', 'srun' or None (a plain python), by the precedence above.
    SLURM_PROCID other than 0 without a step id is neither srun nor a batch shell: ValueError.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return "torchrun"
    if _mpi_world_size(environ) > 1:
        return "mpiexec"
    if "SLURM_PROCID" in environ:
        if any(var in environ for var in _SLURM_STEP_VARS):
            return "srun"
        if environ["SLURM_PROCID"].strip() != "0":  # a batch shell is always task 0
            raise ValueError(
                f"SLURM_PROCID={environ['SLURM_PROCID']!r} but SLURM_STEP_ID is not set: srun sets both for "
                "every task (set SLURM_STEP_ID too when simulating srun)"
            )
    return None


# ---------------------------------------------------------------------------- SLURM


def expand_hostlist(text):
    """
    The host names of a SLURM host list, in SLURM's order:
    `expand_hostlist("gpu[01-03,07],cpu5")` is `['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']`.

    Commas separate names outside brackets; a bracket holds numbers and ranges `lo-hi`
    (zero padding kept: `[08-10]` gives 08, 09, 10); several brackets in one name expand to
    every combination, the first varying slowest (`a[1-2]-b[3-4]`: a1-b3, a1-b4, a2-b3, a2-b4).
    ValueError says what does not parse.
    """
    if not text or not text.strip():
        raise ValueError("empty host list")
    hosts = []
    for name in _split_outside_brackets(text.strip()):
        parts = re.split(r"\[([^\[\]]*)\]", name)  # literal, group, literal, ..., literal
        choices = [_expand_group(part) if i % 2 else [part] for i, part in enumerate(parts)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _split_outside_brackets(text):
    names, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        if ch == "[":
            if depth:
                raise ValueError(f"nested '[' at position {i}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ValueError(f"']' without '[' at position {i}")
            depth = 0
        elif ch == "," and not depth:
            name = text[start:i].strip()
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"bad host name {name!r}")
            names.append(name)
            start = i + 1
    if depth:
        raise ValueError("'[' is never closed")
    return names


def _expand_group(group):
    out = []
    for piece in group.split(","):
        match = re.fullmatch(r"\s*([0-9]+)(?:-([0-9]+))?\s*", piece)
        if not match:
            raise ValueError(f"[{group}]: {piece!r} is not a number or a range lo-hi")
        lo, hi = match.group(1), match.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"[{group}]: range {piece.strip()} runs backwards")
        out.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
    return out


@dataclass(frozen=True)
class SlurmTask:
    """Where an srun task stands in its job step (read by `slurm_task`)."""

    rank: int
    world_size: int
    local_rank: int
    job_id: Optional[str]
    host: Optional[str]  # rank 0's host and port; None for a one-task step
    port: Optional[int]


def _int_var(environ, name, low, why):
    text = environ.get(name)
    if text is None or not text.strip():
        raise ValueError(f"{name} is not set, but {why}")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer ({why})") from None
    if value < low:
        raise ValueError(f"{name}={text!r} must be >= {low} ({why})")
    return value


def slurm_task(environ=None):
    """
    This srun task's rank, world and rendezvous, from the variables srun sets: SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID; rank 0's host is MASTER_ADDR, else the first node of
    SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / SLURM_NODELIST; the port is MASTER_PORT, else
    15000 + SLURM_JOB_ID mod 15000. A missing or malformed variable is a ValueError naming it.
    """
    environ = os.environ if environ is None else environ
    why = "SLURM_PROCID and a step id are set, so this looks like an srun task"
    rank = _int_var(environ, "SLURM_PROCID", 0, why)
    world = _int_var(environ, "SLURM_NTASKS", 1, why)
    if rank >= world:
        raise ValueError(f"SLURM_PROCID={rank} is not below SLURM_NTASKS={world}")
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if world == 1:
        local_rank = _int_var(environ, "SLURM_LOCALID", 0, why) if "SLURM_LOCALID" in environ else 0
        return SlurmTask(rank, 1, local_rank, job_id, None, None)
    why = f"srun started {world} tasks (SLURM_NTASKS)"
    local_rank = _int_var(environ, "SLURM_LOCALID", 0, why)
    return SlurmTask(rank, world, local_rank, job_id, _slurm_master_addr(environ, why), _slurm_master_port(environ, why))


def _slurm_master_addr(environ, why):
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    for var in _SLURM_NODELIST_VARS:
        if environ.get(var):
            try:
                return expand_hostlist(environ[var])[0]
            except ValueError as e:
                raise ValueError(
                    f"{var}={environ[var]!r} is not a SLURM host list ({e}); set MASTER_ADDR to rank 0's host"
                ) from None
    raise ValueError(f"SLURM_JOB_NODELIST is not set, but {why}: set it or MASTER_ADDR (rank 0's host)")


def _slurm_master_port(environ, why):
    if environ.get("MASTER_PORT"):
        port = _int_var(environ, "MASTER_PORT", 1, "the rendezvous port")
        if port > 65535:
            raise ValueError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
        return port
    var = "SLURM_JOBID" if "SLURM_JOBID" in environ and "SLURM_JOB_ID" not in environ else "SLURM_JOB_ID"
    job_id = _int_var(environ, var, 0, f"{why} and MASTER_PORT is not set (the port comes from the job id)")
    return _SLURM_PORT_BASE + job_id % _SLURM_PORT_SPAN


# ---------------------------------------------------------------------------- setup


def setup_dist(backend=None, timeout=None):
    """
    Join the process group the launcher set up, and bind this rank to its GPU; rank 0 says
    which launcher it found and the world it sees (one line; nothing for a plain python
    outside a SLURM job).

    `timeout` (seconds, --dist_timeout; None: torch's default) bounds the wait for all ranks
    to join and every collective: a frozen or dead rank ends the job with an error that
    `timeout_message` turns into one line (gloo raises it in the waiting call; NCCL's
    watchdog aborts the process, naming the collective).

    torchrun: read RANK / WORLD_SIZE / MASTER_ADDR from the environment.
    mpiexec: take rank and size from MPI.COMM_WORLD, the address and a free port from rank 0.
    srun: see `slurm_task`. Anything else: one process, no process group.
    """
    global _TIMEOUT
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    _TIMEOUT = timeout
    wait = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    launcher = detect_launcher()
    if launcher == "torchrun":
        if int(os.environ["WORLD_SIZE"]) > 1:
            _bind_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend, init_method="env://", **wait)
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        _announce("torchrun (RANK, WORLD_SIZE)", backend, where)
    elif launcher == "mpiexec":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        _bind_device(local_rank)
        hosts = comm.allgather(socket.gethostname())
        if comm.Get_rank() == 0:
            # One node: loopback always works; several: rank 0's routable address.
            host = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
            address = (host, _free_port())
        else:
            address = None
        host, port = comm.bcast(address, root=0)
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{host}:{port}",
            rank=comm.Get_rank(),
            world_size=comm.Get_size(),
            **wait,
        )
        _announce("mpiexec (MPI.COMM_WORLD)", backend, f"{host}:{port}")
    elif launcher == "srun":
        task = slurm_task()
        step = next(os.environ[var] for var in _SLURM_STEP_VARS if var in os.environ)
        name = f"srun (SLURM job {task.job_id or '?'}, step {step})"
        if task.world_size > 1:
            _bind_device(task.local_rank)
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{_url_host(task.host)}:{task.port}",
                rank=task.rank,
                world_size=task.world_size,
                **wait,
            )
            _announce(name, backend, f"{task.host}:{task.port}")
        else:
            _announce(name, backend, None)
    elif os.environ.get("SLURM_JOB_ID"):
        tasks = os.environ.get("SLURM_NTASKS", "")
        hint = f"; start the job's {tasks} tasks with srun to train on all of them" if tasks not in ("", "1") else ""
        print(f"distributed: plain python in SLURM job {os.environ['SLURM_JOB_ID']} (no srun step): "
              f"world size 1{hint}", flush=True)
    if dist.is_initialized():
        # Tear the group down before interpreter exit (and before mpi4py finalises MPI):
        # gloo's threads still running at exit can abort the process after its work is done.
        atexit.register(cleanup)


def _url_host(host):
    return f"[{host}]" if ":" in host else host  # an IPv6 address in a URL


def _announce(launcher, backend, rendezvous):
    """Rank 0's one line on who launched the world; a collective when there is a group."""
    hosts = all_gather_objects(socket.gethostname())
    if not is_main():
        return
    nodes = sorted(set(hosts))
    shown = ", ".join(nodes[:4]) + (f", ... ({len(nodes)} in all)" if len(nodes) > 4 else "")
    where = f", backend {backend}, rendezvous {rendezvous}" if dist.is_initialized() else ""
    print(f"distributed: launcher {launcher}, world size {len(hosts)} on {len(nodes)} node(s) ({shown}){where}",
          flush=True)


def _bind_device(local_rank):
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def dev():
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return get_rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only (flushed), so that N processes say a thing once."""
    if is_main():
        print(*args, flush=True, **kwargs)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cpu_group():
    """A gloo group of every rank for tiny host-side collectives (the default group when that
    is gloo), so that they never wait for a GPU's queue; the first call is a collective."""
    global _CPU_GROUP
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    if _CPU_GROUP is None:
        wait = {} if _TIMEOUT is None else {"timeout": datetime.timedelta(seconds=_TIMEOUT)}
        _CPU_GROUP = dist.new_group(backend="gloo", **wait)
    return _CPU_GROUP


def timeout_message(error):
    """One line for an error of a collective that waited --dist_timeout in vain (gloo's
    "Timed out waiting 5000ms for recv operation"), else None."""
    text = str(error)
    if _TIMEOUT is None or "timed out" not in text.lower():
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0])  # gloo's "[file.cc:78] " prefix
    return (f"rank {get_rank()} of {get_world_size()}: a collective got no answer from another rank within "
            f"--dist_timeout {_TIMEOUT:g} s ({detail}): a rank is frozen, dead or far behind. The job stops here; "
            "the same command continues from the newest checkpoint")


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj):
    """A list holding every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    """Rank `src`'s `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def load_state_dict(path, **kwargs):
    """
    Load a checkpoint file on every rank (each rank reads the file itself).

    Never unpickles code: `weights_only=True`. Accepts local and (with blobfile) cloud paths.
    """
    kwargs.setdefault("map_location", "cpu")
    if "://" in str(path):
        import blobfile as bf

        with bf.BlobFile(path, "rb") as f:
            data = io.BytesIO(f.read())
        return torch.load(data, weights_only=True, **kwargs)
    return torch.load(path, weights_only=True, **kwargs)


def sync_params(params):
    """Copy rank 0's parameter values to every rank."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p, 0)


def cleanup():
    global _CPU_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None
