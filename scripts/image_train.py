"""
Train a diffusion model on images.

    # one process (CPU or one GPU)
    python scripts/image_train.py --data_dir data/demo/train.npz --log_dir runs/demo \
        --config configs/demo.json

    # 8 GPUs on one node, with MPI (as the original) or torchrun
    mpiexec -n 8 python scripts/image_train.py --config configs/cifar10_all.json \
        --data_dir data/cifar10/train --log_dir runs/cifar10_all
    torchrun --nproc_per_node 8 scripts/image_train.py --config configs/cifar10_all.json ...

A killed run continues where it was with the same command (`--resume auto` is the
default). Flags override the `--config` file; the effective options are printed and saved
as `config.json` in the log dir. `--dry_run True` stops after printing them.
"""

import argparse
import datetime
import json
import os
import random

import numpy as np
import torch

from improved_diffusion import dist_util
from improved_diffusion.image_datasets import BatchStream, load_image_dataset
from improved_diffusion.logger import Logger
from improved_diffusion.momentum_decay import MomentumSchedule
from improved_diffusion.resample import create_named_schedule_sampler
from improved_diffusion.script_util import (
    read_json_options,
    run_main,
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from improved_diffusion.train_util import NonFiniteError, TrainConfig, TrainLoop, parse_ema_rates

# Options of this script beyond the model and diffusion flags, with their help text.
TRAIN_OPTIONS = {
    # the original's flags
    "data_dir": ("", "image folder (recursive) or .npz of uint8 images to train on"),
    "schedule_sampler": ("uniform", "timestep sampler: uniform, loss-second-moment or clts"),
    "lr": (1e-4, "base learning rate"),
    "weight_decay": (0.0, "AdamW weight decay"),
    "lr_anneal_steps": (0, "linear decay of the lr to 0 over this many steps (0: constant)"),
    "batch_size": (1, "images per rank per step (global batch = this x ranks)"),
    "microbatch": (-1, "split each batch into pieces of this size to save memory (-1: off)"),
    "ema_rate": ("0.9999", "comma-separated EMA rates, one EMA checkpoint per rate"),
    "log_interval": (10, "steps between metric dumps"),
    "save_interval": (10000, "steps between checkpoints"),
    "resume_checkpoint": ("", "a modelNNNNNN.pt to resume from (same as --resume PATH)"),
    "fp16_scale_growth": (1e-3, "fp16: the loss scale doubles after 1/this clean steps"),
    # ours
    "config": ("", "JSON file of option values; command-line flags override it"),
    "log_dir": ("", "where logs and checkpoints go (default $OPENAI_LOGDIR, else runs/<time>)"),
    "resume": ("auto", "auto (newest intact checkpoint in --log_dir), none, or a checkpoint path"),
    "total_steps": (0, "stop after this many optimizer steps (0: --lr_anneal_steps, or never)"),
    "stop_at": (0, "leave this run at this step with a checkpoint; schedules keep --total_steps (0: off)"),
    "precision": ("auto", "fp32, bf16, fp16 or auto (bf16 on GPUs that have it, else fp32)"),
    "seed": (0, "seed of weights, data order, timesteps and noise"),
    "grad_clip": (0.0, "clip the global gradient norm to this (0: off)"),
    "keep_checkpoints": (0, "keep only the newest N checkpoints (0: all)"),
    "max_nonfinite_steps": (20, "stop after this many non-finite steps in a row (checked at log intervals)"),
    "random_flip": (True, "random horizontal flips of training images"),
    "data_on_device": (False, "copy the data set to the GPU once; batches are gathered and flipped there"),
    "channels_last": (False, "channels-last memory format (faster convolutions on GPUs)"),
    "compile": (False, "torch.compile the model"),
    "optimizer_impl": ("auto", "AdamW kernel: auto (fused where torch has it, else foreach), fused, foreach, single"),
    "adam_beta2": (0.999, "Adam's beta2"),
    # the paper's methods (docs/methods.md)
    "clts_mu": (0.3, "CLTS: centre of the Gaussian over t/(T-1)"),
    "clts_sigma": (1.0, "CLTS: width of the Gaussian over t/(T-1)"),
    "clts_target_steps": (100000, "CLTS: steps until the Gaussian fully replaces the uniform"),
    "clts_lambda_max": (1.0, "CLTS: final weight of the Gaussian in the mixture"),
    "clts_importance_weighting": (False, "CLTS: weight losses back to the uniform objective"),
    "momentum_decay": (False, "MD: decay Adam's beta1 over --total_steps (Demon)"),
    "md_beta_init": (0.9, "MD: beta1 at step 0"),
    "md_beta_min": (0.5, "MD: floor of beta1"),
    "lr_compensation": (False, "LRC: scale lr by (1 - beta_init) / (1 - beta1)"),
    "min_snr_gamma": (0.0, "Min-SNR-gamma loss weighting (0: off), for comparison"),
    # FID during training
    "eval_interval": (0, "steps between FID evaluations of the first EMA (0: off)"),
    "eval_num_samples": (1000, "images sampled for each evaluation"),
    "eval_batch_size": (250, "sampling batch size per rank during evaluation"),
    "eval_ref_stats": ("", "reference statistics .npz (scripts/fid.py ref) for --eval_interval"),
    "eval_respacing": ("ddim50", "sampling steps during evaluation (e.g. ddim50, 100)"),
    "inception": ("", "path of the Inception-v3 FID network (default: the bundled one)"),
    "dry_run": (False, "print the effective options and exit"),
}

# Where and how this run starts and stops, not what it trains: left out of LOG_DIR/config.json,
# so that file reused as --config starts a new run instead of resuming or stopping the old one.
NOT_SAVED = ("config", "dry_run", "log_dir", "resume", "resume_checkpoint", "stop_at")
# Facts about the run written to config.json for other tools (image_sample.py reads
# data_num_classes); skipped when the file is read back as --config.
RUN_FACTS = ("data_num_classes",)


def train_defaults():
    return {k: v for k, (v, _) in TRAIN_OPTIONS.items()}


def all_defaults():
    defaults = train_defaults()
    defaults.update(model_and_diffusion_defaults())
    return defaults


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dict_to_argparser(parser, all_defaults())
    for action in parser._actions:
        if action.dest in TRAIN_OPTIONS:
            action.help = TRAIN_OPTIONS[action.dest][1]
    return parser


def parse_args(argv=None):
    """Defaults < --config file < command-line flags."""
    parser = create_argparser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, all_defaults()))
    return parser.parse_args(argv)


def load_config(path, defaults):
    try:
        values = read_json_options(path)
    except ValueError as e:
        raise SystemExit(f"--config {e}") from None
    values = {k: v for k, v in values.items() if k not in RUN_FACTS}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise SystemExit(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return values


def resolve_precision(args, device):
    if args.use_fp16:
        return "fp16"
    if args.precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    return args.precision


def resolve_log_dir(args):
    log_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR")
    if not log_dir:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        log_dir = dist_util.broadcast_object(os.path.join("runs", stamp))
    return log_dir


def check_log_dir(path):
    """Create --log_dir now, so that a path that cannot hold a run fails before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--log_dir {path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--log_dir {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--log_dir {path} is not writable")


def effective_config(args):
    return {k: v for k, v in vars(args).items() if k not in NOT_SAVED}


def main(argv=None):
    args = parse_args(argv)
    dist_util.setup_dist()
    device = dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    args.log_dir = resolve_log_dir(args)
    precision = resolve_precision(args, device)
    total_steps = args.total_steps or None
    momentum = MomentumSchedule(
        momentum_decay=args.momentum_decay,
        lr_compensation=args.lr_compensation,
        beta_init=args.md_beta_init,
        beta_min=args.md_beta_min,
        total_steps=total_steps or args.lr_anneal_steps or None,
    )
    config = TrainConfig(
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        total_steps=total_steps,
        stop_at=args.stop_at or None,
        ema_rate=parse_ema_rates(args.ema_rate),
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        keep_checkpoints=args.keep_checkpoints,
        precision=precision,
        fp16_scale_growth=args.fp16_scale_growth,
        grad_clip=args.grad_clip,
        max_nonfinite_steps=args.max_nonfinite_steps,
        adam_beta2=args.adam_beta2,
        momentum=momentum,
        channels_last=args.channels_last,
        compile=args.compile,
        optimizer_impl=args.optimizer_impl,
        eval_interval=args.eval_interval,
    )
    if args.eval_interval and not args.eval_ref_stats:
        raise SystemExit("--eval_interval needs --eval_ref_stats (make them with scripts/fid.py ref)")
    if not args.data_dir:
        raise SystemExit("--data_dir is required: an image folder or an .npz of images")

    if not args.dry_run:
        check_log_dir(args.log_dir)
    logger = Logger(None if args.dry_run else args.log_dir)  # a dry run writes nothing
    resolved = effective_config(args)
    logger.log("options:\n" + json.dumps(resolved, indent=2, sort_keys=True))
    logger.log(f"world size {world}, device {device}, precision {precision}, log dir {args.log_dir}")

    # The model first: a bad model flag fails before the data is read. Identical initial
    # weights on every rank; then a different stream of randomness per rank.
    torch.manual_seed(args.seed)
    model_kwargs = args_to_dict(args, model_and_diffusion_defaults().keys())
    model_kwargs["use_fp16"] = False  # mixed precision comes from autocast (--precision)
    if args.dry_run:  # check the model flags without building weights
        with torch.device("meta"):
            create_model_and_diffusion(**model_kwargs, min_snr_gamma=args.min_snr_gamma)
        return None
    model, diffusion = create_model_and_diffusion(**model_kwargs, min_snr_gamma=args.min_snr_gamma)
    model.to(device)
    logger.log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

    dataset = load_image_dataset(args.data_dir, args.image_size, class_cond=args.class_cond)
    logger.log(f"data: {len(dataset)} images from {args.data_dir}")
    data = BatchStream(
        dataset, args.batch_size, rank=rank, world_size=world, seed=args.seed, random_flip=args.random_flip,
        device=device if args.data_on_device else None,
    )
    if rank == 0:
        facts = {"data_num_classes": dataset.num_classes} if args.class_cond else {}
        with open(os.path.join(args.log_dir, "config.json"), "w") as f:
            json.dump({**resolved, **facts}, f, indent=2, sort_keys=True)
    seed_everything(args.seed * world + rank + 1)

    sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion, **clts_kwargs(args))
    evaluator = make_evaluator(args, precision, device, dataset.num_classes) if args.eval_interval else None
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        config=config,
        schedule_sampler=sampler,
        log_dir=args.log_dir,
        resume=args.resume_checkpoint or args.resume,
        logger=logger,
        evaluator=evaluator,
        run_config=resolved,
    )
    loop.run_loop()
    logger.log(f"done: {loop.step} steps, checkpoints in {args.log_dir}")
    dist_util.cleanup()
    return loop


def seed_everything(seed):
    """Seed every generator a training step draws from (torch; numpy for the original samplers)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def clts_kwargs(args):
    if args.schedule_sampler != "clts":
        return {}
    return dict(
        mu=args.clts_mu,
        sigma=args.clts_sigma,
        target_steps=args.clts_target_steps,
        lambda_max=args.clts_lambda_max,
        importance_weighting=args.clts_importance_weighting,
    )


def make_evaluator(args, precision, device, num_classes):
    """FID of the EMA model every --eval_interval steps, spread over all ranks."""
    from improved_diffusion import fid, sampling
    from improved_diffusion.script_util import create_gaussian_diffusion

    fid.load_statistics(args.eval_ref_stats)  # fail now, not after hours of training
    eval_diffusion = create_gaussian_diffusion(
        steps=args.diffusion_steps,
        learn_sigma=args.learn_sigma,
        sigma_small=args.sigma_small,
        noise_schedule=args.noise_schedule,
        use_kl=args.use_kl,
        predict_xstart=args.predict_xstart,
        rescale_timesteps=args.rescale_timesteps,
        rescale_learned_sigmas=args.rescale_learned_sigmas,
        timestep_respacing=args.eval_respacing,
    )
    extractor = {}

    def evaluate(ema_model, step):
        images, _ = sampling.sample_images(
            ema_model,
            eval_diffusion,
            num_samples=args.eval_num_samples,
            batch_size=args.eval_batch_size,
            image_size=args.image_size,
            seed=args.seed,
            use_ddim=args.eval_respacing.startswith("ddim"),
            class_cond=args.class_cond,
            num_classes=num_classes,  # the data's classes, not the embedding's 1000 rows
            device=device,
            progress=False,
            autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
        )
        if not dist_util.is_main():
            return {}
        if "net" not in extractor:
            extractor["net"] = fid.load_inception(args.inception or None, device)
        return {"fid": fid.fid_of_samples(images, args.eval_ref_stats, extractor["net"])}

    return evaluate


if __name__ == "__main__":
    run_main(main, errors=(ValueError, FileNotFoundError, NonFiniteError))
