"""
A training run's folder (--log_dir) and its one owner.

The folder holds the run's lock (`run.lock`, run_lock.py), its options (`config.json`), its
logs (logger.py) and its checkpoints (checkpoint.py's files). Every trainer (diffusion,
super-resolution, classifier, GAN) opens its folder with `RunDir.open` and saves, finds and
continues through `RunDir`, so that all of them refuse a second run the same way and resume
the same way:

- `--resume auto`: the newest checkpoint whose checksums verify; a damaged newer one is named
  and passed over; with none, step 0, said so. Refused while the run is marked diverged.
- `--resume none`: refused when the folder already holds a checkpoint (they would mix).
- `--resume auto` or `none` starting at step 0 is refused while the folder holds checkpoint
  files that no state file lists (an original-format run, another program's): step 0's saves
  would overwrite them. Only an interrupted first save of this folder's own run leaves such
  files beside its config.json (written before any save), and those the run redoes.
- `--resume DIR` or `--resume FILE`: that checkpoint; a weights file without its state file
  (released weights, an original-format checkpoint) starts a fine-tune from those weights.

Continuing in the run's own folder from a checkpoint older than its newest moves the newer
ones to `LOG_DIR/superseded/` (nothing is deleted) and drops their logged rows, so that
`--resume auto` can never pick them again.
"""

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from . import checkpoint as ckpt
from .. import dist_util
from . import run_lock
from ..logger import Logger

CONFIG = "config.json"
DIVERGED = "diverged.json"  # written when a run stops for a non-finite streak
SUPERSEDED = "superseded"  # newer checkpoints go here when a run continues from an older one
CHECKPOINT_FILE = re.compile(r"^(model|opt|phema|ema_[^_]+_)(\d{6,})\.pt$")  # a state file lists them


@dataclass
class Found:
    """A checkpoint to continue from: its folder, step and state file (None for weights named
    without their training state), and the weights file when the user named one."""

    directory: str
    step: int
    state: Optional[dict]
    weights_file: Optional[str] = None
    named: bool = False  # named by --resume PATH (an explicit choice), not found by auto

    def file(self, default_name):
        return os.path.join(self.directory, self.weights_file or default_name)


class RunDir:
    """
    One run folder. `RunDir(path)` reads it (newest checkpoint, config, files for sampling or
    analysis); `RunDir.open(path)` is a training run's: it also holds the lock until `close`.
    A `path` of None is a run that keeps nothing (saving does nothing, there is nothing to find).
    """

    def __init__(self, path, logger=None):
        self.path = None if path is None else str(path)
        self.logger = logger or Logger(None)
        self._lock = None
        self._created = False

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path, tensorboard=True):
        """
        Create or check the folder, take its lock on behalf of every rank, then open the logs.
        All ranks agree: rank 0 takes the lock and tells the others, so either every rank holds
        the run or every rank raises the same RunLockError naming the holder.
        """
        path = str(path)
        created = not os.path.isdir(path)
        _check_writable_folder(path)
        error, lock = None, None
        if dist_util.is_main():
            try:
                lock = run_lock.acquire(path, log=dist_util.print0)
            except run_lock.RunLockError as e:
                error = str(e)
        error = dist_util.broadcast_object(error)
        if error:
            raise run_lock.RunLockError(error)
        run = cls(path, Logger(path, tensorboard=tensorboard))
        run._lock, run._created = lock, created
        if dist_util.is_main():
            stale = _remove_temp_files(path)
            if stale:
                run.logger.log(f"removed {len(stale)} temporary file(s) of an interrupted save: {', '.join(stale)}")
        return run

    def close(self):
        """Release the lock (the logs stay open for a last line)."""
        if self._lock is not None:
            run_lock.release(self._lock)
            self._lock = None

    @contextlib.contextmanager
    def starting(self):
        """Around everything before the first step (model, data, resume): if that fails, a
        folder this run created is removed again, so a failed start leaves no files behind."""
        try:
            yield
        except BaseException:
            if self._created and dist_util.is_main():
                shutil.rmtree(self.path, ignore_errors=True)
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ options

    def write_config(self, options, name=CONFIG):
        """The run's options as JSON (rank 0, atomically), once they are known to fit the
        checkpoint. Every rank calls it: a failed write (a full disk) fails every rank, in one
        line that names the file and the newest intact checkpoint."""
        if self.path is None:
            return
        error = None
        if dist_util.is_main():
            try:
                ckpt.atomic_write(os.path.join(self.path, name),
                                  lambda f: json.dump(options, f, indent=2, sort_keys=True), mode="w")
            except ckpt.CheckpointError as e:
                found = self.latest(verify=False)
                error = f"{e}; " + (f"the newest intact checkpoint is {found[0]:06d}" if found else "no checkpoint yet")
        error = dist_util.broadcast_object(error)
        if error:
            raise ckpt.CheckpointError(error)

    def read_config(self, name=CONFIG):
        """The saved options, or None when the folder has none."""
        path = os.path.join(self.path or "", name)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    # ------------------------------------------------------------------ checkpoints

    def steps(self):
        """Steps with a state file, newest first (intact or not)."""
        if self.path is None or not os.path.isdir(self.path):
            return []
        matches = map(ckpt.STATE_PATTERN.match, os.listdir(self.path))
        return sorted((int(m.group(1)) for m in matches if m), reverse=True)

    def latest(self, verify=True):
        """
        (step, state dict) of the newest intact checkpoint, or None. Intact: a readable state
        file whose files all exist with their sizes, and with `verify` their checksums: then
        rank 0 reads every file once and tells the other ranks (every rank must call), and each
        damaged newer checkpoint is named in the log.
        """
        if not verify:
            return self._newest_intact(verify=False, log=None)
        found = self._newest_intact(verify=True, log=self.logger.log) if dist_util.is_main() else None
        return dist_util.broadcast_object(found)

    def _newest_intact(self, verify, log):
        damaged = []
        for step in self.steps():
            state = ckpt.load_state_file(os.path.join(self.path, ckpt.state_name(step)))
            reason = ckpt.damage(self.path, step, state, verify)
            if reason is None:
                for bad, why in damaged if log else ():
                    log(f"checkpoint {bad:06d} is damaged ({why}); resuming from {step:06d}")
                return step, state
            damaged.append((step, reason))
        for bad, why in damaged if log else ():
            log(f"checkpoint {bad:06d} is damaged ({why}); no intact checkpoint is older")
        return None

    def newest_before(self, step):
        """The newest intact checkpoint at or before `step` (by sizes), or None."""
        for candidate in self.steps():
            if candidate <= step and ckpt.damage(self.path, candidate, verify=False) is None:
                return candidate
        return None

    def save(self, step, contents, keep=0):
        """
        Write the checkpoint of `step`; every rank calls, rank 0 writes. `contents()` gives
        ({file name: object}, state entries) and runs on rank 0 only. Then only the newest
        `keep` checkpoints stay (0: all). A failed write names the newest intact checkpoint.
        """
        if self.path is None:
            return
        if dist_util.is_main():
            files, state = contents()
            try:
                ckpt.write_checkpoint(self.path, step, files, state)
            except ckpt.CheckpointError as e:
                newest = self._newest_intact(verify=False, log=None)
                where = f"the newest intact checkpoint is {newest[0]:06d}" if newest else "there is no intact checkpoint yet"
                raise ckpt.CheckpointError(
                    f"{e}; {where}: free space and run the same command again to continue from it"
                ) from None
            self.logger.log(f"saved checkpoint at step {step} in {self.path}")
            self.prune(keep)
        dist_util.barrier()

    def save_snapshot(self, step, contents):
        """
        Write the power-function EMA snapshot of `step` (every rank calls, rank 0 writes;
        `contents()` gives `PowerEMA.state_dict()`). Snapshots belong to no checkpoint, so
        `prune` never removes them: post-hoc reconstruction needs every one.
        """
        if self.path is None:
            return
        if dist_util.is_main():
            ckpt.write_snapshot(self.path, step, contents())
        dist_util.barrier()

    def snapshots(self):
        """Steps with a power-function EMA snapshot, newest first (intact or not)."""
        if self.path is None or not os.path.isdir(self.path):
            return []
        matches = map(ckpt.SNAPSHOT_PATTERN.match, os.listdir(self.path))
        return sorted((int(m.group(1)) for m in matches if m), reverse=True)

    def prune(self, keep):
        """Keep only the newest `keep` checkpoints (0: keep all); snapshots are not checkpoints."""
        for step in self.steps()[keep:] if keep > 0 else ():
            for name in ckpt.checkpoint_files(self.path, step):  # the state file first
                try:
                    os.remove(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass

    # ------------------------------------------------------------------ resuming

    def find(self, resume):
        """
        The checkpoint `resume` names, or None to start at step 0: "auto", "none" (or empty), a
        folder (its newest intact checkpoint) or a file. Every rank must call (see `latest`).
        """
        if resume in (None, "", "none"):
            found = self.latest(verify=False)
            if found is not None:
                raise ValueError(
                    f"--resume none, but {self.path} already holds a checkpoint at step {found[0]}: "
                    "a new run there would mix with it. Continue it with --resume auto, or choose a new --log_dir"
                )
            self._refuse_unlisted_files(resume)
            return None
        if resume == "auto":
            self._refuse_if_diverged()
            found = self.latest()
            if found is None:
                self._refuse_unlisted_files(resume)
                self.logger.log(f"no intact checkpoint in {self.path}: starting from step 0")
                return None
            return Found(self.path, *found)
        path = str(resume)
        if os.path.isdir(path):
            found = RunDir(path, self.logger).latest()
            if found is None:
                raise FileNotFoundError(f"--resume {path}: no intact checkpoint (stateNNNNNN.pt with its files) in this directory")
            return Found(path, *found, named=True)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {path}: no such file")
        return self._named_file(path)

    def _refuse_unlisted_files(self, resume):
        """
        Before starting at step 0: refuse when the folder holds checkpoint files of steps without
        a state file, naming them. Those are not this code's checkpoints (the original's
        modelNNNNNN.pt, which `--resume PATH` continues from), unless config.json is there: this
        code writes it before its first save, so beside it they are an interrupted first save's
        files, which the run writes again.
        """
        if self.path is None or not os.path.isdir(self.path) or os.path.isfile(os.path.join(self.path, CONFIG)):
            return
        steps = set(self.steps())
        matches = map(CHECKPOINT_FILE.match, os.listdir(self.path))
        names = sorted(m.group(0) for m in matches if m and int(m.group(2)) not in steps)
        if names:
            models = [n for n in names if n.startswith("model")]
            hint = f"--resume {os.path.join(self.path, models[-1])}" if models else "--resume PATH"
            raise ValueError(
                f"--resume {resume}: {self.path} holds checkpoint files without their state files "
                f"({', '.join(names)}), e.g. an original-format run's: starting at step 0 would overwrite them. "
                f"Continue from them with {hint}, or choose a new --log_dir"
            )

    def _named_file(self, path):
        """A checkpoint file named by the user, as the original took it: the step from its name
        (0 when it has none, e.g. released weights), with its state file when there is one."""
        directory, name = os.path.dirname(path) or ".", os.path.basename(path)
        try:
            step = ckpt.parse_step(path)
        except ValueError:
            step = 0
            self.logger.log(f"{name} has no step in its name: starting at step 0 from its weights")
        state_path = os.path.join(directory, ckpt.state_name(step))
        if os.path.exists(state_path):
            reason = ckpt.damage(directory, step)
            if reason is not None:
                raise ckpt.CheckpointError(f"--resume {path}: checkpoint {step:06d} is damaged ({reason})")
            return Found(directory, step, ckpt.load_state_file(state_path), named=True)
        weights = None if ckpt.STATE_PATTERN.match(name) else name
        return Found(directory, step, None, weights_file=weights, named=True)

    def read(self, found, name, what, optional=False, fits=None):
        """
        One file of `found` (every rank reads its own copy), checked to be a state dict that
        `fits` this model when one is given. An `optional` file (EMA, optimizer) may be missing
        beside weights named without their state: None, with a warning (it starts afresh); any
        other missing file is an error naming it.
        """
        path = os.path.join(found.directory, name)
        if not os.path.isfile(path):
            if optional and found.state is None:
                self.logger.log(f"WARNING: no {what} file {name} in {found.directory}: it starts afresh")
                return None
            raise FileNotFoundError(
                f"cannot resume from step {found.step} in {found.directory}: the {what} file {name} is missing "
                "(pass its weights file as --resume PATH to start from those weights, or use a new --log_dir)"
            )
        contents = ckpt.read_file(path, what)
        if fits is not None:
            ckpt.check_state_dict_matches(fits, contents, what=name)
        return contents

    def rank_state(self, found):
        """
        This rank's RNG states and data position in `found`, or None when they cannot continue:
        weights without a state file (they start afresh), or a checkpoint of another number of
        ranks (they are re-seeded from the step). Either is said in the log.
        """
        rank, world = dist_util.get_rank(), dist_util.get_world_size()
        if found.state is None:
            self.logger.log(
                f"WARNING: resuming from step {found.step} without {ckpt.state_name(found.step)} (an original-format "
                "checkpoint): schedules continue from the step, but RNG and data order start afresh"
            )
            return None
        ranks = found.state.get("ranks") or ([found.state["rank"]] if "rank" in found.state else [])
        if len(ranks) == world:
            return ranks[rank]
        self.logger.log(
            f"WARNING: checkpoint written by {len(ranks)} ranks, resuming on {world}: weights, optimizer and "
            "schedules are restored; RNG and data order are re-seeded"
        )
        torch.manual_seed(1_000_003 * found.step + rank)
        return None

    def resumed(self, found, options=None):
        """
        After a trainer has loaded `found`: say so, and note options that differ from the
        checkpoint's run (allowed, never silent). Continuing this run from an older checkpoint
        sets the newer ones aside and drops their logged rows; a checkpoint named by the user
        clears the diverged mark (that was the explicit choice it asks for).
        """
        self.logger.log(f"resumed from step {found.step} in {found.directory}")
        saved = (found.state or {}).get("config") or {}
        changed = [f"{k} {saved[k]!r} -> {options[k]!r}" for k in sorted(set(saved) & set(options or {}))
                   if saved[k] != options[k]]
        if changed:
            self.logger.log("WARNING: options differ from the checkpoint's run: " + ", ".join(changed))
        if not dist_util.is_main() or self.path is None:
            return
        if same_folder(found.directory, self.path):
            moved = self._set_aside_after(found.step)
            if moved:
                self.logger.log(f"moved the {len(moved)} newer checkpoint(s) {', '.join(f'{m:06d}' for m in moved)} "
                                f"to {os.path.join(self.path, SUPERSEDED)}: this run continues from {found.step:06d}")
            dropped = self.logger.drop_rows_after(found.step)
            if dropped:
                self.logger.log(f"dropped {dropped} logged row(s) after step {found.step}: that part of the run is redone")
        if found.named:
            try:
                os.remove(os.path.join(self.path, DIVERGED))
            except OSError:
                pass

    def _set_aside_after(self, step):
        """Move the checkpoints, and the snapshots, of steps after `step` to superseded/ (that
        part of the run is redone); returns the checkpoints' steps."""
        newer = [s for s in self.steps() if s > step]
        names = [name for s in newer for name in ckpt.checkpoint_files(self.path, s)]  # state files first
        names += [ckpt.snapshot_name(s) for s in self.snapshots() if s > step]
        if names:
            target = os.path.join(self.path, SUPERSEDED)
            os.makedirs(target, exist_ok=True)
            for name in names:
                try:
                    os.replace(os.path.join(self.path, name), os.path.join(target, name))
                except FileNotFoundError:
                    pass
        return newer

    # ------------------------------------------------------------------ a diverged run

    def mark_diverged(self, step, streak):
        """
        Record that the run stopped at `step` after `streak` non-finite steps (rank 0), so that
        `--resume auto` refuses the checkpoints written during the streak; returns what to do
        next, with the exact command.
        """
        before = self.newest_before(step - streak) if self.path is not None else None
        if self.path is not None and dist_util.is_main():
            with open(os.path.join(self.path, DIVERGED), "w") as f:
                json.dump({"stopped_at": step, "nonfinite_streak": streak, "checkpoint_before_streak": before}, f,
                          indent=2)
        return self._diverged_advice(before)

    def _diverged_advice(self, before):
        if self.path is None:
            return "Lower --lr, use --precision bf16/fp32 or --grad_clip."
        if before is None:
            return (f"No checkpoint from before the streak exists in {self.path}: start again in a new --log_dir "
                    "with other options (a lower --lr, --precision bf16/fp32 or --grad_clip).")
        config = os.path.join(self.path, CONFIG)
        return (f"The newest checkpoint from before the streak is {before:06d}. Continue from it with other options, "
                f"e.g. a lower --lr:\n  python scripts/image_train.py --config {config} --log_dir {self.path} "
                f"--resume {os.path.join(self.path, ckpt.model_name(before))} --lr LOWER_LR\n"
                f"(--resume auto refuses this run until then: its newer checkpoints come from the diverging streak)")

    def _refuse_if_diverged(self):
        path = os.path.join(self.path or "", DIVERGED)
        if self.path is None or not os.path.isfile(path):
            return
        try:
            with open(path) as f:
                info = json.load(f)
            stopped, before = info["stopped_at"], info["checkpoint_before_streak"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ckpt.CheckpointError(f"{path} is damaged; remove it to resume this run with --resume auto") from None
        raise ckpt.CheckpointError(
            f"the run in {self.path} stopped at step {stopped} because it diverged ({path}). "
            + self._diverged_advice(before)
        )


def same_folder(a, b):
    """Whether two paths name one folder, by identity (through a symlink, a relative path or
    another mount of it), not by spelling."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist
        return os.path.abspath(a) == os.path.abspath(b)


def _check_writable_folder(path):
    """Create the folder now, so that a path that cannot hold a run fails before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--log_dir {path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--log_dir {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--log_dir {path} is not writable")


def _remove_temp_files(path):
    """Delete the temporary files of writes that a killed run left behind; returns their names."""
    stale = sorted(name for name in os.listdir(path) if ckpt.TEMP_PATTERN.search(name))
    for name in stale:
        try:
            os.remove(os.path.join(path, name))
        except FileNotFoundError:
            pass
    return stale


# ---------------------------------------------------------------------------------------- loading a run


@dataclass
class LoadedRun:
    """A trained model ready to use: what `load_run` returns."""

    model: torch.nn.Module  # in eval mode, on the device asked for
    diffusion: object  # a SpacedDiffusion built from `options`
    options: dict  # the model and diffusion options it was built with
    run_config: Optional[dict]  # the run's config.json as read, or None when there is none
    path: str  # the weights file loaded
    step: Optional[int]  # its step (None for a file without one, e.g. released weights)


def load_run(path, which="ema", rate=None, step=None, overrides=None, device="cpu", log=print):
    """
    The one way to get a trained model for sampling, evaluation, analysis and the study.

    :param path: a weights file (modelNNNNNN.pt, ema_RATE_NNNNNN.pt, a released checkpoint) or
        a run folder (--log_dir of a trainer): then its newest intact checkpoint (checksums
        verified; a damaged newer one is named through `log` and passed over), or the one of
        `step`.
    :param which: in a run folder, "ema" (default) or "model" (the raw weights).
    :param rate: in a run folder, which EMA (e.g. 0.9999 or "0.9999"); None: the run's first.
    :param step: in a run folder, that step's checkpoint instead of the newest.
    :param overrides: model/diffusion option values over the run's config.json (a script's
        parsed flags, a sampling respacing); without a config.json they are the options, over
        the table's defaults. A super-resolution run is recognised by its `large_size`.
    :return: a `LoadedRun` (model in eval mode on `device`, diffusion, options, run_config,
        path, step). Errors name the path: FileNotFoundError for nothing there, ValueError
        (CheckpointMismatchError) for weights that do not fit the options.
    """
    from ..options import config

    path = str(path)
    folder = os.path.isdir(path)
    if folder:  # verified there
        path, step = _weights_in_folder(path, which, rate, step, log)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or run folder")
    else:
        try:
            step = ckpt.parse_step(path)
        except ValueError:
            step = None
    run_config = _read_run_config(config.run_config_path(path))
    options = run_options(run_config, overrides, config.run_config_path(path))
    model, diffusion = _build(options)
    ckpt.load_model_weights(model, path, verify=not folder)
    model.to(device).eval()
    return LoadedRun(model, diffusion, options, run_config, path, step)


def run_options(run_config, overrides=None, where="config.json"):
    """The model and diffusion options of a run: the table's defaults < its config.json
    (`where`, for errors) < `overrides`; a super-resolution run keeps its two sizes."""
    from ..options import config

    names = config.names(*config.MODEL_GROUPS)
    options = {n: config.BY_NAME[n].default for n in names}
    saved = run_config or {}
    options.update({k: config.coerce(k, v, where) for k, v in saved.items() if k in options})
    options.update({k: v for k, v in (overrides or {}).items() if k in options})
    sizes = {k: (overrides or {}).get(k, saved.get(k)) for k in SR_SIZES}
    if all(v is not None for v in sizes.values()):
        options.update({k: int(v) for k, v in sizes.items()})
    config.validate(options)
    return options


SR_SIZES = ("large_size", "small_size")  # options of a super-resolution run (super_res_train.py)


def _build(options):
    """Model and diffusion of `options`: a super-resolution model when they have its sizes."""
    from .. import script_util

    if "large_size" in options:
        keys = [k for k in script_util.sr_model_and_diffusion_defaults() if k not in SR_SIZES]
        return script_util.sr_create_model_and_diffusion(
            **{k: options[k] for k in keys}, large_size=options["large_size"],
            small_size=options["small_size"], channel_mult=options["channel_mult"])
    return script_util.create_model_and_diffusion(**options)


def _read_run_config(path):
    """A run's config.json, or None when there is none (a damaged one is an error naming it)."""
    from ..options import config

    return config.read_options_file(path) if os.path.isfile(path) else None


def _weights_in_folder(folder, which, rate, step, log):
    """(weights file, step) of the checkpoint `which` / `rate` / `step` of a run folder."""
    if which not in ("ema", "model"):
        raise ValueError(f"which={which!r}: choose 'ema' or 'model'")
    run = RunDir(folder)
    if step is None:
        found = run._newest_intact(verify=True, log=log)
        if found is None:
            raise FileNotFoundError(f"{folder}: no intact checkpoint (stateNNNNNN.pt with its files) in this run folder")
        step, state = found
    else:
        reason = ckpt.damage(folder, step) if step in run.steps() else "no such checkpoint"
        if reason is not None:
            raise FileNotFoundError(f"{folder}: checkpoint {step:06d} cannot be used ({reason})")
        state = ckpt.load_state_file(os.path.join(folder, ckpt.state_name(step)))
    if which == "model":
        return os.path.join(folder, ckpt.model_name(step)), step
    emas = {}
    for name in state["files"]:
        match = EMA_FILE.match(name)
        if match:
            emas[float(match.group(1))] = name
    if not emas:
        raise FileNotFoundError(f"{folder}: checkpoint {step:06d} has no EMA file (load which='model')")
    wanted = float(rate) if rate is not None else float((state.get("ema_rate") or sorted(emas))[0])
    if wanted not in emas:
        raise FileNotFoundError(f"{folder}: checkpoint {step:06d} has no EMA of rate {rate} "
                                f"(it has {', '.join(str(r) for r in emas)})")
    return os.path.join(folder, emas[wanted]), step


EMA_FILE = re.compile(r"^ema_([0-9.eE+-]+)_\d{6,}\.pt$")
