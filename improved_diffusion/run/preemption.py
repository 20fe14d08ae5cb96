"""
Leaving a run cleanly when the scheduler asks, and saving by the clock (docs/multinode.md).

A scheduler warns a job before it ends it: SIGTERM at preemption or `scancel` (SIGKILL
follows after SLURM's KillWait / GraceTime), or the signal of `sbatch --signal` before the
time limit (scripts/launch/slurm.sbatch forwards it to the tasks). With `--stop_signals
TERM,USR1` (the default) such a signal no longer kills the trainer: every rank finishes its
step, the ranks agree on one step, a checkpoint of that step is written (the ordinary atomic
`RunDir.save`) and the process exits with `EXIT_CODE` (75, EX_TEMPFAIL: "try again later"),
which slurm.sbatch turns into `scontrol requeue`. `--save_minutes M` also saves every M
minutes of rank 0's clock. A failed write of the logs (a full disk; logger.py's `write_error`)
stops the run the same way, with a checkpoint of the agreed step, and ends it with one
`error:` line (exit 2, not 75: a requeue would meet the same full disk).

The agreement costs the step nothing measurable. On one process the flags are read after
every step, with no collective. On several, every `CHECK_EVERY` steps the ranks all_reduce
(MAX) one two-element CPU tensor, [stop, save], over a gloo group (NCCL's would make the host
wait for the GPU's queue): a signal that any rank caught stops all of them at the same step,
and the save flag is rank 0's clock. A second signal while stopping (srun and slurmstepd may
both send one) is counted and ignored; the handler stays installed until the process exits.
"""

import signal
import threading
import time

import torch
import torch.distributed as dist

from .. import dist_util
from ..options import config as options

EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped on request with a checkpoint; run the same command again
CHECK_EVERY = 5  # steps between the ranks' agreements (one tiny all_reduce); every step on one process
CLOCK = time.monotonic  # the clock of --save_minutes (rank 0's decides); tests replace it


def parse_signals(text):
    """'TERM,USR1' -> (SIGTERM, SIGUSR1); '' -> (). ValueError naming --stop_signals."""
    options.BY_NAME["stop_signals"].validate(text)
    return tuple(signal.Signals[options.signal_name(n)] for n in str(text).split(",") if n.strip())


class Stopped(SystemExit):
    """Raised by a training loop after the checkpoint of the agreed stop step: uncaught, the
    process exits with EXIT_CODE."""

    def __init__(self, step, cause):
        super().__init__(EXIT_CODE)
        self.step, self.cause = step, cause


class RunWriteError(ValueError):
    """A run stopped because it could not write its files (after saving what it could)."""


class StopRequest:
    """
    The stop signals' handlers and the save clock of one training loop; `due(step)`, called by
    every rank after every step, says what to do at that step, the same on every rank:
    'stop' (save, then leave the loop and raise `Stopped`), 'save' (--save_minutes) or None.

        with StopRequest("TERM,USR1", save_minutes=30, log=logger.log) as stop:
            while ...:
                ...
                due = stop.due(step)
                if due or step % save_interval == 0:
                    save()
                if due == "stop":
                    break
        # leaving the block after a stop raises Stopped (exit code 75)

    Constructing it is a collective on several ranks (the gloo group); so is `due`.
    """

    def __init__(self, signals="TERM,USR1", save_minutes=0.0, log=print, clock=None, check_every=CHECK_EVERY,
                 failure=None):
        self.signals = parse_signals(signals)
        if save_minutes < 0:
            raise ValueError(f"--save_minutes must be >= 0, got {save_minutes}")
        self.save_seconds = 60.0 * save_minutes
        self.log, self.clock = log, clock or CLOCK
        self.world_size = dist_util.get_world_size()
        self.check_every = check_every if self.world_size > 1 else 1
        self.group = dist_util.cpu_group()  # None: the default group (gloo) or one process
        self.received = []  # signal numbers caught here, in order
        self.stopped_at = None  # the agreed stop step, once there is one
        self.failure = failure or (lambda: None)  # what failed on this rank (a log write), or None
        self.failed = False  # whether the stop is for a failure on some rank, not a signal
        self._last_save = self.clock()
        self._previous = {}

    @classmethod
    def of(cls, config, logger):
        """The StopRequest of a TrainConfig's --stop_signals and --save_minutes."""
        return cls(config.stop_signals, config.save_minutes, log=logger.log, failure=lambda: logger.write_error)

    def __enter__(self):
        if self.signals and threading.current_thread() is not threading.main_thread():
            self.log("note: --stop_signals is off outside the main thread (Python handles signals there only)")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._catch)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.stopped_at is None:
            self.restore()
        elif exc_type is None and self.failed:  # the checkpoint is written; the failure ends the run
            if not dist_util.is_main():
                raise SystemExit(2)  # rank 0 says why
            raise RunWriteError(f"{self.failure() or 'a write failed on another rank'}; a checkpoint of step "
                                f"{self.stopped_at} was written: free space and run the same command again "
                                "to continue from it")
        elif exc_type is None:  # the stop checkpoint is written: leave with EXIT_CODE
            extra = len(self.received) - 1
            self.log(f"stopped at step {self.stopped_at} with a checkpoint"
                     + (f" ({extra} later signal(s) ignored)" if extra > 0 else "")
                     + f"; exit code {EXIT_CODE}: run the same command to continue")
            raise Stopped(self.stopped_at, self._cause())
        return False

    def restore(self):
        """The handlers from before `__enter__` (a stopped process keeps ignoring the signals
        until it exits: the stop is under way)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: not set from Python
        self._previous = {}

    def _catch(self, signum, frame):
        self.received.append(signum)  # nothing else in a handler: the loop acts on it at a step's end

    def _cause(self):
        return signal.Signals(self.received[0]).name if self.received else "a stop signal on another rank"

    def due(self, step):
        """'stop', 'save' or None after `step` updates; the same answer on every rank."""
        if self.stopped_at is not None:
            return "stop"
        if step % self.check_every:
            return None
        stop, failed = bool(self.received), self.failure() is not None
        save = bool(self.save_seconds) and dist_util.is_main() and self.clock() - self._last_save >= self.save_seconds
        if self.world_size > 1:
            flags = torch.tensor([float(stop), float(save), float(failed)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            stop, save, failed = bool(flags[0]), bool(flags[1]), bool(flags[2])
        if failed:
            self.stopped_at, self.failed = step, True
            self.log(f"{self.failure() or 'a write failed on another rank'}: saving a checkpoint at step {step} "
                     "on every rank, then stopping")
            return "stop"
        if stop:
            self.stopped_at = step
            self.log(f"{self._cause()}: saving a checkpoint at step {step} on every rank, then exiting "
                     f"with code {EXIT_CODE} (--stop_signals)")
            return "stop"
        if save:
            self._last_save = self.clock()
            return "save"
        return None
