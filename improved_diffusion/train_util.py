"""
The training loop: one optimizer step per batch, in named phases.

Fixes the originals' known faults: every rank loads checkpoints itself (no rank-0-only
collective, so resuming on several GPUs does not hang); `--resume auto` finds the newest
*intact* checkpoint and says so when it starts from scratch; microbatch gradients are
averaged exactly, so `--microbatch` never changes the update; mixed precision is
`torch.autocast` (bf16, or fp16 with a GradScaler) over fp32 parameters; a non-finite
loss or gradient skips the step, and too many in a row stop the run with a clear message.
"""

import inspect
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .run import checkpoint as ckpt
from .options import config as options
from . import dist_util
from . import logger as logger_module
from .run import precision
from .run.ema import EMA, PowerEMA
from .image_datasets import to_model_input
from .logger import Logger
from .methods.momentum import MomentumSchedule
from .run.precision import MixedPrecision
from .resample import UniformSampler
from .run.preemption import StopRequest
from .run.run_dir import RunDir

PRECISIONS = ("fp32", "bf16", "fp16", "fp64")  # resolved: precision.resolve turns "auto" into one of these


def _default(name):
    """An option's default from the options table (config.py), the one place it is written."""
    return field(default=options.BY_NAME[name].default)


@dataclass
class TrainConfig:
    """What TrainLoop needs of the options (image_train.py's table, docs/train-help.txt)."""

    batch_size: int = _default("batch_size")
    microbatch: int = _default("microbatch")
    lr: float = _default("lr")
    weight_decay: float = _default("weight_decay")
    lr_anneal_steps: int = _default("lr_anneal_steps")
    lr_warmup_steps: int = _default("lr_warmup_steps")  # linear warm-up of the lr (0: off)
    total_steps: Optional[int] = None  # stop after this many optimizer steps (None: never)
    stop_at: Optional[int] = None  # leave this run at this step, schedules unchanged (job time limits)
    ema_rate: tuple = field(default_factory=lambda: parse_ema_rates(options.BY_NAME["ema_rate"].default))
    ema_warmup: bool = _default("ema_warmup")  # decay min(rate, (1+k)/(10+k)) at step k
    phema_stds: tuple = _default("phema_stds")  # power-function EMAs' relative stds (a tuple once built)
    phema_snapshot_interval: int = _default("phema_snapshot_interval")  # 0: every save_interval
    log_interval: int = _default("log_interval")
    save_interval: int = _default("save_interval")
    keep_checkpoints: int = _default("keep_checkpoints")
    precision: str = "fp32"  # fp32, bf16 (autocast), fp16 (autocast + loss scaling) or fp64 (reference)
    fp16_scale_growth: float = _default("fp16_scale_growth")
    grad_clip: float = _default("grad_clip")
    max_nonfinite_steps: int = _default("max_nonfinite_steps")
    adam_beta2: float = _default("adam_beta2")
    momentum: MomentumSchedule = field(default_factory=MomentumSchedule)
    channels_last: bool = _default("channels_last")
    compile: bool = _default("compile")
    compile_mode: str = _default("compile_mode")
    optimizer_impl: str = _default("optimizer_impl")
    eval_interval: int = _default("eval_interval")
    stop_signals: str = _default("stop_signals")  # save at an agreed step and exit 75 on these (run/preemption.py)
    save_minutes: float = _default("save_minutes")  # also save by rank 0's clock (0: off)
    progress: bool = True  # a progress bar on interactive terminals

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"--batch_size must be positive, got {self.batch_size}")
        if self.microbatch > self.batch_size:
            raise ValueError(f"--microbatch {self.microbatch} is larger than --batch_size {self.batch_size}")
        if self.microbatch == 0 or self.microbatch < -1:
            raise ValueError(f"--microbatch must be positive or -1 (no split), got {self.microbatch}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer_impl not in options.OPTIMIZER_IMPLS:
            raise ValueError(f"--optimizer_impl must be one of {options.OPTIMIZER_IMPLS}, got {self.optimizer_impl!r}")
        for rate in self.ema_rate:
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"--ema_rate values must be in [0, 1), got {rate}")
        if self.log_interval <= 0 or self.save_interval <= 0:
            raise ValueError("--log_interval and --save_interval must be positive")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"--total_steps must be positive, got {self.total_steps}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"--lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        self.phema_stds = parse_phema_stds(self.phema_stds)

    def snapshot_due(self, step):
        """Whether a power-function EMA snapshot is written after `step` updates."""
        return bool(self.phema_stds) and step % (self.phema_snapshot_interval or self.save_interval) == 0

    def end_step(self):
        """The step this run stops at: --total_steps (else --lr_anneal_steps), capped by
        --stop_at; None: never."""
        total = self.total_steps if self.total_steps is not None else (self.lr_anneal_steps or None)
        if self.stop_at is not None:
            total = min(total, self.stop_at) if total is not None else self.stop_at
        return total

    def base_lr(self, step):
        """
        The ordinary schedule at global step `step`: constant, or the original's linear anneal
        to 0, times the linear warm-up min(1, (step + 1) / lr_warmup_steps) when that is on.
        """
        lr = self.lr
        if self.lr_anneal_steps:
            lr *= 1.0 - min(step / self.lr_anneal_steps, 1.0)
        if self.lr_warmup_steps:
            lr *= min(1.0, (step + 1) / self.lr_warmup_steps)
        return lr

    @classmethod
    def from_original_options(
        cls, *, batch_size, microbatch, lr, ema_rate, log_interval, save_interval, use_fp16=False,
        fp16_scale_growth=1e-3, weight_decay=0.0, lr_anneal_steps=0,
    ):
        """The keywords of the original `TrainLoop` (improved- and guided-diffusion)."""
        return cls(
            batch_size=batch_size, microbatch=microbatch, lr=lr, ema_rate=parse_ema_rates(ema_rate),
            log_interval=log_interval, save_interval=save_interval,
            precision="fp16" if use_fp16 else "fp32", fp16_scale_growth=fp16_scale_growth,
            weight_decay=weight_decay, lr_anneal_steps=lr_anneal_steps,
        )


def parse_ema_rates(text):
    """'0.9999,0.999' -> (0.9999, 0.999); the rate's text is kept for file names."""
    if isinstance(text, (tuple, list)):
        return tuple(float(r) for r in text)
    try:
        return tuple(float(r) for r in str(text).split(",") if r.strip())
    except ValueError:
        raise ValueError(f"--ema_rate must be a comma-separated list of numbers, got {text!r}") from None


def parse_phema_stds(value):
    """'0.05,0.1' -> (0.05, 0.1); a string is checked by the table's option (ValueError naming
    --phema_stds), a sequence by PowerEMA."""
    if isinstance(value, (tuple, list)):
        return tuple(float(s) for s in value)
    options.BY_NAME["phema_stds"].validate(value)
    return tuple(float(s) for s in str(value).split(",") if s.strip())


class NonFiniteError(RuntimeError):
    pass


class TrainLoop:
    """
    Trains `model` on batches from `data` with the diffusion loss.

    :param model: the denoiser (unwrapped); its `state_dict()` is what checkpoints hold.
    :param diffusion: a GaussianDiffusion (or SpacedDiffusion) giving `training_losses`.
    :param data: an iterator of (uint8 NCHW batch, condition dict), e.g. a BatchStream;
        its `state_dict()` / `load_state_dict()`, when present, make resume exact.
    :param config: a TrainConfig.
    :param schedule_sampler: the timestep sampler (default uniform); CLTS gets `set_step(k)`.
    :param log_dir: a folder, or the RunDir (run_dir.py) that saves and finds checkpoints.
    :param resume: "auto" (newest intact checkpoint in log_dir, if any), "none", or a path
        to a checkpoint file (`modelNNNNNN.pt` / `stateNNNNNN.pt`) or a directory.
    :param evaluator: optional callable(ema_model, step) -> dict of metrics, run every
        `config.eval_interval` steps on every rank (e.g. FID of the EMA model).
    :param run_config: a JSON-able dict of the run's options, stored in state files.
    :param noise_transform: optional `(x_start, noise) -> (noise, input_noise)` applied to the
        whole batch's noise where it is drawn (`methods.noise_transform`: immiscible
        assignment, input perturbation); None: the noise is used as drawn.

    The original keyword form also works: `TrainLoop(model=, diffusion=, data=, batch_size=,
    microbatch=, lr=, ema_rate=, log_interval=, save_interval=, resume_checkpoint=, ...)`
    instead of `config=`; it writes to the module logger's directory, as the original.
    """

    def __init__(self, *, model, diffusion, data, config: Optional[TrainConfig] = None, schedule_sampler=None,
                 log_dir=None, resume="auto", logger: Optional[Logger] = None, evaluator: Optional[Callable] = None,
                 run_config: Optional[dict] = None, noise_transform: Optional[Callable] = None, **original_options):
        if config is None:
            resume = original_options.pop("resume_checkpoint", "") or "none"
            config = TrainConfig.from_original_options(**original_options)
            log_dir = log_dir or logger_module.get_dir()
            logger = logger or logger_module.get_current()
        elif original_options:
            raise TypeError(f"TrainLoop takes config= or the original options, not both: {sorted(original_options)}")
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.config = config
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.run_dir = log_dir if isinstance(log_dir, RunDir) else RunDir(log_dir, logger or Logger(log_dir))
        self.logger = logger or self.run_dir.logger
        self.evaluator = evaluator
        self.run_config = run_config or {}
        self.noise_transform = noise_transform
        self.device = next(model.parameters()).device
        self.rank = dist_util.get_rank()
        self.world_size = dist_util.get_world_size()
        self.microbatch = config.microbatch if config.microbatch > 0 else config.batch_size
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.step = 0
        self.last_saved_step = None

        self.input_dtype = precision.param_dtype(config.precision)
        if config.precision == "fp64":
            self.model.to(torch.float64)  # a no-op for models built in float64 (training.build_model)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.nonfinite = NonFiniteSteps(self.device)
        self.opt = make_adamw(self.params, config, self.device)
        self.mixed = MixedPrecision(config.precision, self.device, self.opt, config.fp16_scale_growth)
        self.ema = EMA(self.model, config.ema_rate)
        self.phema = PowerEMA(self.model, config.phema_stds) if config.phema_stds else None

        self._resume(resume)
        self._interval_start = (time.perf_counter(), self.step)
        self._eval_seconds = 0.0  # spent in evaluate() since the last dump

        self.ddp_model = _distributed(self.model, self.device, self.world_size)
        self.train_model = torch.compile(self.ddp_model, mode=config.compile_mode) if config.compile else self.ddp_model

    # Names kept from the first layout of this class (tests and user code read them).
    ema_params = property(lambda self: self.ema.params)
    scaler = property(lambda self: self.mixed.scaler)
    nonfinite_streak = property(lambda self: self.nonfinite.streak)

    def nonfinite_counts(self, reset):
        return self.nonfinite.read(reset)

    def ema_state_dict(self, index=0):
        return self.ema.state_dict(index)

    def ema_model(self, index=0):
        return self.ema.eval_model(index)

    # ------------------------------------------------------------------ schedules

    def ema_rates(self, step):
        """Each EMA's decay for the update at global step `step` (ramped with --ema_warmup)."""
        return self.ema.rates_at(step, self.config.ema_warmup)

    def schedules(self, step):
        """lr (anneal x warm-up x LRC), beta1 (MD), the sampler's curriculum values and, with
        --ema_warmup, the first EMA's decay, at global step `step`."""
        momentum = self.config.momentum
        ema = {"ema_decay": self.ema_rates(step)[0]} if self.config.ema_warmup else {}
        return {
            "lr": self.config.base_lr(step) * momentum.lr_factor(step),
            "beta1": momentum.beta1(step),
            **self.schedule_sampler.schedule_values(step),
            **ema,
        }

    # ------------------------------------------------------------------ the loop

    def run_loop(self):
        """Train until `total_steps` (or forever), then save a final checkpoint; a --stop_signals signal
        saves at a step all ranks agree on and raises Stopped (exit 75; run/preemption.py)."""
        total = self.config.end_step()
        if total is not None and self.step >= total:
            self.logger.log(f"nothing to train: the run is at step {self.step}, and --total_steps / --stop_at "
                            f"end it at step {total}")
        bar = _progress_bar(total, self.step) if self.config.progress else None
        self._interval_start = (time.perf_counter(), self.step)
        with StopRequest.of(self.config, self.logger) as stop:
            while total is None or self.step < total:
                batch, cond = next(self.data)
                self.run_step(batch, cond)
                self.step += 1
                if bar is not None:
                    bar.update(1)
                evaluated = self.config.eval_interval and self.evaluator and self.step % self.config.eval_interval == 0
                if evaluated:
                    self.evaluate()
                if evaluated or self.step % self.config.log_interval == 0:
                    self.dump_logs()
                due = stop.due(self.step)  # "stop", "save" or None: the same on every rank
                if due or self.step % self.config.save_interval == 0:
                    self.save()
                if self.config.snapshot_due(self.step):
                    self.run_dir.save_snapshot(self.step, self.phema.state_dict)
                if due == "stop":
                    break
            if bar is not None:
                bar.close()
            if self.last_saved_step != self.step:
                self.save()
            if self.logger.pending:
                self.dump_logs()

    def run_step(self, batch, cond):
        """One optimizer update at global step `self.step`."""
        if self.config.compile:  # CUDA graphs (reduce-overhead) may reuse last step's buffers now
            torch.compiler.cudagraph_mark_step_begin()
        sched = self.schedules(self.step)  # MD, LRC and CLTS, set before anything is drawn
        for group in self.opt.param_groups:
            group["lr"], group["betas"] = sched["lr"], (sched["beta1"], group["betas"][1])
        self.schedule_sampler.set_step(self.step)
        for key, value in sched.items():
            self.logger.logkv(key, value)

        x = to_model_input(batch, self.device, self.input_dtype).contiguous(memory_format=self.memory_format)
        cond = {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}
        # Timesteps and noise for the whole batch (so --microbatch changes nothing); the noise
        # is drawn in NCHW order, so the memory format never changes it either. The noise
        # methods (immiscible, input perturbation) change it here, on the whole batch too.
        t, weights = self.schedule_sampler.sample(x.shape[0], self.device)
        noise, input_noise = draw_noise(x, self.noise_transform, self.memory_format)
        cond = draw_label_drop(self.model, cond)
        self.opt.zero_grad(set_to_none=True)
        for start in range(0, x.shape[0], self.microbatch):
            self._accumulate(slice(start, start + self.microbatch), x, cond, t, weights, noise, input_noise)

        # The update is skipped when the loss or a gradient is not finite, decided on the device.
        self.mixed.unscale_()
        grad_norm = grad_norm_and_clip(self.params, self.config.grad_clip)
        finite = torch.isfinite(grad_norm)
        self.mixed.step(finite)
        self.ema.update(finite, self.ema_rates(self.step))
        if self.phema is not None:  # the same mask: a skipped update does not count (run/ema.py)
            self.phema.update(finite)
        self.logger.logkv_sum("grad_norm", torch.where(finite, grad_norm, 0.0), finite)
        self.nonfinite.count(finite)

    def _accumulate(self, piece, x, cond, t, weights, noise, input_noise=None):
        """Backward of one microbatch, its loss weighted by its share of the batch, so the
        gradient is that of the batch mean whatever --microbatch is."""
        n_total = x.shape[0]
        micro, t, weights = x[piece], t[piece], weights[piece]
        mse_weights = None
        if getattr(self.schedule_sampler, "weights_mse_only", False):  # SpeeD's: on the MSE term alone
            mse_weights, weights = weights, torch.ones_like(weights)
        last = piece.stop >= n_total
        sync = nullcontext() if last or self.world_size == 1 else self.ddp_model.no_sync()
        with sync:
            with self.mixed.autocast():
                losses = self.diffusion.training_losses(
                    self.train_model, micro, t, model_kwargs={k: v[piece] for k, v in cond.items()},
                    noise=noise[piece], input_noise=None if input_noise is None else input_noise[piece],
                    mse_weights=mse_weights,
                )
            self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())  # loss-aware ones learn
            loss = (losses["loss"].float() * weights).mean() * (micro.shape[0] / n_total)
            log_losses(self.logger, t, losses, weights, self.diffusion.num_timesteps)
            self.mixed.backward(loss)

    def _stop_if_diverged(self, worst_streak):
        """Checked at every log interval and save, so a streak is noticed within --log_interval;
        the run directory marks the run and says how to continue from before the streak."""
        if worst_streak >= self.config.max_nonfinite_steps:
            raise NonFiniteError(
                f"{worst_streak} non-finite steps in a row (limit --max_nonfinite_steps "
                f"{self.config.max_nonfinite_steps}) by step {self.step}: the run has diverged. "
                + self.run_dir.mark_diverged(self.step, worst_streak)
            )

    def dump_logs(self):
        now = time.perf_counter()
        start_time, start_step = self._interval_start
        steps = self.step - start_step
        self.logger.logkv("step", self.step)
        self.logger.logkv("samples", self.step * self.config.batch_size * self.world_size)
        if steps > 0:  # training throughput: evaluation time is not counted
            seconds = now - start_time - self._eval_seconds
            self.logger.logkv("images_per_sec", steps * self.config.batch_size * self.world_size / seconds)
        skipped, worst_streak = self.nonfinite_counts(reset=True)
        self.logger.logkv("skipped_steps", skipped)
        if skipped:
            self.logger.log(f"{skipped} update(s) skipped up to step {self.step}: non-finite loss or gradient")
        if self.scaler is not None:
            self.logger.logkv("loss_scale", self.scaler.get_scale())
        self.logger.dumpkvs()
        self._interval_start = (time.perf_counter(), self.step)
        self._eval_seconds = 0.0
        self._stop_if_diverged(worst_streak)

    def evaluate(self):
        start = time.perf_counter()
        metrics = self.evaluator(self.ema_model(0), self.step)
        self._eval_seconds += time.perf_counter() - start
        for key, value in (metrics or {}).items():
            self.logger.logkv(key, value)
        self.logger.log(f"eval at step {self.step}: {metrics}")

    # ------------------------------------------------------------------ checkpoints

    def save(self):
        """The checkpoint of this step (rank 0 writes it, atomically); every rank must call this."""
        if self.run_dir.path is None:
            return
        self._stop_if_diverged(self.nonfinite_counts(reset=False)[1])
        rank_states = dist_util.all_gather_objects(ckpt.rank_state(self.data))

        def contents():
            _refuse_nonfinite(self.params + self.ema.all_tensors(), self.step)
            files = {ckpt.model_name(self.step): self.model.state_dict()}
            for i, rate in enumerate(self.config.ema_rate):
                files[ckpt.ema_name(rate, self.step)] = self.ema.state_dict(i)
            files[ckpt.opt_name(self.step)] = self.opt.state_dict()
            if self.phema is not None:
                files[ckpt.phema_name(self.step)] = self.phema.state_dict()
            return files, {
                "world_size": self.world_size,
                "ranks": rank_states,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "sampler": self.schedule_sampler.state_dict(),
                "schedules": self.schedules(self.step),
                "nonfinite_streak": self.nonfinite_streak,
                "ema_rate": list(self.config.ema_rate),
                "config": _plain(self.run_config),
            }

        self.run_dir.save(self.step, contents, keep=self.config.keep_checkpoints)
        self.last_saved_step = self.step

    def _resume(self, resume):
        """Model, every EMA (from the weights when a named file has none), optimizer and, with
        the state file, the rest, on every rank; the run directory finds and reads the files."""
        found = self.run_dir.find(resume)
        if found is None:
            return
        step, read = found.step, self.run_dir.read
        weights = read(found, found.weights_file or ckpt.model_name(step), "model", fits=self.model)
        self.model.load_state_dict(weights, strict=True)
        for i, rate in enumerate(self.config.ema_rate):
            ema_state = read(found, ckpt.ema_name(rate, step), f"EMA (rate {rate})", optional=True, fits=self.model)
            self.ema.load_state_dict(i, weights if ema_state is None else ema_state)
        if self.phema is not None:
            resume_power_ema(self.phema, self.run_dir, found, self.logger)
        opt_state = read(found, ckpt.opt_name(step), "optimizer", optional=True)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)
        self.step = step
        state = found.state or {}
        if state.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if state.get("sampler") is not None:
            self.schedule_sampler.load_state_dict(state["sampler"])
        self.nonfinite.restore(int(state.get("nonfinite_streak", 0)))
        mine = self.run_dir.rank_state(found)
        if mine is not None:
            ckpt.set_rank_state(mine, self.data)
        self.last_saved_step = step if found.state is not None else None
        self.run_dir.resumed(found, _plain(self.run_config))


class NonFiniteSteps:
    """Skipped updates and the longest non-finite streak, counted on the device (identical on
    every rank, the skip being decided there) and read at log intervals with one host sync."""

    def __init__(self, device):
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.current = torch.zeros((), dtype=torch.long, device=device)
        self.worst = torch.zeros((), dtype=torch.long, device=device)

    def count(self, finite):
        bad = (~finite).long()
        self.skipped = self.skipped + bad
        self.current = (self.current + 1) * bad
        self.worst = torch.maximum(self.worst, self.current)

    @property
    def streak(self):
        """Non-finite steps in a row up to now (reads the device counter)."""
        return int(self.current)

    def read(self, reset):
        """(skipped steps, longest streak) since the last reset."""
        skipped, worst = torch.stack([self.skipped, self.worst]).tolist()
        if reset:
            self.skipped.zero_()
            self.worst.copy_(self.current)
        return skipped, worst

    def restore(self, streak):
        """The streak a checkpoint was written in (a resumed run continues counting it)."""
        self.current.fill_(streak)
        self.worst.copy_(self.current)


def draw_noise(x, transform, memory_format):
    """The batch's noise, drawn in NCHW order (so the memory format never changes it), then
    changed by the noise methods (immiscible, input perturbation) on the whole batch:
    (the noise the loss regresses, the noise that makes x_t or None when they are the same)."""
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    input_noise = None
    if transform is not None:
        noise, input_noise = transform(x, noise)
        input_noise = input_noise.contiguous(memory_format=memory_format)
    return noise.contiguous(memory_format=memory_format), input_noise


def draw_label_drop(model, cond):
    """`cond` with classifier-free guidance's label drop (--class_dropout_prob) for the whole
    batch, drawn beside its noise, so that --microbatch never changes which labels are dropped
    (the model would draw it per microbatch): the model's `drop_labels`."""
    p = getattr(model, "class_dropout_prob", 0.0)
    if p <= 0 or "y" not in cond or not model.training:
        return cond
    return {**cond, "drop_labels": torch.rand(cond["y"].shape, device=cond["y"].device) < p}


def grad_norm_and_clip(params, grad_clip):
    """The global gradient norm; clips to `grad_clip` only when it is positive (no extra pass)."""
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def log_losses(logger, t, losses, weights, num_timesteps):
    """Mean of each loss term times its sampler weight, overall and per timestep quartile,
    as the original logs them, in a handful of device ops (a NaN stays in its quartile)."""
    keys = list(losses)
    values = torch.stack([losses[k].detach().float() for k in keys]) * weights  # (terms, batch)
    rows = torch.cat([values, torch.ones_like(values[:1])])  # a last row of ones counts
    quartile = (4 * t // num_timesteps).clamp_(0, 3).expand_as(rows)
    per_quartile = rows.new_zeros(len(rows), 4).scatter_add_(1, quartile, rows)
    totals = torch.cat([rows.sum(1, keepdim=True), per_quartile], dim=1)  # (terms + 1, 5)
    names = [name for k in keys for name in (k, f"{k}_q0", f"{k}_q1", f"{k}_q2", f"{k}_q3")]
    counts = totals[-1].repeat(len(keys))
    logger.logkv_sums(names, totals[:-1].flatten(), counts)


def resume_power_ema(phema, run_dir, found, logger):
    """The power-function EMAs of checkpoint `found`; a checkpoint without them (a run that
    tracked none) starts them there: they then average the updates from that step on."""
    name = ckpt.phema_name(found.step)
    if name in (found.state or {}).get("files", {}):
        phema.load_state_dict(run_dir.read(found, name, "power-function EMA"))
    else:
        logger.log(f"WARNING: checkpoint {found.step:06d} has no power-function EMAs: they start at "
                   "this step and average the updates from here on")


def _refuse_nonfinite(tensors, step):
    norms = torch.stack([t.detach().float().norm() for t in tensors])
    if not torch.isfinite(norms).all():
        raise NonFiniteError(f"refusing to write a checkpoint with non-finite weights at step {step}")


def _progress_bar(total, initial):
    """A progress bar on interactive terminals (rank 0), else None."""
    if not (dist_util.is_main() and sys.stdout.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _distributed(model, device, world_size):
    """DDP around `model` on several ranks. Its parameters are identical on every rank here
    (same seed or same checkpoint); DDP broadcasts rank 0's anyway."""
    if world_size == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=128,
               find_unused_parameters=False, **_no_buffer_sync())


def _no_buffer_sync():
    """DDP's keyword for "do not sync buffers in forward" (the UNet has none to sync): newer
    torch renamed `broadcast_buffers` and warns once per rank about the old name."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def make_adamw(params, config, device):
    """AdamW with the kernel of --optimizer_impl (auto: fused where torch has it, else foreach)."""
    impl = config.optimizer_impl
    if impl == "auto":
        impl = "fused" if _fused_adamw_works(device) else "foreach"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}[impl]
    betas = (config.momentum.beta_init, config.adam_beta2)
    return torch.optim.AdamW(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay, **kernel)


def _fused_adamw_works(device):
    """Whether this torch has a fused AdamW kernel for `device` (CUDA; CPU from torch 2.4)."""
    try:
        probe = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.AdamW([probe], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def _plain(obj):
    """Keep only what loads with weights_only=True: dicts, lists, str, numbers, bools, None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "__dataclass_fields__"):
        return _plain(asdict(obj))
    return str(obj)
