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

Sample i is drawn with its own seed (improved_diffusion/evaluation/sampling.py): the same (--seed, i)
gives the same image whatever --batch_size and number of processes. Output: an .npz
(`arr_0` images, `arr_1` labels) and a PNG grid, as image_sample.py.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from improved_diffusion.options import config
from improved_diffusion import dist_util
from improved_diffusion.evaluation.sampling import (
    check_counts,
    classes_to_sample,
    load_for_sampling,
    load_model_weights,
    read_run_config,
    sample_with_flags,
    sampling_device,
    save_samples,
)
from improved_diffusion.script_util import (
    args_to_dict,
    create_classifier,
    run_main,
)

SAMPLE_FLAGS = ["model_path", "classifier_path", "classifier_scale", "num_samples", "batch_size", "use_ddim", "eta",
                "clip_denoised", "seed", "num_classes", "out", "grid", "grid_size", "device"]
CLASSIFIER_FLAGS = list(config.TOOLS["classifier"])
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


def check_paths(args):
    """Both checkpoints must be given and exist (errors name the flag)."""
    if not args.model_path:
        raise ValueError("no checkpoint given: pass --model_path")
    if not os.path.exists(args.model_path):
        raise FileNotFoundError(f"model checkpoint not found: {args.model_path} (--model_path)")
    if not args.classifier_path:
        raise ValueError("no classifier given: pass --classifier_path (train one with scripts/classifier_train.py)")
    if not os.path.isfile(args.classifier_path):
        raise FileNotFoundError(f"classifier checkpoint not found: {args.classifier_path} (--classifier_path)")


def guided_model(args, run_config, classifier_config, device, log, argv):
    """(model, diffusion that always passes the classifier's cond_fn, classes to sample, the
    model's weights file), after checking that the classifier fits the model."""
    run = load_for_sampling(args, run_config, device, log, argv)
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
    model = run.model
    classifier.to(device).eval()
    if args.classifier_use_fp16:
        classifier.convert_to_fp16()
    if not args.class_cond:
        model = _WithoutLabels(model)
    return model, _WithCondFn(run.diffusion, make_cond_fn(classifier, args.classifier_scale)), num_classes, run.path


def main(argv=None):
    parser = create_argparser()
    pre, _ = parser.parse_known_args(argv)
    inherited, classifier_config = classifier_run(pre.classifier_path, argv)
    parser.set_defaults(**inherited)
    args, run_config = config.parse(parser, argv, checkpoint_flag="model_path")
    check_counts(args)
    check_paths(args)
    dist_util.setup_dist()
    device = sampling_device(args)
    log = dist_util.print0
    model, guided, num_classes, weights = guided_model(args, run_config, classifier_config, device, log, argv)

    log(f"sampling {args.num_samples} images with classifier scale {args.classifier_scale}...")
    images, labels, seconds = sample_with_flags(model, guided, args, device, image_size=args.image_size,
                                                class_cond=True, num_classes=num_classes)
    if dist_util.get_rank() == 0:
        save_samples(args, [images, labels], os.path.dirname(os.path.abspath(weights)), log, seconds=round(seconds, 2))
    dist_util.barrier()
    log("sampling complete")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_options(parser, SAMPLE_FLAGS, table=config.SAMPLING)
    config.add_options(parser, CLASSIFIER_FLAGS, table=config.TOOLS["classifier"])
    config.add_options(parser, ["config", "precision"])
    config.add_model_options(parser)
    return parser


if __name__ == "__main__":
    run_main(main)
