"""
One process group, whoever launched us: `mpiexec`, `torchrun`, or a plain `python`.

Everything here works without initialisation (world size 1), and every function that runs
a collective must be called by every rank: no rank-0-only branches around collectives.
"""

import io
import os
import socket

import torch
import torch.distributed as dist

# Environment variables that MPI launchers set for their children.
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def _mpi_world_size():
    for var in _MPI_SIZE_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 1


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def setup_dist(backend=None):
    """
    Join the process group the launcher set up, and bind this rank to its GPU.

    torchrun: read RANK / WORLD_SIZE / MASTER_ADDR from the environment.
    mpiexec: take rank and size from MPI.COMM_WORLD, the address and a free port from rank 0.
    Anything else: one process, no process group (all helpers below still work).
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) > 1:
            _bind_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend, init_method="env://")
        return
    if _mpi_world_size() > 1:
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
        )


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


def barrier():
    if dist.is_initialized():
        dist.barrier()


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
    if dist.is_initialized():
        dist.destroy_process_group()
