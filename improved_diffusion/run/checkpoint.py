"""
Checkpoint files: written atomically, found again only when complete.

A checkpoint at step N is the original's three kinds of file in the log dir,
`modelNNNNNN.pt`, `ema_RATE_NNNNNN.pt` and `optNNNNNN.pt` (plain state dicts, readable by the
original scripts), plus `stateNNNNNN.pt` with the rest of the training state. Each file is
written to a temporary name, flushed to disk and renamed, and the state file, which lists
the other files, is written last: a checkpoint counts only once its state file exists and
every file it lists is there.

The state file records each file's size and SHA-256, and a digest of its own contents, so a
truncated, zeroed or bit-flipped file of any of the four kinds is found before it is used
(`damage`). Which checkpoint of a run folder to use, saving into it and pruning it are
run_dir.py's; this module is the format of one checkpoint.

With --phema_stds a checkpoint also lists `phemaNNNNNN.pt` (the power-function EMAs, for
resuming), and `phema_snapshotNNNNNN.pt` files are written beside the checkpoints: each one
file checked by its own digest, as a state file is, and no checkpoint's, so never pruned.
"""

import errno
import hashlib
import os
import pickle
import re

import numpy as np
import torch

STATE_PATTERN = re.compile(r"^state(\d{6,})\.pt$")
TEMP_PATTERN = re.compile(r"\.pt\.tmp\d+$")  # a write in progress (atomic_save)


def model_name(step):
    return f"model{step:06d}.pt"


def ema_name(rate, step):
    return f"ema_{rate}_{step:06d}.pt"


def opt_name(step):
    return f"opt{step:06d}.pt"


def state_name(step):
    return f"state{step:06d}.pt"


def phema_name(step):
    """The power-function EMAs (--phema_stds) of the checkpoint of `step`: pruned with it."""
    return f"phema{step:06d}.pt"


def snapshot_name(step):
    """A power-function EMA snapshot (--phema_snapshot_interval): no checkpoint's, never pruned."""
    return f"phema_snapshot{step:06d}.pt"


SNAPSHOT_PATTERN = re.compile(r"^phema_snapshot(\d{6,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be written or read: the message names the file and the cause."""


def atomic_save(obj, path):
    """torch.save to `path` so that a reader sees the old file, or the whole new one. A failed
    write (disk full, ...) leaves no temporary file and raises CheckpointError."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path, write, mode="wb"):
    """`write(f)` into `path` through a temporary file, flushed and renamed: a reader sees the
    old file or the whole new one; a failed write leaves no temporary file and raises
    CheckpointError naming `path` and the cause."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CheckpointError(f"cannot write {path}: {_write_cause(e)}") from e
    _fsync_dir(os.path.dirname(path) or ".")


def _write_cause(e):
    """The cause of a failed write in words, also when torch hides the OSError in a RuntimeError."""
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for err in chain:
        if isinstance(err, OSError) and err.errno is not None:
            return os.strerror(err.errno)
    text = str(e)
    if "No space left" in text or "file write failed" in text:
        return os.strerror(errno.ENOSPC)
    return text.splitlines()[0] if text else type(e).__name__


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_digest(state):
    """SHA-256 of a state dict's contents (tensors' bytes and plain values, in key order),
    the "sha256" entry itself excluded: a flipped bit anywhere in it changes the digest."""
    h = hashlib.sha256()

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            h.update(f"{path}:{obj.dtype}:{tuple(obj.shape)}".encode())
            h.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                if not (path == "" and key == "sha256"):
                    walk(obj[key], f"{path}.{key}")
        elif isinstance(obj, (list, tuple)):
            h.update(f"{path}:{type(obj).__name__}{len(obj)}".encode())
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]")
        else:
            h.update(f"{path}={obj!r}".encode())

    walk(state, "")
    return h.hexdigest()


def read_file(path, what="checkpoint"):
    """
    torch.load(weights_only=True) of a checkpoint file, with one clear line for each failure:
    missing, unreadable (truncated, zeroed, not a torch file), or holding Python objects that
    loading would have to run (refused: this never loads unsafely, and never advises it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{what} {path} holds a Python object ({found.group(1)}) that loading would have to run: "
                "refused (only plain tensors and values are loaded). Use checkpoints written by this code "
                "or the originals"
            ) from None
        raise CheckpointError(f"{what} {path} cannot be read (truncated, damaged or not a torch file)") from None
    except Exception as e:  # torch raises many kinds for a damaged file
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{what} {path} cannot be read (truncated or damaged?): {cause}") from None


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def parse_step(path):
    """The step in a checkpoint file name (`model001000.pt`, `ema_0.9999_001000.pt`, ...)."""
    m = re.search(r"(\d{6,})\.pt$", os.path.basename(path))
    if not m:
        raise ValueError(
            f"cannot read a step number from checkpoint file name {path!r}: expected a name like "
            "model001000.pt, ema_0.9999_001000.pt, opt001000.pt or state001000.pt"
        )
    return int(m.group(1))


def load_state_file(path):
    """A state file's dict, or None when it is unreadable (then the checkpoint is not intact)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return state if isinstance(state, dict) and "step" in state and "files" in state else None


def damage(log_dir, step, state=None, verify=True):
    """
    Why the checkpoint of `step` in `log_dir` cannot be used, or None when it is intact: its
    state file is unreadable or altered, or a file it lists is missing, of another size, or
    (with `verify`) of another SHA-256. Checkpoints written before checksums are checked by size.
    """
    name = state_name(step)
    if state is None:
        state = load_state_file(os.path.join(log_dir, name))
    if state is None:
        return f"{name}: unreadable"
    if verify and "sha256" in state and state_digest(state) != state["sha256"]:
        return f"{name}: checksum mismatch"
    for file_name, entry in state["files"].items():
        reason = _file_damage(os.path.join(log_dir, file_name), entry, verify)
        if reason is not None:
            return f"{file_name}: {reason}"
    return None


def _file_damage(path, entry, verify):
    """Why one file differs from its state file's `entry` (a size, or size and SHA-256), or None."""
    size, digest = (entry, None) if isinstance(entry, int) else (entry["size"], entry["sha256"])
    if not os.path.isfile(path):
        return "missing"
    if os.path.getsize(path) != size:
        return f"{os.path.getsize(path)} bytes, {size} written"
    if verify and digest is not None and file_sha256(path) != digest:
        return "checksum mismatch"
    return None


def verify_listed(path):
    """
    CheckpointError when the state file of `path`'s checkpoint lists `path` and the file is not
    what was written (size, SHA-256). A file that no state file lists (released weights, an
    original-format checkpoint, a state file that cannot be read) has nothing to verify against.
    """
    try:
        step = parse_step(path)
    except ValueError:
        return
    state_path = os.path.join(os.path.dirname(path) or ".", state_name(step))
    state = load_state_file(state_path) if os.path.isfile(state_path) else None
    entry = (state or {}).get("files", {}).get(os.path.basename(path))
    reason = None if entry is None else _file_damage(path, entry, verify=True)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is damaged ({reason} against {state_path}): use another checkpoint")


def checkpoint_files(directory, step):
    """The file names of the checkpoint at `step`, its state file first (removing or moving
    them in this order makes it stop counting at once)."""
    state = load_state_file(os.path.join(directory, state_name(step)))
    return [state_name(step)] + (list(state["files"]) if state else [])


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model built from the given flags."""


MODEL_FLAGS_HINT = (
    "check --image_size, --num_channels, --num_res_blocks, --attention_resolutions, --channel_mult, "
    "--learn_sigma, --class_cond, --num_heads / --num_head_channels, --resblock_updown, --use_scale_shift_norm"
)


def _image_channels_mismatch(model, own, state, key="input_blocks.0.0.weight"):
    """One line naming both image-channel counts when the first convolution says they differ."""
    channels = getattr(model, "in_channels", None)
    if key not in own or key not in state or not isinstance(channels, int) or state[key].ndim < 2:
        return None
    per_channel = own[key].shape[1] // channels  # 2 for a super-resolution model (image + low_res)
    theirs = state[key].shape[1] // per_channel
    if theirs == channels:
        return None
    return (f"the checkpoint is for {theirs}-channel images, the model for {channels} "
            f"(--image_channels {channels}); pass --image_channels {theirs}")


def check_state_dict_matches(model, state, what="checkpoint"):
    """Raise CheckpointMismatchError listing every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{what} does not fit the model built from the given flags ({MODEL_FLAGS_HINT}):"]
    channels = _image_channels_mismatch(model, own, state)
    if channels:
        lines.insert(0, channels)
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
    raise CheckpointMismatchError("\n".join(lines))


# ---------------------------------------------------------------------------------------
# Writing a checkpoint, and what each rank needs to continue exactly
# ---------------------------------------------------------------------------------------


def load_model_weights(model, path, verify=True):
    """
    Load a plain state dict file into ``model`` strictly, with readable errors.

    The file is read with ``torch.load(weights_only=True, map_location="cpu")``, so nothing
    in it is executed. Works for ``modelNNNNNN.pt`` / ``ema_RATE_NNNNNN.pt`` and for the
    released improved-diffusion / guided-diffusion checkpoints. With ``verify``, a file that
    its checkpoint's state file lists is first checked against its recorded size and SHA-256
    (`verify_listed`), so a damaged file is never loaded silently.

    :raises FileNotFoundError: no such file.
    :raises ValueError: the file is not a readable state dict (CheckpointError: or is damaged).
    :raises CheckpointMismatchError: missing, unexpected or shape-mismatched keys (all
                                     listed), which means the model flags are wrong.
    """
    if not path:
        raise FileNotFoundError("no checkpoint given: pass --model_path")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    if verify:
        verify_listed(path)
    state = read_file(path, "model checkpoint")
    if not isinstance(state, dict) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(
            f"{path} is not a model state dict (a dict of tensors, as in modelNNNNNN.pt or "
            f"ema_RATE_NNNNNN.pt); got {type(state).__name__}"
        )
    check_state_dict_matches(model, state, what=f"checkpoint {path}")
    model.load_state_dict(state, strict=True)
    return model


def write_checkpoint(directory, step, files, state):
    """
    Write the checkpoint of `step`: each {file name: object} of `files` in order, then last the
    state file (`state`'s entries, each file's size and SHA-256, and its own digest). On a failed
    write the files of this step are removed again and CheckpointError says why and how much
    space a checkpoint needs.
    """
    os.makedirs(directory, exist_ok=True)
    written = {}
    try:
        for name, obj in files.items():
            path = os.path.join(directory, name)
            atomic_save(obj, path)
            written[name] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
        full = {"format": 2, "step": step, "files": written, **state}
        full["sha256"] = state_digest(full)
        atomic_save(full, os.path.join(directory, state_name(step)))
    except CheckpointError as e:
        for name in written:
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass
        needed = sum(_tensor_bytes(obj) for obj in files.values())
        raise CheckpointError(f"{e} (a checkpoint needs about {needed / 2**20:,.1f} MiB in {directory})") from None


def write_snapshot(directory, step, snapshot):
    """A power-function EMA snapshot of `step` (`PowerEMA.state_dict()`), written atomically with
    a digest of its contents, as a state file is: one self-checking file."""
    full = {"step": step, **snapshot}
    full["sha256"] = state_digest(full)
    atomic_save(full, os.path.join(directory, snapshot_name(step)))


def read_snapshot(path):
    """A snapshot written by `write_snapshot`, its digest verified; CheckpointError names a damaged one."""
    snapshot = read_file(path, "power-function EMA snapshot")
    if not isinstance(snapshot, dict) or "sha256" not in snapshot or state_digest(snapshot) != snapshot["sha256"]:
        raise CheckpointError(f"power-function EMA snapshot {path} is damaged (checksum mismatch)")
    return snapshot


def _tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def rank_state(data):
    """What one rank needs to continue exactly: its RNG states and its data stream's position."""
    state = {"rng_torch": torch.get_rng_state(), "rng_numpy": _numpy_rng_state()}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    if hasattr(data, "state_dict"):
        state["data"] = data.state_dict()
    return state


def set_rank_state(state, data):
    torch.set_rng_state(state["rng_torch"])
    _set_numpy_rng_state(state["rng_numpy"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng_cuda"])
    if "data" in state and hasattr(data, "load_state_dict"):
        data.load_state_dict(state["data"])


def _numpy_rng_state():
    # weights_only loading takes tensors and plain values, not numpy arrays
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(s):
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))
