"""
Generate a large batch of image samples from a model and save them as a large numpy array
(`arr_0`: uint8 NHWC images, `arr_1`: class labels when class-conditional), plus a PNG grid.
The images can then be scored with `scripts/fid.py`.

One process, from a checkpoint of a training run: the model and diffusion flags come from
the run's `config.json` beside the checkpoint (image_train.py writes it), so none are needed:

    python scripts/image_sample.py --model_path runs/cifar/ema_0.9999_500000.pt \\
        --timestep_respacing 250 --num_samples 50000 --batch_size 256 --seed 0

`--model_path` may also be the run's folder: its newest intact EMA checkpoint
(improved_diffusion/run/run_dir.py `load_run`).

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

Sample i is drawn with its own seed (see improved_diffusion/evaluation/sampling.py), so a given
(--seed, i) gives the same image whatever --batch_size and number of processes.
Output: --out (an .npz path, or a folder), default
`{log_dir}/samples_{N}x{H}x{W}x3.npz` where log_dir is --log_dir, else $OPENAI_LOGDIR, else
the checkpoint's folder; the grid goes next to it (`..._grid.png`) unless --grid is given.
"""

import argparse
import os
import sys

import torch

from improved_diffusion.options import config
from improved_diffusion import dist_util
from improved_diffusion.respace import space_timesteps
from improved_diffusion.evaluation.sampling import (
    check_counts,
    classes_to_sample,
    load_for_sampling,
    sample_with_flags,
    sampling_device,
    save_samples,
)
from improved_diffusion.script_util import NUM_CLASSES, parse_attention_resolutions, parse_channel_mult, run_main
from improved_diffusion.unet import ClassifierFreeGuidance

SAMPLE_FLAGS = ["model_path", "num_samples", "batch_size", "use_ddim", "eta", "clip_denoised", "seed", "num_classes",
                "guidance_scale", "out", "grid", "grid_size", "log_dir", "device"]


def check_args(args):
    """Reject flag values that cannot work before anything is built (errors name the flag)."""
    check_counts(args, ("num_samples", "batch_size", "diffusion_steps"))
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


def exit_on_checkpoint_error(message):
    """A missing or unfitting checkpoint: one `error:` line (rank 0) and exit status 2."""
    if dist_util.get_rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def load_model(args, run_config, device, log, argv):
    """The model (wrapped for guidance, compiled when asked) and diffusion of --model_path,
    and the classes to draw labels from."""
    if not args.model_path:  # before the (possibly large) model is built
        exit_on_checkpoint_error("no checkpoint given: pass --model_path")
    if not os.path.exists(args.model_path):
        exit_on_checkpoint_error(f"model checkpoint not found: {args.model_path} (--model_path)")
    warn_ddim_respacing(args, log)
    log(f"creating model and diffusion ({dist_util.get_world_size()} process(es), device {device})...")
    try:
        run = load_for_sampling(args, run_config, device, log, argv)
    except (FileNotFoundError, ValueError) as exc:
        exit_on_checkpoint_error(exc)
    num_classes = classes_to_sample(args.num_classes, args.class_cond, args.model_path, log, run_config)
    model = run.model
    if args.guidance_scale != 0:
        if not args.class_cond:
            raise ValueError("--guidance_scale needs a class-conditional model (--class_cond True)")
        model = ClassifierFreeGuidance(model, args.guidance_scale)
        log(f"classifier-free guidance with scale {args.guidance_scale}")
    if args.compile:  # pays off at large batches on a GPU (docs/benchmarks.md: 3.4x on an H200)
        model = torch.compile(model, mode=args.compile_mode)
    return model, run.diffusion, num_classes, run.path


def main(argv=None):
    args, run_config = config.parse(create_argparser(), argv, checkpoint_flag="model_path")
    check_args(args)
    dist_util.setup_dist()
    device = sampling_device(args)
    log = dist_util.print0
    model, diffusion, num_classes, weights = load_model(args, run_config, device, log, argv)

    log(f"sampling {args.num_samples} images with seed {args.seed}...")
    images, labels, seconds = sample_with_flags(model, diffusion, args, device, image_size=args.image_size,
                                                class_cond=args.class_cond, num_classes=num_classes)
    if dist_util.get_rank() == 0:
        default_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR") or os.path.dirname(os.path.abspath(weights))
        save_samples(args, [images] if labels is None else [images, labels], default_dir, log,
                     seconds=round(seconds, 2), images_per_second=round(len(images) / max(seconds, 1e-9), 2))
    dist_util.barrier()
    log("sampling complete")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_options(parser, SAMPLE_FLAGS, table=config.SAMPLING)
    config.add_options(parser, ["config", "precision", "compile", "compile_mode"])
    config.add_model_options(parser)
    return parser


if __name__ == "__main__":
    run_main(main)
