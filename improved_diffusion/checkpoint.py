"""
Checkpoint files: written atomically, found again only when complete.

A checkpoint at step N is the original's three kinds of file in the log dir,
`modelNNNNNN.pt`, `ema_RATE_NNNNNN.pt` and `optNNNNNN.pt` (plain state dicts, readable by the
original scripts), plus `stateNNNNNN.pt` with the rest of the training state. Each file is
written to a temporary name, flushed to disk and renamed, and the state file, which lists
the other files, is written last: a checkpoint counts only once its state file exists and
every file it lists is there.
"""

import os
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


def atomic_save(obj, path):
    """torch.save to `path` so that a reader sees the old file, or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


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


def find_latest_checkpoint(log_dir):
    """
    (step, state dict) of the newest intact checkpoint in `log_dir`, or None when none is.

    Intact: a readable state file whose listed files all exist with their recorded sizes.
    """
    if not log_dir or not os.path.isdir(log_dir):
        return None
    steps = sorted(
        (int(m.group(1)) for m in map(STATE_PATTERN.match, os.listdir(log_dir)) if m),
        reverse=True,
    )
    for step in steps:
        state = load_state_file(os.path.join(log_dir, state_name(step)))
        if state is not None and files_intact(log_dir, state["files"]):
            return step, state
    return None


def files_intact(log_dir, files):
    for name, size in files.items():
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
    last the state file (with `state`'s entries plus the sizes of the files it completes).
    """
    os.makedirs(log_dir, exist_ok=True)
    files = {}

    def write(name, obj):
        path = os.path.join(log_dir, name)
        atomic_save(obj, path)
        files[name] = os.path.getsize(path)

    write(model_name(step), model_state)
    for rate, ema_state in ema_states.items():
        write(ema_name(rate, step), ema_state)
    write(opt_name(step), opt_state)
    atomic_save({"format": 1, "step": step, "files": files, **state}, os.path.join(log_dir, state_name(step)))


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
            return load(path)
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
