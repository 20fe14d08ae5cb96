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
import json
import os

import numpy as np
import torch

from improved_diffusion import config, dist_util, precision
from improved_diffusion.sampling import (
    StackedRandomGenerator,
    load_model_weights,
    run_overrides,
    sample_seed,
    write_samples,
    to_uint8,
)
from improved_diffusion.script_util import (
    add_dict_to_argparser,
    run_main,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

SIZES = ("large_size", "small_size")


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


def main(argv=None):
    parser = create_argparser()
    args, run_config = config.parse(parser, argv, checkpoint_flag="model_path")
    for size in SIZES:  # the run's sizes, unless given
        if getattr(args, size) == 0:
            setattr(args, size, int((run_config or {}).get(size, sr_model_and_diffusion_defaults()[size])))
    if not 1 <= args.small_size <= args.large_size:
        raise ValueError(f"wrong sizes: --small_size {args.small_size} must be in [1, --large_size {args.large_size}]")
    for flag in ("num_samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not args.model_path or not os.path.isfile(args.model_path):
        raise FileNotFoundError(f"model checkpoint not found: {args.model_path!r} (--model_path)")
    images, labels = load_base_samples(args.base_samples, args.small_size, args.class_cond)
    dist_util.setup_dist()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    device = torch.device(args.device) if args.device else dist_util.dev()
    log = dist_util.print0
    for note in run_overrides(args, run_config, args.model_path, argv):
        log(note)

    keys = [k for k in sr_model_and_diffusion_defaults() if k not in SIZES]
    model, diffusion = sr_create_model_and_diffusion(
        **{k: getattr(args, k) for k in keys}, large_size=args.large_size, small_size=args.small_size,
        channel_mult=args.channel_mult,
    )
    load_model_weights(model, args.model_path)
    model.to(device).eval()
    if args.use_fp16:
        model.convert_to_fp16()
    run_precision = precision.resolve(args.precision, device, purpose="sample")
    sample_fn = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    extra = {"eta": args.eta} if args.use_ddim else {}

    log(f"upsampling {args.num_samples} images {args.small_size} -> {args.large_size} px...")
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
    local = np.concatenate(out_images) if out_images else np.zeros((0, args.large_size, args.large_size, 3), np.uint8)
    gathered = dist_util.all_gather_objects(local) if world > 1 else [local]
    result = np.zeros((args.num_samples, args.large_size, args.large_size, 3), np.uint8)
    for r, part in enumerate(gathered):
        result[r::world] = part
    if rank == 0:
        shape_str = "x".join(str(d) for d in result.shape)
        out = args.out if args.out.endswith(".npz") else os.path.join(
            args.out or os.path.dirname(os.path.abspath(args.model_path)), f"samples_{shape_str}.npz")
        arrays = [result] if labels is None else [result, labels[np.arange(args.num_samples) % len(images)]]
        grid = None if args.grid == "none" else args.grid or out[: -len(".npz")] + "_grid.png"
        write_samples(out, arrays, grid, args.grid_size, log)
        log(json.dumps({"out": out, "num_samples": len(result)}))
    dist_util.barrier()
    log("sampling complete")


def create_argparser():
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        eta=0.0,
        base_samples="",
        model_path="",
        seed=0,
        out="",
        grid="",
        grid_size=64,
        device="",
        large_size=0,
        small_size=0,
    )
    help_text = {
        "clip_denoised": "clip predicted x_0 to [-1, 1] at every step",
        "num_samples": "number of images to generate (base samples are reused cyclically)",
        "batch_size": "images per forward pass in each process",
        "use_ddim": "sample with DDIM (use with --timestep_respacing ddimN)",
        "eta": "DDIM eta (0 = deterministic DDIM)",
        "base_samples": ".npz of low-resolution uint8 images (arr_0) and labels (arr_1, class_cond)",
        "model_path": "super-resolution checkpoint (modelNNNNNN.pt or ema_RATE_NNNNNN.pt)",
        "seed": "run seed; image i gets its own seed derived from it",
        "out": "output .npz path, or a folder (default: the checkpoint's folder)",
        "grid": "PNG grid path; 'none': no grid; empty: next to the .npz",
        "grid_size": "number of images in the grid",
        "device": "cpu, cuda, cuda:1; empty: this rank's GPU if any, else cpu",
        "large_size": "side of the output images; 0: the run's (config.json), else 256",
        "small_size": "side of the base samples; 0: the run's (config.json), else 64",
    }
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, defaults, help_text)
    config.add_options(parser, ["config", "precision"])
    config.add_options(parser, [n for n in config.names(*config.MODEL_GROUPS) if n != "image_size"],
                       "model and diffusion (default: the training run's config.json beside --model_path)")
    return parser


if __name__ == "__main__":
    run_main(main)
