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
(`damage`), and resuming falls back to the newest checkpoint that verifies.
"""

import errno
import hashlib
import json
import os
import pickle
import re

import numpy as np
import torch

STATE_PATTERN = re.compile(r"^state(\d{6,})\.pt$")
MODEL_PATTERN = re.compile(r"^model(\d{6,})\.pt$")


def model_name(step):
    return f"model{step:06d}.pt"


def ema_name(rate, step):
    return f"ema_{rate}_{step:06d}.pt"


def opt_name(step):
    return f"opt{step:06d}.pt"


def state_name(step):
    return f"state{step:06d}.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be written or read: the message names the file and the cause."""


def atomic_save(obj, path):
    """torch.save to `path` so that a reader sees the old file, or the whole new one. A failed
    write (disk full, ...) leaves no temporary file and raises CheckpointError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
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


TEMP_PATTERN = re.compile(r"\.pt\.tmp\d+$")


def remove_temp_files(log_dir):
    """Delete the temporary files of writes that a killed run left behind; returns their names."""
    if not log_dir or not os.path.isdir(log_dir):
        return []
    stale = sorted(name for name in os.listdir(log_dir) if TEMP_PATTERN.search(name))
    for name in stale:
        try:
            os.remove(os.path.join(log_dir, name))
        except FileNotFoundError:
            pass
    return stale


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


def checkpoint_steps(log_dir):
    """Steps with a state file in `log_dir`, newest first."""
    if not log_dir or not os.path.isdir(log_dir):
        return []
    return sorted((int(m.group(1)) for m in map(STATE_PATTERN.match, os.listdir(log_dir)) if m), reverse=True)


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
        path = os.path.join(log_dir, file_name)
        size, digest = (entry, None) if isinstance(entry, int) else (entry["size"], entry["sha256"])
        if not os.path.isfile(path):
            return f"{file_name}: missing"
        if os.path.getsize(path) != size:
            return f"{file_name}: {os.path.getsize(path)} bytes, {size} written"
        if verify and digest is not None and file_sha256(path) != digest:
            return f"{file_name}: checksum mismatch"
    return None


def find_latest_checkpoint(log_dir, verify=False, log=None):
    """
    (step, state dict) of the newest intact checkpoint in `log_dir`, or None when none is.

    Intact: a readable state file whose listed files all exist with their recorded sizes, and
    with `verify` also their checksums. Each damaged checkpoint passed over is reported to `log`.
    """
    damaged = []
    for step in checkpoint_steps(log_dir):
        state = load_state_file(os.path.join(log_dir, state_name(step)))
        reason = damage(log_dir, step, state, verify)
        if reason is None:
            if damaged and log is not None:
                for bad_step, why in damaged:
                    log(f"checkpoint {bad_step:06d} is damaged ({why}); resuming from {step:06d}")
            return step, state
        damaged.append((step, reason))
    if damaged and log is not None:
        for bad_step, why in damaged:
            log(f"checkpoint {bad_step:06d} is damaged ({why}); no intact checkpoint is older")
    return None


def files_intact(log_dir, files):
    for name, entry in files.items():
        size = entry if isinstance(entry, int) else entry["size"]
        path = os.path.join(log_dir, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    return True


def remove_checkpoint(log_dir, step):
    """Delete the checkpoint at `step`: its state file first, so it stops counting at once."""
    state = load_state_file(os.path.join(log_dir, state_name(step)))
    names = [state_name(step)] + (list(state["files"]) if state else [])
    for name in names:
        try:
            os.remove(os.path.join(log_dir, name))
        except FileNotFoundError:
            pass


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
# Writing and reading a whole training checkpoint
# ---------------------------------------------------------------------------------------


def write_checkpoint(log_dir, step, model_state, ema_states, opt_state, state):
    """
    Write the checkpoint of `step`: model, one EMA file per {rate: state dict}, optimizer, and
    last the state file (`state`'s entries, each file's size and SHA-256, and its own digest).
    On a failed write the files of this step are removed again and CheckpointError says why,
    how much a checkpoint needs, and which checkpoint is the newest intact one.
    """
    os.makedirs(log_dir, exist_ok=True)
    files = {}

    def write(name, obj):
        path = os.path.join(log_dir, name)
        atomic_save(obj, path)
        files[name] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}

    try:
        write(model_name(step), model_state)
        for rate, ema_state in ema_states.items():
            write(ema_name(rate, step), ema_state)
        write(opt_name(step), opt_state)
        full = {"format": 2, "step": step, "files": files, **state}
        full["sha256"] = state_digest(full)
        atomic_save(full, os.path.join(log_dir, state_name(step)))
    except CheckpointError as e:
        for name in files:
            try:
                os.remove(os.path.join(log_dir, name))
            except OSError:
                pass
        needed = sum(_tensor_bytes(obj) for obj in (model_state, opt_state, *ema_states.values()))
        latest = find_latest_checkpoint(log_dir)
        where = f"the newest intact checkpoint is {latest[0]:06d}" if latest else "there is no intact checkpoint yet"
        raise CheckpointError(
            f"{e} (a checkpoint needs about {needed / 2**20:,.1f} MiB in {log_dir}; {where}; "
            "free space and run the same command again to continue from it)"
        ) from None


def _tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def prune_checkpoints(log_dir, keep):
    """Keep only the newest `keep` checkpoints (0: keep all)."""
    if keep <= 0:
        return
    steps = sorted(int(m.group(1)) for m in map(STATE_PATTERN.match, os.listdir(log_dir)) if m)
    for step in steps[:-keep]:
        remove_checkpoint(log_dir, step)


def read_training_files(directory, step, rates, load, model_file=None, partial=False, log=print):
    """
    The state dicts of a training checkpoint: {"model", "ema": [per rate, None if absent],
    "opt" (None if absent)}. `load(path)` reads one file (every rank reads its own copy).
    With `partial` (weights named by the user, as the original allowed), a missing EMA or
    optimizer file is None with a warning; otherwise a missing file is an error naming it.
    """

    def read(name, what):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return load(path, what)
        if partial and what != "model":
            log(f"WARNING: no {what} file {name} in {directory}: it starts afresh")
            return None
        raise FileNotFoundError(
            f"cannot resume from step {step} in {directory}: the {what} file {name} is missing "
            "(pass its model file as --resume PATH to start from those weights, or use a new --log_dir)"
        )

    return {
        "model": read(model_file or model_name(step), "model"),
        "ema": [read(ema_name(rate, step), f"EMA (rate {rate})") for rate in rates],
        "opt": read(opt_name(step), "optimizer"),
    }


# ---------------------------------------------------------------------------------------
# A diverged run, and a run continued from an older checkpoint
# ---------------------------------------------------------------------------------------

DIVERGED = "diverged.json"  # written when a run stops for a non-finite streak
SUPERSEDED = "superseded"  # newer checkpoints go here when a run continues from an older one


def newest_checkpoint_before(log_dir, step):
    """The newest intact checkpoint at or before `step` (by sizes), or None."""
    for candidate in checkpoint_steps(log_dir):
        if candidate <= step and damage(log_dir, candidate, verify=False) is None:
            return candidate
    return None


def mark_diverged(log_dir, step, streak, before):
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, DIVERGED), "w") as f:
        json.dump({"stopped_at": step, "nonfinite_streak": streak, "checkpoint_before_streak": before}, f, indent=2)


def diverged_advice(log_dir, before):
    """What to do after a divergence, with the exact command."""
    if log_dir is None:
        return "Lower --lr, use --precision bf16/fp32 or --grad_clip."
    if before is None:
        return (f"No checkpoint from before the streak exists in {log_dir}: start again in a new --log_dir with "
                "other options (a lower --lr, --precision bf16/fp32 or --grad_clip).")
    config = os.path.join(log_dir, "config.json")
    return (f"The newest checkpoint from before the streak is {before:06d}. Continue from it with other options, "
            f"e.g. a lower --lr:\n  python scripts/image_train.py --config {config} --log_dir {log_dir} "
            f"--resume {os.path.join(log_dir, model_name(before))} --lr LOWER_LR\n"
            f"(--resume auto refuses this run until then: its newer checkpoints come from the diverging streak)")


def refuse_if_diverged(log_dir):
    """--resume auto in a run that stopped diverging needs an explicit choice of checkpoint."""
    path = os.path.join(log_dir or "", DIVERGED)
    if not log_dir or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            info = json.load(f)
        stopped, before = info["stopped_at"], info["checkpoint_before_streak"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is damaged; remove it to resume this run with --resume auto") from None
    raise CheckpointError(
        f"the run in {log_dir} stopped at step {stopped} because it diverged ({path}). "
        + diverged_advice(log_dir, before)
    )


def clear_diverged(log_dir):
    try:
        os.remove(os.path.join(log_dir or "", DIVERGED))
    except OSError:
        pass


def set_aside_after(log_dir, step):
    """Move the checkpoints newer than `step` into LOG_DIR/superseded/ (nothing is deleted), so
    that `--resume auto` can never pick them once this run has continued from `step`."""
    newer = [s for s in checkpoint_steps(log_dir) if s > step]
    if not newer:
        return []
    target = os.path.join(log_dir, SUPERSEDED)
    os.makedirs(target, exist_ok=True)
    for s in newer:
        state = load_state_file(os.path.join(log_dir, state_name(s)))
        names = [state_name(s)] + (list(state["files"]) if state else [])  # the state file first
        for name in names:
            try:
                os.replace(os.path.join(log_dir, name), os.path.join(target, name))
            except FileNotFoundError:
                pass
    return newer


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
