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
default); SIGTERM or SIGUSR1 (`--stop_signals`) first saves a checkpoint at a step every rank
agrees on, then exits with code 75 for a requeue (docs/multinode.md). Flags override the `--config` file; the effective options are printed and saved
as `config.json` in the log dir. `--dry_run True` stops after printing them.
"""

import argparse
import datetime
import json
import os

from improved_diffusion.options import config
from improved_diffusion import dist_util
from improved_diffusion.run import training
from improved_diffusion.evaluation.evaluator import for_training
from improved_diffusion.image_datasets import check_labels_fit, load_image_dataset
from improved_diffusion.logger import Logger
from improved_diffusion.run.run_dir import RunDir
from improved_diffusion.script_util import run_main
from improved_diffusion.train_util import NonFiniteError


def create_argparser():
    """Every option of the table (improved_diffusion/options/config.py), grouped as there."""
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


def main(argv=None):
    args = parse_args(argv)
    opts = vars(args)
    dist_util.setup_dist(timeout=args.dist_timeout)
    device = dist_util.dev()
    args.log_dir = resolve_log_dir(args)
    train_config = training.check(opts, device)  # every bad value fails here, before any work
    if args.eval_interval and not args.eval_ref_stats:
        raise ValueError("--eval_interval needs --eval_ref_stats (make them with scripts/fid.py ref)")
    if not args.data_dir:
        raise ValueError("--data_dir is required: an image folder or an .npz of images")
    if not os.path.exists(args.data_dir):
        raise FileNotFoundError(f"--data_dir {args.data_dir}: no such file or folder")
    if args.dry_run:  # writes nothing
        Logger(None).log("options:\n" + json.dumps(config.saved_options(opts), indent=2, sort_keys=True))
        return None

    with RunDir.open(args.log_dir) as run_dir:
        with run_dir.starting():
            loop = start(args, opts, train_config, device, run_dir)
        loop.run_loop()
        loop.logger.log(f"done: {loop.step} steps, checkpoints in {args.log_dir}")
    dist_util.cleanup()
    return loop


def start(args, opts, train_config, device, run_dir):
    """Model, data, config.json and the TrainLoop (resumed): everything before step one."""
    rank, world, logger = dist_util.get_rank(), dist_util.get_world_size(), run_dir.logger
    resolved = config.saved_options(opts)
    logger.log("options:\n" + json.dumps(resolved, indent=2, sort_keys=True))
    logger.log(f"world size {world}, device {device}, precision {train_config.precision}, log dir {args.log_dir}")
    training.apply_device_settings(opts, device)
    model, diffusion = training.build_model(opts, device)
    logger.log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    dataset = load_image_dataset(args.data_dir, args.image_size, class_cond=args.class_cond,
                                 image_channels=args.image_channels)
    check_labels_fit(dataset, model.num_classes, f"--data_dir {args.data_dir}", "a --class_cond model's class count")
    logger.log(f"data: {len(dataset)} images from {args.data_dir}")
    evaluator = None
    if args.eval_interval:
        evaluator = for_training(opts, training.model_options(opts), train_config.precision, device,
                                 dataset.num_classes, args.log_dir, logger)
    loop = training.build_loop(
        opts, model, diffusion, dataset, device, rank=rank, world_size=world, log_dir=run_dir,
        logger=logger, resume=args.resume_checkpoint or args.resume, evaluator=evaluator, run_config=resolved,
    )
    facts = {"data_num_classes": dataset.num_classes} if args.class_cond else {}
    run_dir.write_config({**resolved, **facts})  # only once the checkpoint has been found to fit these options
    return loop


if __name__ == "__main__":
    run_main(main, errors=(ValueError, FileNotFoundError, NonFiniteError))
