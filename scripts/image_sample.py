"""
Generate a large batch of image samples from a model and save them as a large numpy array
(`arr_0`: uint8 NHWC images, `arr_1`: class labels when class-conditional), plus a PNG grid.
The images can then be scored with `scripts/fid.py`.

One process:

    python scripts/image_sample.py --model_path runs/cifar/ema_0.9999_500000.pt \\
        --image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True \\
        --dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine \\
        --timestep_respacing 250 --num_samples 50000 --batch_size 256 --seed 0

Several GPUs (images are identical to the one-process run with the same --seed):

    mpiexec -n 8 python scripts/image_sample.py --model_path ... $MODEL_FLAGS $DIFFUSION_FLAGS \\
        --num_samples 50000 --batch_size 256 --precision bf16

DDIM with 50 steps: `--use_ddim True --timestep_respacing ddim50 [--eta 0.0]`
(`ddim50` without `--use_ddim True` runs ordinary ancestral sampling on those 50 steps).

When the checkpoint's folder holds the training run's `config.json`, every model/diffusion
flag that differs from it is reported (the flags still decide), and a class-conditional
model draws its labels from the run's `data_num_classes` unless `--num_classes` is given.

Sample i is drawn with its own seed (see improved_diffusion/sampling.py), so a given
(--seed, i) gives the same image whatever --batch_size and number of processes.
Output: --out (an .npz path, or a folder), default
`{log_dir}/samples_{N}x{H}x{W}x3.npz` where log_dir is --log_dir, else $OPENAI_LOGDIR, else
the checkpoint's folder; the grid goes next to it (`..._grid.png`) unless --grid is given.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from improved_diffusion import dist_util
from improved_diffusion.sampling import (
    classes_to_sample,
    load_model_weights,
    read_run_config,
    run_config_path,
    sample_images,
    save_grid,
)
from improved_diffusion.respace import space_timesteps
from improved_diffusion.script_util import (
    run_main,
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_attention_resolutions,
    parse_channel_mult,
    str2bool,
)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Flags that may differ from the training run on purpose: they change how the model is run,
# not what it computes (dropout is off in eval mode), so a difference is not reported.
RUN_TIME_FLAGS = ("timestep_respacing", "use_checkpoint", "use_fp16", "dropout")


def check_args(args):
    """Reject flag values that cannot work before anything is built (errors name the flag)."""
    for flag in ("num_samples", "batch_size", "diffusion_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.num_classes <= NUM_CLASSES:
        raise ValueError(
            f"--num_classes must be 1..{NUM_CLASSES} (the rows of the model's label "
            f"embedding) or 0 for auto, got {args.num_classes}"
        )
    try:
        space_timesteps(args.diffusion_steps, args.timestep_respacing or [args.diffusion_steps])
    except ValueError as e:
        raise ValueError(
            f"--timestep_respacing {args.timestep_respacing!r} does not fit --diffusion_steps "
            f"{args.diffusion_steps}: {e}"
        ) from None
    try:
        mult = parse_channel_mult(args.channel_mult, args.image_size)
        parse_attention_resolutions(args.attention_resolutions, args.image_size, len(mult))
    except ValueError as e:
        raise ValueError(
            f"bad model flags (--image_size {args.image_size} --channel_mult "
            f"{args.channel_mult!r} --attention_resolutions {args.attention_resolutions!r}): {e}"
        ) from None


def _canonical(key, value, default, image_size):
    """One spelling of a flag value, so that argparse's and JSON's compare equal."""
    try:
        if isinstance(default, bool):
            return str2bool(value)
        if isinstance(default, (int, float)):
            return float(value)
        if key == "channel_mult":  # "" means the table's entry for image_size
            return parse_channel_mult(value, int(image_size))
        if key == "attention_resolutions":
            return sorted(int(x) for x in str(value).split(",") if x.strip())
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        pass
    return str(value)


def _spell(value):
    return "''" if value == "" else str(value)


def warn_flags_differ_from_run(args, model_path, log):
    """
    Report every model/diffusion flag whose value differs from the training run's
    config.json next to the checkpoint (the flags stay in charge: the checkpoint key check
    only catches architecture changes, not e.g. another noise schedule). Also warns about
    `ddimN` respacing without --use_ddim. Returns the run's config, or None.
    """
    if args.timestep_respacing.startswith("ddim") and not args.use_ddim:
        log(f"warning: --timestep_respacing {args.timestep_respacing} without --use_ddim True "
            f"samples with ordinary ancestral steps on those timesteps; add --use_ddim True "
            f"for DDIM")
    config = read_run_config(model_path, log)
    if config is None:
        return None
    path = run_config_path(model_path)
    for key, default in model_and_diffusion_defaults().items():
        if key in RUN_TIME_FLAGS or key not in config:
            continue
        mine, theirs = getattr(args, key), config[key]
        if _canonical(key, mine, default, args.image_size) != _canonical(
            key, theirs, default, config.get("image_size", args.image_size)
        ):
            log(f"warning: --{key} {_spell(mine)} differs from the training run's "
                f"{_spell(theirs)} ({path}); using --{key} {_spell(mine)}")
    return config


def output_paths(args, shape_str):
    """(npz path, grid path or None) from --out / --grid / --log_dir."""
    out = args.out
    if not out or not out.endswith(".npz"):
        directory = out or args.log_dir or os.environ.get("OPENAI_LOGDIR") or (
            os.path.dirname(os.path.abspath(args.model_path))
        )
        out = os.path.join(directory, f"samples_{shape_str}.npz")
    if args.grid == "none" or args.grid_size <= 0:
        grid = None
    else:
        grid = args.grid or out[: -len(".npz")] + "_grid.png"
    return out, grid


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_args(args)
    dist_util.setup_dist()
    rank, world_size = dist_util.get_rank(), dist_util.get_world_size()
    device = torch.device(args.device) if args.device else dist_util.dev()

    def log(*msg):
        if rank == 0:
            print(*msg, flush=True)

    def checkpoint_error(exc):
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)

    if not args.model_path:  # before the (possibly large) model is built
        checkpoint_error("no checkpoint given: pass --model_path")
    if not os.path.isfile(args.model_path):
        checkpoint_error(f"model checkpoint not found: {args.model_path} (--model_path)")
    config = warn_flags_differ_from_run(args, args.model_path, log)
    log(f"creating model and diffusion ({world_size} process(es), device {device})...")
    model, diffusion = create_model_and_diffusion(
        **args_to_dict(args, model_and_diffusion_defaults().keys())
    )
    try:
        load_model_weights(model, args.model_path)
    except (FileNotFoundError, ValueError) as exc:
        checkpoint_error(exc)
    num_classes = classes_to_sample(args.num_classes, args.class_cond, args.model_path, log, config)
    model.to(device)
    if args.use_fp16:
        model.convert_to_fp16()
    model.eval()

    log(f"sampling {args.num_samples} images with seed {args.seed}...")
    start = time.time()
    images, labels = sample_images(
        model,
        diffusion,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=device,
        seed=args.seed,
        use_ddim=args.use_ddim,
        eta=args.eta,
        clip_denoised=args.clip_denoised,
        class_cond=args.class_cond,
        num_classes=num_classes,
        progress=rank == 0,
        autocast_dtype=PRECISIONS[args.precision],
    )
    seconds = time.time() - start

    if rank == 0:
        shape_str = "x".join(str(d) for d in images.shape)
        out, grid = output_paths(args, shape_str)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        arrays = [images] if labels is None else [images, labels]
        tmp = out + ".tmp.npz"
        np.savez(tmp, *arrays)
        os.replace(tmp, out)
        log(f"saving to {out}")
        if grid is not None:
            save_grid(images[: args.grid_size], grid)
            log(f"grid of {min(len(images), args.grid_size)} images: {grid}")
        log(json.dumps({"out": out, "num_samples": len(images), "seconds": round(seconds, 2),
                        "images_per_second": round(len(images) / max(seconds, 1e-9), 2)}))
    dist_util.barrier()
    log("sampling complete")


def create_argparser():
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        model_path="",
        seed=0,
        eta=0.0,
        out="",
        grid="",
        grid_size=64,
        log_dir="",
        num_classes=0,
        device="",
    )
    defaults.update(model_and_diffusion_defaults())
    help_text = {
        "clip_denoised": "clip predicted x_0 to [-1, 1] at every step",
        "num_samples": "number of images to generate (over all processes)",
        "batch_size": "images per forward pass in each process",
        "use_ddim": "sample with DDIM (use with --timestep_respacing ddimN)",
        "model_path": "checkpoint to load (modelNNNNNN.pt or ema_RATE_NNNNNN.pt)",
        "seed": "run seed; sample i gets its own seed derived from it",
        "eta": "DDIM eta (0 = deterministic DDIM)",
        "out": "output .npz path, or a folder for samples_NxHxWx3.npz",
        "grid": "PNG grid path; 'none': no grid; empty: next to the .npz",
        "grid_size": "number of images in the grid",
        "log_dir": "folder for the default output; empty: $OPENAI_LOGDIR, else the "
                   "checkpoint's folder",
        "num_classes": "classes to draw labels from (class_cond); 0: data_num_classes of "
                       "the training run's config.json next to the checkpoint, else 1000",
        "device": "cpu, cuda, cuda:1; empty: this rank's GPU if any, else cpu",
    }
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dict_to_argparser(parser, defaults, help_text)
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                        help="autocast dtype of the model (bf16 on recent GPUs; "
                             "default: %(default)s)")
    return parser


if __name__ == "__main__":
    run_main(main)
