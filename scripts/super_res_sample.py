"""
Upsample low-resolution images with a super-resolution model (guided-diffusion's
super_res_sample.py): `--base_samples` is an .npz of `--small_size` images (`arr_0`, uint8
NHWC, e.g. from image_sample.py; `arr_1` labels for a class-conditional model), and the
output holds `--large_size` images.

    python scripts/super_res_sample.py --model_path runs/sr/ema_0.9999_002000.pt \\
        --base_samples runs/digits/samples_64x8x8x3.npz --num_samples 64 --batch_size 32 \\
        --timestep_respacing ddim50 --use_ddim True

The model flags and both sizes come from the run's `config.json` beside --model_path
(super_res_train.py writes it); flags on the command line override them. Image i of the
output upsamples base sample i (cycling when --num_samples is larger) with its own seed, so
the result does not depend on --batch_size.
"""

import argparse
import os

import numpy as np
import torch

from improved_diffusion.options import config
from improved_diffusion import dist_util
from improved_diffusion.run import precision
from improved_diffusion.evaluation.sampling import (
    StackedRandomGenerator,
    check_counts,
    load_for_sampling,
    sample_seed,
    sampling_device,
    save_samples,
    to_uint8,
)
from improved_diffusion.script_util import run_main, sr_model_and_diffusion_defaults

SIZES = ("large_size", "small_size")
SAMPLE_FLAGS = ["model_path", "base_samples", "num_samples", "batch_size", "use_ddim", "eta", "clip_denoised", "seed",
                "out", "grid", "grid_size", "device", *SIZES]


def load_base_samples(path, small_size, class_cond):
    """(uint8 NHWC images, int64 labels or None) of --base_samples, checked."""
    if not path:
        raise ValueError("--base_samples is required: an .npz of low-resolution images (arr_0)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--base_samples {path}: no such file")
    try:
        with np.load(path) as f:
            images = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f.files else None
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--base_samples {path}: not an .npz with arr_0 ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or not len(images):
        raise ValueError(f"--base_samples {path}: arr_0 must be uint8 [N, H, W, 3] images, got "
                         f"{images.dtype} {images.shape}")
    if images.shape[1:3] != (small_size, small_size):
        raise ValueError(f"wrong sizes: --base_samples {path} holds {images.shape[1]}x{images.shape[2]} "
                         f"images, the model upsamples {small_size}x{small_size} (--small_size)")
    if class_cond:
        if labels is None:
            raise ValueError(f"--base_samples {path} has no labels (arr_1); the model is class-conditional")
        labels = labels.astype(np.int64)
    return images, labels if class_cond else None


def resolve_sizes(args, run_config):
    """Both sizes: the flags, else the run's (config.json), else guided-diffusion's; checked."""
    for size in SIZES:
        if getattr(args, size) == 0:
            setattr(args, size, int((run_config or {}).get(size, sr_model_and_diffusion_defaults()[size])))
    if not 1 <= args.small_size <= args.large_size:
        raise ValueError(f"wrong sizes: --small_size {args.small_size} must be in [1, --large_size {args.large_size}]")


def upsample(model, diffusion, args, images, labels, device):
    """This rank's share of the output (images rank, rank + W, ...), uint8 NHWC: image i
    upsamples base sample i (cycling) with the seed of sample i."""
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    run_precision = precision.resolve(args.precision, device, purpose="sample")
    sample_fn = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    extra = {"eta": args.eta} if args.use_ddim else {}
    mine = list(range(rank, args.num_samples, world))
    out_images = []
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start : start + args.batch_size]
        source = [i % len(images) for i in batch]
        low = torch.from_numpy(images[source]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        model_kwargs = {"low_res": low}
        if labels is not None:
            model_kwargs["y"] = torch.from_numpy(labels[source]).to(device)
        rng = StackedRandomGenerator([sample_seed(args.seed, i) for i in batch], device)
        shape = (len(batch), 3, args.large_size, args.large_size)
        with torch.no_grad(), precision.autocast(run_precision, device):
            x = sample_fn(model, shape, noise=rng.randn(shape), clip_denoised=args.clip_denoised,
                          model_kwargs=model_kwargs, device=device, randn_like=rng.randn_like, **extra)
        out_images.append(to_uint8(x))
    return np.concatenate(out_images) if out_images else np.zeros((0, args.large_size, args.large_size, 3), np.uint8)


def gather(local, num_samples):
    """Every rank's share put back in index order."""
    world = dist_util.get_world_size()
    gathered = dist_util.all_gather_objects(local) if world > 1 else [local]
    result = np.zeros((num_samples,) + local.shape[1:], np.uint8)
    for r, part in enumerate(gathered):
        result[r::world] = part
    return result


def main(argv=None):
    args, run_config = config.parse(create_argparser(), argv, checkpoint_flag="model_path")
    resolve_sizes(args, run_config)
    check_counts(args)
    if not args.model_path or not os.path.exists(args.model_path):
        raise FileNotFoundError(f"model checkpoint not found: {args.model_path!r} (--model_path)")
    images, labels = load_base_samples(args.base_samples, args.small_size, args.class_cond)
    dist_util.setup_dist()
    device = sampling_device(args)
    log = dist_util.print0
    run = load_for_sampling(args, run_config, device, log, argv)

    log(f"upsampling {args.num_samples} images {args.small_size} -> {args.large_size} px...")
    result = gather(upsample(run.model, run.diffusion, args, images, labels, device), args.num_samples)
    if dist_util.get_rank() == 0:
        arrays = [result] if labels is None else [result, labels[np.arange(args.num_samples) % len(images)]]
        save_samples(args, arrays, os.path.dirname(os.path.abspath(run.path)), log)
    dist_util.barrier()
    log("sampling complete")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_options(parser, SAMPLE_FLAGS, table=config.SAMPLING)
    config.add_options(parser, ["config", "precision"])
    config.add_options(parser, [n for n in config.names(*config.MODEL_GROUPS) if n != "image_size"],
                       "model and diffusion (default: the training run's config.json beside --model_path)")
    return parser


if __name__ == "__main__":
    run_main(main)
