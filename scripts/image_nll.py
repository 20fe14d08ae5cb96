"""
Approximate the bits/dimension (negative log-likelihood bound) of a model on a data set.

    python scripts/image_nll.py --data_dir cifar_test/ --model_path runs/cifar/ema_0.9999_500000.pt \\
        --num_samples 1000 --batch_size 64

    mpiexec -n 8 python scripts/image_nll.py --data_dir cifar_test/ \\
        --model_path runs/cifar/ema_0.9999_500000.pt --num_samples 1000 --batch_size 64

The model and diffusion flags come from the training run's `config.json` beside the
checkpoint; a checkpoint without one needs them on the command line or in `--config FILE`.

As the original: every batch runs `diffusion.calc_bpd_loop` (all T steps; a
`--timestep_respacing` is refused),
the per-batch means are averaged over processes, and the running mean of `total_bpd` is
printed after each batch. Images are taken in data-set order, without flipping; process r
takes images r, r + W, ... so every image is scored once. At the end, rank 0 writes
`{out_dir}/nll.json` ({"bpd": ..., "num_samples": ..., per-term means}) and
`{out_dir}/{vb,mse,xstart_mse}_terms.npz` (mean per-timestep terms, as the original).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from improved_diffusion.options import config
from improved_diffusion import dist_util
from improved_diffusion.image_datasets import load_image_dataset, to_model_input
from improved_diffusion.evaluation.sampling import load_for_sampling, sampling_device
from improved_diffusion.script_util import run_main

TERMS = ("vb", "mse", "xstart_mse")
FLAGS = ["model_path", "data_dir", "num_samples", "batch_size", "clip_denoised", "seed", "out_dir", "out", "device"]


def check_args(args):
    """Reject bad flags before the model is built and the data are read."""
    if args.timestep_respacing:
        raise ValueError(
            f"--timestep_respacing {args.timestep_respacing!r}: the bpd runs calc_bpd_loop over "
            f"all --diffusion_steps steps; leave --timestep_respacing empty"
        )
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_samples < 0:
        raise ValueError(f"--num_samples must be 0 (all images) or more, got {args.num_samples}")
    if not args.data_dir:
        raise ValueError("--data_dir is required: a folder of images or an .npz")
    if not os.path.exists(args.data_dir):
        raise FileNotFoundError(f"--data_dir {args.data_dir}: no such file or folder")
    if not args.model_path:
        raise ValueError("--model_path is required")
    if not os.path.exists(args.model_path):
        raise FileNotFoundError(f"--model_path {args.model_path}: no such file")


def load(args, run_config, device, log, argv):
    """The model and diffusion of --model_path and the data set (user errors: one line, exit 2)."""
    log("creating model and diffusion...")
    try:
        run = load_for_sampling(args, run_config, device, log, argv, use_fp16=False)
        dataset = load_image_dataset(
            args.data_dir, args.image_size, class_cond=args.class_cond, image_channels=args.image_channels,
            progress=None if dist_util.get_rank() == 0 else False,
        )
    except (FileNotFoundError, ValueError) as exc:
        if dist_util.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    return run, dataset


def score(model, diffusion, dataset, args, num_samples, device, log):
    """calc_bpd_loop over every image once (process r takes r, r + W, ...): (sum of
    total_bpd, count, {term: sum over images of its per-timestep values})."""
    rank, world_size = dist_util.get_rank(), dist_util.get_world_size()
    # Every rank runs the same number of batches (the all-reduces must match); a rank
    # that runs out of images repeats its last one with weight 0.
    per_rank = (num_samples + world_size - 1) // world_size
    mine = list(range(rank, num_samples, world_size))
    sums = {name: None for name in TERMS}
    total_bpd_sum, count = 0.0, 0
    for batch_start in range(0, per_rank, args.batch_size):
        size = min(args.batch_size, per_rank - batch_start)
        idx = mine[batch_start : batch_start + size]
        n_real = len(idx)
        idx = idx + [idx[-1] if idx else 0] * (size - n_real)
        weight = torch.zeros(size, dtype=torch.float64, device=device)
        weight[:n_real] = 1.0
        images = torch.from_numpy(np.asarray(dataset.images[idx])).permute(0, 3, 1, 2)
        x = to_model_input(images, device)
        model_kwargs = {}
        if args.class_cond:
            model_kwargs["y"] = torch.from_numpy(dataset.labels[idx]).to(device)
        with torch.no_grad():
            metrics = diffusion.calc_bpd_loop(
                model, x, clip_denoised=args.clip_denoised, model_kwargs=model_kwargs
            )
        # One all-reduce per batch: [sum of total_bpd, count, per-term sums...].
        terms = [(metrics[name].double() * weight[:, None]).sum(0) for name in TERMS]
        flat = torch.cat(
            [
                (metrics["total_bpd"].double() * weight).sum().view(1),
                weight.sum().view(1),
                *terms,
            ]
        )
        dist_util.all_reduce_sum(flat)
        flat = flat.cpu()
        total_bpd_sum += flat[0].item()
        count += int(round(flat[1].item()))
        offset = 2
        for name, term in zip(TERMS, terms):
            part = flat[offset : offset + term.numel()]
            offset += term.numel()
            sums[name] = part.clone() if sums[name] is None else sums[name] + part
        log(f"done {count} samples: bpd={total_bpd_sum / count:.6f}")
    return total_bpd_sum, count, sums


def write_result(args, result, sums, count, log):
    """nll.json and the mean per-timestep terms (rank 0)."""
    out_dir = args.out_dir or os.environ.get("OPENAI_LOGDIR") or os.path.dirname(
        os.path.abspath(args.model_path)
    )
    os.makedirs(out_dir, exist_ok=True)
    for name in TERMS:
        np.savez(os.path.join(out_dir, f"{name}_terms.npz"), (sums[name] / count).numpy())
    path = args.out or os.path.join(out_dir, "nll.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    log(json.dumps(result))
    log(f"wrote {path}")


def main(argv=None):
    args, run_config = config.parse(create_argparser(), argv, checkpoint_flag="model_path")
    check_args(args)
    dist_util.setup_dist()
    rank, world_size = dist_util.get_rank(), dist_util.get_world_size()
    device = sampling_device(args)
    log = dist_util.print0
    run, dataset = load(args, run_config, device, log, argv)
    # calc_bpd_loop draws its noise from the global generator: seed it per rank.
    torch.manual_seed(args.seed * world_size + rank)

    num_samples = min(args.num_samples, len(dataset)) if args.num_samples > 0 else len(dataset)
    log(f"evaluating {num_samples} images from {args.data_dir} on {world_size} process(es)...")
    start = time.time()
    total_bpd_sum, count, sums = score(run.model, run.diffusion, dataset, args, num_samples, device, log)
    bpd = total_bpd_sum / count
    result = {
        "bpd": bpd,
        "num_samples": count,
        "data_dir": args.data_dir,
        "model_path": args.model_path,
        "clip_denoised": args.clip_denoised,
        "seed": args.seed,
        "seconds": round(time.time() - start, 2),
    }
    result["vb_bpd"] = float(sums["vb"].sum() / count)  # total_bpd minus the prior term
    result["prior_bpd"] = bpd - result["vb_bpd"]
    result["mean_mse"] = float(sums["mse"].mean() / count)  # averaged over timesteps
    result["mean_xstart_mse"] = float(sums["xstart_mse"].mean() / count)
    if rank == 0:
        write_result(args, result, sums, count, log)
    dist_util.barrier()
    log("evaluation complete")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_options(parser, FLAGS, table=config.SAMPLING, use="image_nll")
    config.add_options(parser, ["config"])
    config.add_model_options(parser)
    return parser


if __name__ == "__main__":
    run_main(main)
