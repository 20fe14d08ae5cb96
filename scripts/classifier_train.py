"""
Train a noised-image classifier (guided-diffusion's noise-aware classifier, for classifier
guidance with scripts/classifier_sample.py).

    python scripts/classifier_train.py --data_dir data/demo/train.npz --val_data_dir data/demo/val.npz \\
        --log_dir runs/classifier --image_size 16 --classifier_width 32 --classifier_depth 1 \\
        --classifier_attention_resolutions 8 --classifier_channel_mult 1,2 \\
        --classifier_num_head_channels 16 --classifier_num_classes 10 \\
        --diffusion_steps 1000 --noise_schedule cosine --iterations 2000 --batch_size 64

    # several GPUs, with MPI (as the original) or torchrun
    mpiexec -n 8 python scripts/classifier_train.py --data_dir ... --log_dir runs/classifier ...

The original's flags (`--noised`, `--iterations`, `--anneal_lr`, `--val_data_dir`,
`--eval_interval`, `--microbatch`, `--resume_checkpoint`, ...) and classifier/diffusion flags
(`classifier_and_diffusion_defaults()`), plus `--classifier_channel_mult`,
`--classifier_num_head_channels` and `--classifier_num_classes` for classifiers the original
could not build (below 64 pixels, narrow, few classes). The diffusion flags must be those of
the diffusion model it will guide: its inputs are noised with that process, and it sees the
timesteps as that model does.

What differs from the original script: checkpoints are written atomically, with a state file
(RNG, data position), and a killed run continues exactly where it was with the same command
(`--resume auto`); `modelN.pt` holds N updates; microbatches average exactly;
`--precision` (autocast); metrics are reduced over ranks; the options go to
`LOG_DIR/config.json`, which classifier_sample.py reads.
"""

import argparse
import json
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.options import config
from improved_diffusion import dist_util
from improved_diffusion.run import precision
from improved_diffusion.image_datasets import BatchStream, check_labels_fit, load_image_dataset, to_model_input
from improved_diffusion.resample import create_named_schedule_sampler
from improved_diffusion.run.preemption import StopRequest
from improved_diffusion.run.run_dir import RunDir
from improved_diffusion.script_util import (
    CLASSIFIER_EXTRA_DEFAULTS,
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    diffusion_defaults,
    run_main,
)
from improved_diffusion.train_util import make_adamw, TrainConfig

CLASSIFIER_KEYS = (*classifier_and_diffusion_defaults(), *CLASSIFIER_EXTRA_DEFAULTS)
# Options of the training table that this script shares (lr and batch_size at its own defaults).
TRAIN_FLAGS = ("lr", "weight_decay", "batch_size", "log_interval", "save_interval", "seed")
# ... and how a run stops: on a scheduler's signal, by the clock, when a rank stops answering.
RUN_FLAGS = ("stop_signals", "save_minutes", "dist_timeout")


def model_timesteps(diffusion, t):
    """The timesteps a diffusion model sees for indices `t` (mapped, and scaled with
    rescale_timesteps): the classifier is trained on what cond_fn gets when sampling."""
    mapped = torch.as_tensor(diffusion.timestep_map, device=t.device)[t]
    if diffusion.rescale_timesteps:
        return mapped.float() * (1000.0 / diffusion.original_num_steps)
    return mapped


def check_args(args):
    for flag in ("iterations", "batch_size", "log_interval", "save_interval", "eval_interval"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.stop_at < 0:
        raise ValueError(f"--stop_at must be >= 0, got {args.stop_at}")
    if args.microbatch == 0 or args.microbatch < -1:
        raise ValueError(f"--microbatch must be -1 (off) or positive, got {args.microbatch}")
    if not args.data_dir:
        raise ValueError("--data_dir is required: an image folder or an .npz of labelled images")
    for flag in ("data_dir", "val_data_dir"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"--{flag} {path}: no such file or folder")


def load_labelled(path, args, flag):
    dataset = load_image_dataset(path, args.image_size, class_cond=True)
    check_labels_fit(dataset, args.classifier_num_classes, f"--{flag} {path}", "--classifier_num_classes")
    return dataset


def main(argv=None):
    args = create_argparser().parse_args(argv)
    config.validate({name: getattr(args, name) for name in ("precision", *RUN_FLAGS)})
    check_args(args)
    dist_util.setup_dist(timeout=args.dist_timeout)
    device = dist_util.dev()
    log_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR") or "runs/classifier"
    run_precision = precision.resolve(args.precision, device, use_fp16=args.classifier_use_fp16)

    # Everything that checks a flag before any data is read or weights are written.
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    classifier, diffusion = create_classifier_and_diffusion(**args_to_dict(args, CLASSIFIER_KEYS))
    sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion) if args.noised else None
    data_set = load_labelled(args.data_dir, args, "data_dir")
    val_set = load_labelled(args.val_data_dir, args, "val_data_dir") if args.val_data_dir else None

    with RunDir.open(log_dir) as run_dir:
        with run_dir.starting():
            options = {**vars(args), "log_dir": log_dir, "data_num_classes": data_set.num_classes}
            step, state, opt = start(args, run_dir, options, classifier, sampler, data_set, val_set, run_precision)
        train(args, run_dir, options, step, state, opt, classifier, diffusion, sampler)
    dist_util.cleanup()


def start(args, run_dir, options, classifier, sampler, data_set, val_set, run_precision):
    """Data streams, optimizer and the resumed state: everything before step one."""
    device, rank, world, logger = dist_util.dev(), dist_util.get_rank(), dist_util.get_world_size(), run_dir.logger
    logger.log("options:\n" + json.dumps(options, indent=2, sort_keys=True))
    classifier.to(device)
    logger.log(f"classifier: {sum(p.numel() for p in classifier.parameters()):,} parameters; "
               f"data: {len(data_set)} images, {data_set.num_classes} classes; world size {world}, "
               f"device {device}, precision {run_precision}")

    data = BatchStream(data_set, args.batch_size, rank=rank, world_size=world, seed=args.seed,
                       random_flip=args.random_flip)
    val_data = None
    if val_set is not None:
        val_data = BatchStream(val_set, min(args.batch_size, len(val_set) // world), rank=rank,
                               world_size=world, seed=args.seed + 1, random_flip=False)
    torch.manual_seed(args.seed * world + rank + 1)  # a different noise stream per rank from here

    train_config = TrainConfig(lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size)
    opt = make_adamw(list(classifier.parameters()), train_config, device)
    mixed = precision.MixedPrecision(run_precision, device, opt)
    state = {"data": data, "val": val_data, "sampler": sampler, "mixed": mixed}
    step = resume(args, run_dir, classifier, opt, state, _plain(options))
    run_dir.write_config(options)  # once the checkpoint is known to fit these options
    return step, state, opt


def train(args, run_dir, options, step, state, opt, classifier, diffusion, sampler):
    """The original's loop, from `step` to --iterations (or --stop_at)."""
    device, world, logger = dist_util.dev(), dist_util.get_world_size(), run_dir.logger
    data, val_data, mixed = state["data"], state["val"], state["mixed"]

    model = classifier
    if world > 1:
        model = DDP(classifier, device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False, bucket_cap_mb=128, find_unused_parameters=False)

    def forward_backward_log(stream, prefix, train):
        """One batch: noise it, run the classifier, log loss and accuracy; backward when training."""
        images, cond = next(stream)
        x = to_model_input(images, device)
        labels = cond["y"].to(device)
        if args.noised:
            t, _ = sampler.sample(x.shape[0], device)
            x = diffusion.q_sample(x, t)
        else:
            t = torch.zeros(x.shape[0], dtype=torch.long, device=device)
        timesteps = model_timesteps(diffusion, t)
        n = x.shape[0]
        micro = args.microbatch if args.microbatch > 0 else n
        for start in range(0, n, micro):
            piece = slice(start, start + micro)
            last = start + micro >= n
            sync = nullcontext() if (last or world == 1 or not train) else model.no_sync()
            with sync:
                with mixed.autocast():
                    logits = model(x[piece], timesteps[piece])
                losses = F.cross_entropy(logits.float(), labels[piece], reduction="none")
                count = losses.shape[0]
                logger.logkv_sum(f"{prefix}_loss", losses.detach().sum(), count)
                for k in (1, 5):
                    if k <= logits.shape[1]:
                        top = logits.detach().topk(k, dim=-1).indices
                        hits = (top == labels[piece, None]).any(dim=-1).float().sum()
                        logger.logkv_sum(f"{prefix}_acc@{k}", hits, count)
                if train:
                    # Each microbatch's share of the batch mean: --microbatch changes nothing.
                    mixed.backward(losses.sum() / n)

    stop = min(args.iterations, args.stop_at) if args.stop_at else args.iterations
    # A --stop_signals signal saves at a step every rank agrees on, then exits with code 75.
    with StopRequest(args.stop_signals, args.save_minutes, log=logger.log,
                     failure=lambda: logger.write_error) as request:
        while step < stop:
            lr = args.lr * (1 - step / args.iterations) if args.anneal_lr else args.lr
            for group in opt.param_groups:
                group["lr"] = lr
            logger.logkv("lr", lr)
            opt.zero_grad(set_to_none=True)
            forward_backward_log(data, "train", train=True)
            mixed.unscale_()
            grads = [p.grad for p in classifier.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            finite = torch.isfinite(grad_norm)
            mixed.step(finite)
            logger.logkv_sum("grad_norm", torch.where(finite, grad_norm, 0.0), finite)
            if val_data is not None and step % args.eval_interval == 0:
                classifier.eval()
                with torch.no_grad():
                    forward_backward_log(val_data, "val", train=False)
                classifier.train()
            step += 1
            if step % args.log_interval == 0 or step == stop:
                logger.logkv("step", step)
                logger.logkv("samples", step * args.batch_size * world)
                logger.dumpkvs()
            due = request.due(step)  # "stop", "save" (--save_minutes) or None, the same on every rank
            if due or step % args.save_interval == 0 or step == stop:
                save(run_dir, step, classifier, opt, state, options)
            if due == "stop":
                break
    logger.log(f"done: {step} steps, checkpoints in {run_dir.path}")


def save(run_dir, step, classifier, opt, state, options):
    """modelNNNNNN.pt and optNNNNNN.pt as the original writes them, plus the state file; atomic."""
    rank_state = ckpt.rank_state(state["data"])
    if state["val"] is not None:
        rank_state["val_data"] = state["val"].state_dict()
    ranks = dist_util.all_gather_objects(rank_state)

    def contents():
        sampler, scaler = state["sampler"], state["mixed"].scaler
        files = {ckpt.model_name(step): classifier.state_dict(), ckpt.opt_name(step): opt.state_dict()}
        return files, {
            "world_size": dist_util.get_world_size(),
            "ranks": ranks,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "sampler": sampler.state_dict() if sampler is not None and hasattr(sampler, "state_dict") else None,
            "config": _plain(options),
        }

    run_dir.save(step, contents)


def resume(args, run_dir, classifier, opt, state, options):
    """The step to continue from (0: a fresh start), found and read by the run directory as for
    every trainer: --resume auto / none, or --resume_checkpoint (the original's flag: its
    optimizer file beside it when present)."""
    found = run_dir.find(args.resume_checkpoint or args.resume)
    if found is None:
        return 0
    weights = run_dir.read(found, found.weights_file or ckpt.model_name(found.step), "classifier", fits=classifier)
    classifier.load_state_dict(weights, strict=True)
    opt_state = run_dir.read(found, ckpt.opt_name(found.step), "optimizer", optional=True)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    mine = run_dir.rank_state(found)
    if mine is not None:
        ckpt.set_rank_state(mine, state["data"])
        if state["val"] is not None and "val_data" in mine:
            state["val"].load_state_dict(mine["val_data"])
    saved = found.state or {}
    if saved.get("scaler") is not None and state["mixed"].scaler is not None:
        state["mixed"].scaler.load_state_dict(saved["scaler"])
    if saved.get("sampler") is not None and hasattr(state["sampler"], "load_state_dict"):
        state["sampler"].load_state_dict(saved["sampler"])
    run_dir.resumed(found, options)
    return found.step


def _plain(options):
    """The options a state file keeps (plain values only: it loads with weights_only=True)."""
    return {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool))}


def create_argparser():
    """This script's options (config.TOOLS), those it shares with image_train.py (at its own
    defaults), the image size and the diffusion's, and the classifier's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_options(parser, config.TOOLS["classifier_train"], table=config.TOOLS["classifier_train"])
    config.add_options(parser, TRAIN_FLAGS, use="classifier_train")
    config.add_options(parser, RUN_FLAGS)
    config.add_options(parser, ["image_size", *diffusion_defaults()])
    config.add_options(parser, config.TOOLS["classifier"], table=config.TOOLS["classifier"])
    return parser


if __name__ == "__main__":
    run_main(main)
