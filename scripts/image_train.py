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

import torch

from improved_diffusion import config, dist_util, training
from improved_diffusion.image_datasets import load_image_dataset
from improved_diffusion.logger import Logger
from improved_diffusion.script_util import run_main
from improved_diffusion.train_util import NonFiniteError


def create_argparser():
    """Every option of the table (improved_diffusion/config.py), grouped as there."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    for group in config.GROUPS:
        config.add_options(parser, config.names(group), title=f"{group} options")
    return parser


def parse_args(argv=None):
    """Defaults < --config file < command-line flags; every value checked by the table."""
    args, _ = config.parse(create_argparser(), argv)
    return args


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


def main(argv=None):
    args = parse_args(argv)
    opts = vars(args)
    dist_util.setup_dist()
    device = dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    args.log_dir = resolve_log_dir(args)
    train_config = training.check(opts, device)  # every bad value fails here, before any work
    if args.eval_interval and not args.eval_ref_stats:
        raise SystemExit("--eval_interval needs --eval_ref_stats (make them with scripts/fid.py ref)")
    if not args.data_dir:
        raise SystemExit("--data_dir is required: an image folder or an .npz of images")

    if not args.dry_run:
        check_log_dir(args.log_dir)
    logger = Logger(None if args.dry_run else args.log_dir)  # a dry run writes nothing
    resolved = config.saved_options(opts)
    logger.log("options:\n" + json.dumps(resolved, indent=2, sort_keys=True))
    logger.log(f"world size {world}, device {device}, precision {train_config.precision}, log dir {args.log_dir}")
    if args.dry_run:
        return None

    training.apply_device_settings(opts, device)
    model, diffusion = training.build_model(opts, device)
    logger.log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    dataset = load_image_dataset(args.data_dir, args.image_size, class_cond=args.class_cond)
    logger.log(f"data: {len(dataset)} images from {args.data_dir}")
    if rank == 0:
        facts = {"data_num_classes": dataset.num_classes} if args.class_cond else {}
        with open(os.path.join(args.log_dir, "config.json"), "w") as f:
            json.dump({**resolved, **facts}, f, indent=2, sort_keys=True)
    evaluator = make_evaluator(args, train_config.precision, device, dataset.num_classes) if args.eval_interval else None
    loop = training.build_loop(
        opts, model, diffusion, dataset, device, rank=rank, world_size=world, log_dir=args.log_dir,
        logger=logger, resume=args.resume_checkpoint or args.resume, evaluator=evaluator, run_config=resolved,
    )
    loop.run_loop()
    logger.log(f"done: {loop.step} steps, checkpoints in {args.log_dir}")
    dist_util.cleanup()
    return loop


def make_evaluator(args, precision, device, num_classes):
    """FID of the EMA model every --eval_interval steps, spread over all ranks."""
    from improved_diffusion import fid, sampling
    from improved_diffusion.script_util import create_diffusion_from_options

    fid.load_statistics(args.eval_ref_stats)  # fail now, not after hours of training
    model_opts = {k: v for k, v in training.model_options(vars(args)).items()}
    eval_diffusion = create_diffusion_from_options(model_opts, timestep_respacing=args.eval_respacing)
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
