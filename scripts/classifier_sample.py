"""
Like image_sample.py, but guide the sampling with a noise-aware classifier (classifier
guidance, Dhariwal and Nichol 2021): every step adds `--classifier_scale` times the gradient
of log p(y | x_t) to the mean (DDPM) or to the score (DDIM).

    python scripts/classifier_sample.py --model_path runs/digits/ema_0.9999_010000.pt \\
        --classifier_path runs/classifier/model002000.pt --classifier_scale 2 \\
        --timestep_respacing ddim50 --use_ddim True --num_samples 1000 --batch_size 100

The model flags come from the diffusion model's run (`config.json` beside --model_path), the
classifier flags from the classifier's (`config.json` beside --classifier_path, written by
classifier_train.py); flags on the command line override both, and a checkpoint without its
run needs them given. The classifier must have been trained with the model's diffusion
(steps, schedule, timestep scaling) at the model's image size, on its classes: any
difference is an error. An unconditional model works too (the labels then only steer the
classifier).

Sample i is drawn with its own seed (improved_diffusion/sampling.py): the same (--seed, i)
gives the same image whatever --batch_size and number of processes. Output: an .npz
(`arr_0` images, `arr_1` labels) and a PNG grid, as image_sample.py.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from improved_diffusion import config, dist_util, precision
from improved_diffusion.sampling import (
    classes_to_sample,
    load_model_weights,
    read_run_config,
    run_overrides,
    sample_images,
    write_samples,
)
from improved_diffusion.script_util import (
    CLASSIFIER_EXTRA_DEFAULTS,
    add_dict_to_argparser,
    args_to_dict,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    run_main,
)

CLASSIFIER_FLAGS = [k for k in (*classifier_defaults(), *CLASSIFIER_EXTRA_DEFAULTS) if k != "image_size"]
# The classifier's diffusion must be the model's: the noise levels it learned, and the
# timesteps it was shown.
SHARED_DIFFUSION_FLAGS = ("diffusion_steps", "noise_schedule", "rescale_timesteps")


class _WithCondFn:
    """A diffusion whose sampling loops always get `cond_fn` (sample_images takes none)."""

    def __init__(self, diffusion, cond_fn):
        self.diffusion, self.cond_fn = diffusion, cond_fn

    def p_sample_loop(self, *args, **kwargs):
        return self.diffusion.p_sample_loop(*args, cond_fn=self.cond_fn, **kwargs)

    def ddim_sample_loop(self, *args, **kwargs):
        return self.diffusion.ddim_sample_loop(*args, cond_fn=self.cond_fn, **kwargs)


class _WithoutLabels(torch.nn.Module):
    """An unconditional model called with labels (they are for the classifier only)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, timesteps, y=None, **kwargs):
        return self.model(x, timesteps, **kwargs)


def make_cond_fn(classifier, scale):
    """cond_fn(x, t, y): `scale` times the gradient of log p(y | x_t) under the classifier."""

    def cond_fn(x, t, y=None):
        if y is None:
            raise ValueError("classifier guidance needs the class labels y")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs[torch.arange(len(y), device=y.device), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def classifier_run(path, argv):
    """The classifier's config.json (beside its checkpoint) as parser defaults, or {}."""
    run = read_run_config(path) if path else None
    if not run:
        return {}, None
    explicit = config.explicit_flags(sys.argv[1:] if argv is None else argv)
    return {k: run[k] for k in CLASSIFIER_FLAGS if k in run and k not in explicit}, run


def check_classifier(args, classifier_config, num_classes):
    """Errors for a classifier that cannot guide this model (sizes, classes, diffusion)."""
    if classifier_config is None:
        return
    path = config.run_config_path(args.classifier_path)
    size = classifier_config.get("image_size")
    if size is not None and size != args.image_size:
        raise ValueError(f"wrong sizes: the classifier was trained at {size} px ({path}), the model "
                         f"samples {args.image_size} px")
    for key in SHARED_DIFFUSION_FLAGS:
        if key in classifier_config and classifier_config[key] != getattr(args, key):
            raise ValueError(f"the classifier was trained with --{key} {classifier_config[key]} ({path}), "
                             f"the model uses {getattr(args, key)}: train it with the model's diffusion")
    theirs = classifier_config.get("data_num_classes")
    if theirs is not None and theirs != num_classes:
        raise ValueError(f"class count mismatch: the classifier was trained on {theirs} classes ({path}), "
                         f"the model samples {num_classes}")


def main(argv=None):
    parser = create_argparser()
    pre, _ = parser.parse_known_args(argv)
    inherited, classifier_config = classifier_run(pre.classifier_path, argv)
    parser.set_defaults(**inherited)
    args, run_config = config.parse(parser, argv, checkpoint_flag="model_path")
    for flag in ("num_samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not args.model_path:
        raise ValueError("no checkpoint given: pass --model_path")
    if not os.path.isfile(args.model_path):
        raise FileNotFoundError(f"model checkpoint not found: {args.model_path} (--model_path)")
    if not args.classifier_path:
        raise ValueError("no classifier given: pass --classifier_path (train one with scripts/classifier_train.py)")
    if not os.path.isfile(args.classifier_path):
        raise FileNotFoundError(f"classifier checkpoint not found: {args.classifier_path} (--classifier_path)")
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    device = torch.device(args.device) if args.device else dist_util.dev()
    log = dist_util.print0
    for note in run_overrides(args, run_config, args.model_path, argv):
        log(note)

    model, diffusion = create_model_and_diffusion(**args_to_dict(args, config.names(*config.MODEL_GROUPS)))
    load_model_weights(model, args.model_path)
    if not args.class_cond and args.num_classes == 0 and (classifier_config or {}).get("data_num_classes"):
        num_classes = classifier_config["data_num_classes"]  # an unconditional model knows no classes
    else:
        num_classes = classes_to_sample(args.num_classes, True, args.model_path, log, run_config)
    if num_classes > args.classifier_num_classes:
        raise ValueError(f"class count mismatch: {num_classes} classes to sample, but the classifier has "
                         f"{args.classifier_num_classes} outputs (--classifier_num_classes)")
    check_classifier(args, classifier_config, num_classes)
    classifier = create_classifier(image_size=args.image_size, **args_to_dict(args, CLASSIFIER_FLAGS))
    load_model_weights(classifier, args.classifier_path)

    model.to(device).eval()
    classifier.to(device).eval()
    if args.use_fp16:
        model.convert_to_fp16()
    if args.classifier_use_fp16:
        classifier.convert_to_fp16()
    if not args.class_cond:
        model = _WithoutLabels(model)
    guided = _WithCondFn(diffusion, make_cond_fn(classifier, args.classifier_scale))
    autocast_dtype = precision.DTYPES[precision.resolve(args.precision, device, purpose="sample")]

    log(f"sampling {args.num_samples} images with classifier scale {args.classifier_scale}...")
    start = time.time()
    images, labels = sample_images(
        model,
        guided,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=device,
        seed=args.seed,
        use_ddim=args.use_ddim,
        eta=args.eta,
        clip_denoised=args.clip_denoised,
        class_cond=True,
        num_classes=num_classes,
        progress=rank == 0,
        autocast_dtype=autocast_dtype,
    )
    seconds = time.time() - start
    if rank == 0:
        shape = "x".join(str(d) for d in images.shape)
        out = args.out if args.out.endswith(".npz") else os.path.join(
            args.out or os.path.dirname(os.path.abspath(args.model_path)), f"samples_{shape}.npz")
        grid = None if args.grid == "none" else args.grid or out[: -len(".npz")] + "_grid.png"
        write_samples(out, [images, labels], grid, args.grid_size, log)
        log(json.dumps({"out": out, "num_samples": len(images), "seconds": round(seconds, 2)}))
    dist_util.barrier()
    log("sampling complete")


def create_argparser():
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        model_path="",
        classifier_path="",
        classifier_scale=1.0,
        seed=0,
        eta=0.0,
        out="",
        grid="",
        grid_size=64,
        num_classes=0,
        device="",
    )
    help_text = {
        "clip_denoised": "clip predicted x_0 to [-1, 1] at every step",
        "num_samples": "number of images to generate (over all processes)",
        "batch_size": "images per forward pass in each process",
        "use_ddim": "sample with DDIM (guidance through the score) instead of DDPM (through the mean)",
        "model_path": "diffusion model checkpoint (modelNNNNNN.pt or ema_RATE_NNNNNN.pt)",
        "classifier_path": "classifier checkpoint (classifier_train.py's modelNNNNNN.pt, or a released one)",
        "classifier_scale": "the guidance scale s: the gradient of s log p(y | x_t) is added",
        "seed": "run seed; sample i gets its own seed derived from it",
        "eta": "DDIM eta (0 = deterministic DDIM)",
        "out": "output .npz path, or a folder (default: the model checkpoint's folder)",
        "grid": "PNG grid path; 'none': no grid; empty: next to the .npz",
        "grid_size": "number of images in the grid",
        "num_classes": "classes to draw labels from; 0: data_num_classes of the model's run (else the "
                       "classifier's), else 1000",
        "device": "cpu, cuda, cuda:1; empty: this rank's GPU if any, else cpu",
    }
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, defaults, help_text)
    classifier_flags = {**classifier_defaults(), **CLASSIFIER_EXTRA_DEFAULTS}
    add_dict_to_argparser(parser, {k: classifier_flags[k] for k in CLASSIFIER_FLAGS},
                          {"classifier_pool": "the classifier's head: attention, adaptive, spatial or spatial_v2"})
    config.add_options(parser, ["config", "precision"])
    config.add_options(parser, config.names(*config.MODEL_GROUPS), "model and diffusion "
                       "(default: the training run's config.json beside --model_path)")
    return parser


if __name__ == "__main__":
    run_main(main)
