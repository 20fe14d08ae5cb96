"""
Generate a large batch of image samples from a model and save them as a large numpy array
(`arr_0`: uint8 NHWC images, `arr_1`: class labels when class-conditional), plus a PNG grid.
The images can then be scored with `scripts/fid.py`.

One process, from a checkpoint of a training run: the model and diffusion flags come from
the run's `config.json` beside the checkpoint (image_train.py writes it), so none are needed:

    python scripts/image_sample.py --model_path runs/cifar/ema_0.9999_500000.pt \\
        --timestep_respacing 250 --num_samples 50000 --batch_size 256 --seed 0

Several GPUs (images are identical to the one-process run with the same --seed):

    mpiexec -n 8 python scripts/image_sample.py --model_path runs/cifar/ema_0.9999_500000.pt \\
        --timestep_respacing 250 --num_samples 50000 --batch_size 256 --precision bf16

A checkpoint without its run's config.json (e.g. a released one) needs the model flags, on
the command line or in a `--config FILE` of option values. A model flag on the command line
overrides the run's value (one `note:` line says so). A class-conditional model draws its
labels from the run's `data_num_classes` unless `--num_classes` is given.

Classifier-free guidance (a model trained with `--class_dropout_prob 0.1`, say):
`--guidance_scale 2`. Classifier guidance: scripts/classifier_sample.py.

DDIM with 50 steps: `--use_ddim True --timestep_respacing ddim50 [--eta 0.0]`. On a GPU,
`--precision bf16 --compile True --batch_size 1000` is the fast way to 10k samples (25 s for
the CIFAR-10 model on an H200, compilation aside; docs/benchmarks.md).
(`ddim50` without `--use_ddim True` runs ordinary ancestral sampling on those 50 steps).

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

import torch

from improved_diffusion import config, dist_util, precision
from improved_diffusion.respace import space_timesteps
from improved_diffusion.sampling import (
    classes_to_sample,
    load_model_weights,
    run_overrides,
    sample_images,
    write_samples,
)
from improved_diffusion.script_util import (
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    parse_attention_resolutions,
    parse_channel_mult,
    run_main,
)
from improved_diffusion.unet import ClassifierFreeGuidance


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


def warn_ddim_respacing(args, log):
    if args.timestep_respacing.startswith("ddim") and not args.use_ddim:
        log(f"warning: --timestep_respacing {args.timestep_respacing} without --use_ddim True "
            f"samples with ordinary ancestral steps on those timesteps; add --use_ddim True "
            f"for DDIM")


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
    args, run_config = config.parse(create_argparser(), argv, checkpoint_flag="model_path")
    check_args(args)
    dist_util.setup_dist()
    rank, world_size = dist_util.get_rank(), dist_util.get_world_size()
    device = torch.device(args.device) if args.device else dist_util.dev()

    log = dist_util.print0
    def checkpoint_error(exc):
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)

    if not args.model_path:  # before the (possibly large) model is built
        checkpoint_error("no checkpoint given: pass --model_path")
    if not os.path.isfile(args.model_path):
        checkpoint_error(f"model checkpoint not found: {args.model_path} (--model_path)")
    for note in run_overrides(args, run_config, args.model_path, argv):
        log(note)
    warn_ddim_respacing(args, log)
    log(f"creating model and diffusion ({world_size} process(es), device {device})...")
    model, diffusion = create_model_and_diffusion(
        **args_to_dict(args, config.names(*config.MODEL_GROUPS))
    )
    try:
        load_model_weights(model, args.model_path)
    except (FileNotFoundError, ValueError) as exc:
        checkpoint_error(exc)
    num_classes = classes_to_sample(args.num_classes, args.class_cond, args.model_path, log, run_config)
    model.to(device)
    if args.use_fp16:
        model.convert_to_fp16()
    model.eval()
    if args.guidance_scale != 0:
        if not args.class_cond:
            raise ValueError("--guidance_scale needs a class-conditional model (--class_cond True)")
        model = ClassifierFreeGuidance(model, args.guidance_scale)
        log(f"classifier-free guidance with scale {args.guidance_scale}")
    if args.compile:  # pays off at large batches on a GPU (docs/benchmarks.md: 3.4x on an H200)
        model = torch.compile(model, mode=args.compile_mode)
    autocast_dtype = precision.DTYPES[precision.resolve(args.precision, device, purpose="sample")]

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
        autocast_dtype=autocast_dtype,
    )
    seconds = time.time() - start

    if rank == 0:
        shape_str = "x".join(str(d) for d in images.shape)
        out, grid = output_paths(args, shape_str)
        write_samples(out, [images] if labels is None else [images, labels], grid, args.grid_size, log)
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
        guidance_scale=0.0,
    )
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
        "guidance_scale": "classifier-free guidance w: eps = (1 + w) eps(x, y) - w eps(x, null) "
                          "(a model trained with --class_dropout_prob > 0; 0: off, -1: unconditional)",
    }
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dict_to_argparser(parser, defaults, help_text)
    config.add_options(parser, ["config", "precision", "compile", "compile_mode"])
    config.add_options(parser, config.names(*config.MODEL_GROUPS), "model and diffusion "
                       "(default: the training run's config.json beside --model_path)")
    return parser


if __name__ == "__main__":
    run_main(main)
