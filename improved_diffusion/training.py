"""
From the options table's values to a TrainLoop: the one path that `scripts/image_train.py`
and `scripts/benchmark.py` share, so that the benchmark times what training runs.

`opts` is a dict of option values (`vars(args)` of a parser made from `config.py`).
"""

import dataclasses
import random

import numpy as np
import torch

from . import config, precision
from .image_datasets import BatchStream
from .momentum_decay import MomentumSchedule
from .resample import create_named_schedule_sampler
from .script_util import create_model_and_diffusion
from .train_util import TrainConfig, TrainLoop, parse_ema_rates


def model_options(opts):
    """The model and diffusion flags; mixed precision comes from autocast (--precision)."""
    kwargs = {k: opts[k] for k in config.names(*config.MODEL_GROUPS)}
    kwargs["use_fp16"] = False
    return kwargs


def momentum_schedule(opts):
    return MomentumSchedule(
        momentum_decay=opts["momentum_decay"],
        lr_compensation=opts["lr_compensation"],
        beta_init=opts["md_beta_init"],
        beta_min=opts["md_beta_min"],
        total_steps=opts["total_steps"] or opts["lr_anneal_steps"] or None,
    )


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
    name, kwargs = opts["schedule_sampler"], {}
    if name == "clts":
        kwargs = dict(mu=opts["clts_mu"], sigma=opts["clts_sigma"], target_steps=opts["clts_target_steps"],
                      lambda_max=opts["clts_lambda_max"], importance_weighting=opts["clts_importance_weighting"])
    elif name == "speed":
        kwargs = dict(tau=opts["speed_tau"], k=opts["speed_k"], lam=opts["speed_lambda"])
    elif name == "lognormal":
        kwargs = dict(mean=opts["lognormal_mean"], std=opts["lognormal_std"])
    return create_named_schedule_sampler(name, diffusion, **kwargs)


def loss_weighting(opts):
    """The loss-weighting options of the diffusion factory (Min-SNR-gamma, P2)."""
    return dict(min_snr_gamma=opts["min_snr_gamma"], p2_gamma=opts["p2_gamma"], p2_k=opts["p2_k"])


def check(opts, device):
    """
    Build everything that checks option values, without weights or data: the TrainConfig,
    the schedules, the diffusion and its timestep sampler, the model on the meta device.
    A bad value fails here, before any expensive work. Returns the TrainConfig.
    """
    cfg = train_config(opts, device)
    with torch.device("meta"):
        _, diffusion = create_model_and_diffusion(**model_options(opts), **loss_weighting(opts))
    schedule_sampler(opts, diffusion)
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
    """The model (identical initial weights on every rank: seeded by --seed) and the diffusion."""
    torch.manual_seed(opts["seed"])
    model, diffusion = create_model_and_diffusion(**model_options(opts), **loss_weighting(opts))
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
    )
