"""
From the options table's values to a TrainLoop: the one path that `scripts/image_train.py`
and `scripts/benchmark.py` share, so that the benchmark times what training runs.

`opts` is a dict of option values (`vars(args)` of a parser made from `config.py`).
"""

import dataclasses
import random

import numpy as np
import torch

from ..options import config
from .. import methods
from . import precision
from ..image_datasets import BatchStream
from ..script_util import create_model_and_diffusion
from ..train_util import TrainConfig, TrainLoop, parse_ema_rates


def model_options(opts):
    """The model and diffusion flags; mixed precision comes from autocast (--precision)."""
    kwargs = {k: opts[k] for k in config.names(*config.MODEL_GROUPS)}
    kwargs["use_fp16"] = False
    return kwargs


def momentum_schedule(opts):
    """MD / LRC (improved_diffusion/methods/momentum.py) over the planned steps."""
    total_steps = opts["total_steps"] or opts["lr_anneal_steps"] or None
    return methods.build_optimizer_schedule("mdlrc", opts, total_steps=total_steps)


def train_config(opts, device, progress=True):
    """
    The TrainConfig of `opts` (its constructor checks the values it holds): every field named
    like an option takes that option's value, so a new option needs no line here; the few
    below are converted (0 means "none", a rate list, "auto" resolved, the MD schedule).
    """
    values = {f.name: opts[f.name] for f in dataclasses.fields(TrainConfig) if f.name in opts}
    values.update(
        total_steps=opts["total_steps"] or None,
        stop_at=opts["stop_at"] or None,
        ema_rate=parse_ema_rates(opts["ema_rate"]),
        precision=precision.resolve(opts["precision"], device, use_fp16=opts["use_fp16"]),
        momentum=momentum_schedule(opts),
        progress=progress,
    )
    return TrainConfig(**values)


def schedule_sampler(opts, diffusion):
    """The registered timestep sampler --schedule_sampler with its options from `opts`."""
    return methods.build_sampler(opts["schedule_sampler"], diffusion, opts)


def noise_transform(opts):
    """The registered noise methods switched on in `opts` (immiscible, input perturbation),
    composed; None when none is on."""
    return methods.noise_transform(opts)


def loss_weighting(opts):
    """The options of every registered loss weighting, keywords of the diffusion factory."""
    return {name: opts[name] for name in methods.option_names(methods.WEIGHTING)}


def check(opts, device):
    """
    Build everything that checks option values, without weights or data: the TrainConfig,
    the schedules, the diffusion and its timestep sampler, the model on the meta device.
    A bad value fails here, before any expensive work. Returns the TrainConfig.
    """
    cfg = train_config(opts, device)
    if cfg.precision == "fp64" and opts.get("eval_interval"):
        raise ValueError("--precision fp64 is a reference run without evaluation: drop --eval_interval "
                         "(the evaluator samples in float32)")
    with torch.device("meta"):
        _, diffusion = create_model_and_diffusion(**model_options(opts), **loss_weighting(opts))
    schedule_sampler(opts, diffusion)
    noise_transform(opts)  # e.g. --immiscible without scipy fails here
    return cfg


def apply_device_settings(opts, device):
    """Process-wide settings of the gpu group (cuDNN autotuning)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = bool(opts["cudnn_benchmark"])


def seed_everything(seed):
    """Seed every generator a training step draws from (torch; numpy for the original samplers)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_model(opts, device):
    """
    The model (identical initial weights on every rank: seeded by --seed) and the diffusion.
    Under --precision fp64 the weights are drawn in float64, so that no float32 rounding of
    the CPU's kernels enters the reference run.
    """
    torch.manual_seed(opts["seed"])
    dtype = precision.param_dtype(precision.resolve(opts["precision"], device, use_fp16=opts["use_fp16"]))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model, diffusion = create_model_and_diffusion(**model_options(opts), **loss_weighting(opts))
    finally:
        torch.set_default_dtype(default)
    return model.to(device), diffusion


def build_loop(opts, model, diffusion, dataset, device, *, rank=0, world_size=1, log_dir=None, logger=None,
               resume="none", evaluator=None, run_config=None, progress=True):
    """The data stream, the per-rank seeding, the timestep sampler and the TrainLoop of `opts`."""
    data = BatchStream(
        dataset, opts["batch_size"], rank=rank, world_size=world_size, seed=opts["seed"],
        random_flip=opts["random_flip"], device=device if opts["data_on_device"] else None,
    )
    seed_everything(opts["seed"] * world_size + rank + 1)  # a different stream per rank from here
    return TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        config=train_config(opts, device, progress),
        schedule_sampler=schedule_sampler(opts, diffusion),
        log_dir=log_dir,
        resume=resume,
        logger=logger,
        evaluator=evaluator,
        run_config=run_config,
        noise_transform=noise_transform(opts),
    )
