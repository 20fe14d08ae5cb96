"""
Train a super-resolution diffusion model: it denoises `--large_size` images given the same
images area-downsampled to `--small_size` (guided-diffusion's super_res_train.py).

    python scripts/super_res_train.py --data_dir data/demo/train.npz --log_dir runs/sr \\
        --large_size 16 --small_size 8 --channel_mult 1,2,2 --num_channels 32 \\
        --num_res_blocks 1 --attention_resolutions 4 --noise_schedule cosine \\
        --batch_size 32 --lr 3e-4 --total_steps 2000

    mpiexec -n 8 python scripts/super_res_train.py --large_size 256 --small_size 64 ...

The options are image_train.py's (the options table, `--config`, `--resume auto`, ...), with
`--large_size` / `--small_size` in place of `--image_size`; `--channel_mult` may be left empty
for the originals' sizes (64, 256, 512). The low-resolution condition is made from each
training batch by the data pipeline (`image_datasets.LowResStream`), after the flips, so it
matches its large image. `LOG_DIR/config.json` records both sizes for super_res_sample.py.
"""

import argparse
import datetime
import json
import os

import torch

from improved_diffusion.options import config
from improved_diffusion import dist_util
from improved_diffusion.run import training
from improved_diffusion.image_datasets import (BatchStream, LowResStream, check_labels_fit, load_data,
                                               load_image_dataset, low_res_of)
from improved_diffusion.logger import Logger
from improved_diffusion.run.run_dir import RunDir
from improved_diffusion.script_util import run_main, sr_create_model_and_diffusion, sr_model_and_diffusion_defaults
from improved_diffusion.train_util import NonFiniteError, TrainLoop

SR_SIZES = config.TOOLS["super_res"]  # --large_size and --small_size
# Table options a super-resolution model does not take (image_size is --large_size).
NOT_SR = ("image_size", "use_new_attention_order", "class_dropout_prob")


def sr_options(opts):
    """The factory's flags from the option values (`use_fp16`: autocast does the work)."""
    keys = [k for k in sr_model_and_diffusion_defaults() if k not in SR_SIZES]
    kwargs = {k: opts[k] for k in keys}
    kwargs.update(large_size=opts["large_size"], small_size=opts["small_size"], use_fp16=False,
                  channel_mult=opts["channel_mult"], **training.loss_weighting(opts))
    return kwargs


def load_superres_data(data_dir, batch_size, large_size, small_size, class_cond=False):
    """The original's generator API: (large batch in [-1, 1], {"low_res": ..., ["y"]}) forever."""
    for large_batch, model_kwargs in load_data(data_dir=data_dir, batch_size=batch_size,
                                               image_size=large_size, class_cond=class_cond):
        model_kwargs["low_res"] = low_res_of(large_batch, small_size)
        yield large_batch, model_kwargs


def check(args, opts, device):
    """Every bad value fails here, before data is read or anything is written."""
    if not 1 <= args.small_size <= args.large_size:
        raise ValueError(f"wrong sizes: --small_size {args.small_size} must be in [1, --large_size "
                         f"{args.large_size}]")
    for name in ("class_dropout_prob", "use_new_attention_order"):
        if opts[name] != config.BY_NAME[name].default:
            raise ValueError(f"--{name} is not supported for super-resolution models")
    if args.eval_interval:
        raise ValueError("--eval_interval (FID during training) is not supported for super-resolution")
    train_config = training.train_config(opts, device)
    with torch.device("meta"):
        _, diffusion = sr_create_model_and_diffusion(**sr_options(opts))
    training.schedule_sampler(opts, diffusion)
    training.noise_transform(opts)
    if not args.data_dir:
        raise ValueError("--data_dir is required: an image folder or an .npz of images")
    if not os.path.exists(args.data_dir):
        raise FileNotFoundError(f"--data_dir {args.data_dir}: no such file or folder")
    return train_config


def main(argv=None):
    args, _ = config.parse(create_argparser(), argv)
    opts = vars(args)
    dist_util.setup_dist(timeout=args.dist_timeout)
    device = dist_util.dev()
    train_config = check(args, opts, device)
    log_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR") or dist_util.broadcast_object(
        os.path.join("runs", datetime.datetime.now().strftime("sr-%Y%m%d-%H%M%S")))
    resolved = {k: v for k, v in config.saved_options(opts).items() if k not in NOT_SR}
    if args.dry_run:
        Logger(None).log("options:\n" + json.dumps(resolved, indent=2, sort_keys=True))
        return None

    with RunDir.open(log_dir) as run_dir:
        with run_dir.starting():
            loop = start(args, opts, train_config, device, run_dir, resolved)
        loop.run_loop()
        loop.logger.log(f"done: {loop.step} steps, checkpoints in {log_dir}")
    dist_util.cleanup()
    return loop


def start(args, opts, train_config, device, run_dir, resolved):
    """Model, data, the TrainLoop (resumed) and config.json: everything before step one."""
    rank, world, logger = dist_util.get_rank(), dist_util.get_world_size(), run_dir.logger
    logger.log("options:\n" + json.dumps(resolved, indent=2, sort_keys=True))
    training.apply_device_settings(opts, device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model, diffusion = sr_create_model_and_diffusion(**sr_options(opts))
    model.to(device)
    logger.log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
               f"{args.small_size} -> {args.large_size} px; world size {world}, device {device}")
    dataset = load_image_dataset(args.data_dir, args.large_size, class_cond=args.class_cond)
    check_labels_fit(dataset, model.num_classes, f"--data_dir {args.data_dir}", "a --class_cond model's class count")
    logger.log(f"data: {len(dataset)} images from {args.data_dir}")
    stream = BatchStream(dataset, args.batch_size, rank=rank, world_size=world, seed=args.seed,
                         random_flip=args.random_flip, device=device if args.data_on_device else None)
    training.seed_everything(args.seed * world + rank + 1)  # a different stream per rank from here
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=LowResStream(stream, args.small_size),
        config=train_config,
        schedule_sampler=training.schedule_sampler(opts, diffusion),
        noise_transform=training.noise_transform(opts),
        log_dir=run_dir,
        resume=args.resume_checkpoint or args.resume,
        logger=logger,
        run_config=resolved,
    )
    facts = {"data_num_classes": dataset.num_classes} if args.class_cond else {}
    run_dir.write_config({**resolved, **facts})  # once the checkpoint is known to fit these options
    return loop


def create_argparser():
    """The options table without --image_size, plus --large_size and --small_size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for group in config.GROUPS:
        config.add_options(parser, [n for n in config.names(group) if n != "image_size"], title=f"{group} options")
    config.add_options(parser, SR_SIZES, "super-resolution", table=SR_SIZES)
    return parser


if __name__ == "__main__":
    run_main(main, errors=(ValueError, FileNotFoundError, NonFiniteError))
