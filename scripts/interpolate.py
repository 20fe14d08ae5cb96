"""
1-D linear interpolation between two checkpoints (paper section 3.3, Eq. 6):

    theta(alpha) = (1 - alpha) theta_a + alpha theta_b

and the diffusion training loss of theta(alpha) on one fixed batch, with fixed timesteps and
fixed noise (both drawn from --seed), the model in eval mode (no dropout). alpha = 0 and 1
give the losses of the two checkpoints themselves.

    python scripts/interpolate.py --model_a run/model010000.pt --model_b run/model100000.pt \\
        --data_dir datasets/cifar10_train.npz --batch_size 128 --seed 0 --out interp_cifar

Writes OUT/interpolation.json (alphas, losses, endpoint losses, settings) and
OUT/interpolation.png (loss against alpha, endpoints marked). Both checkpoints must be of
one architecture: the model and diffusion flags come from the training run's `config.json`
beside --model_a (a warning names any that --model_b's run has otherwise); a checkpoint
without one needs them on the command line or in `--config FILE`.
"""

import argparse
import json
import os
import sys

import numpy as np

from improved_diffusion.checkpoint import read_file
from improved_diffusion import analysis, config, dist_util
from improved_diffusion.sampling import run_differences, run_overrides
from improved_diffusion.script_util import add_dict_to_argparser, args_to_dict, run_main


def check_args(args):
    """Reject bad flags before the models are built and the data are read."""
    for flag in ("model_a", "model_b", "data_dir"):
        path = getattr(args, flag)
        if not path:
            what = "a checkpoint" if flag != "data_dir" else "images (folder or .npz)"
            raise ValueError(f"--{flag} is required: {what}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--{flag} {path}: no such file or folder")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    analysis.check_timestep(args.diffusion_steps, args.timestep_respacing, args.timestep)


def main(argv=None):
    args, run_config = config.parse(create_argparser(), argv, checkpoint_flag="model_a")
    check_args(args)
    alphas = parse_alphas(args.alphas, args.alpha_min, args.alpha_max, args.num_alphas)
    device = dist_util.dev()
    flags = args_to_dict(args, config.names(*config.MODEL_GROUPS))
    notes = run_overrides(args, run_config, args.model_a, argv)
    for line in notes + run_differences(flags, args.model_b, args.model_a):
        print(line, file=sys.stderr)

    model, diffusion, sd_a = analysis.load_model_and_diffusion(args.model_a, flags, device)
    sd_b = read_file(args.model_b, "--model_b")
    analysis.check_same_architecture(sd_a, sd_b)

    batch, t, noise, model_kwargs = analysis.fixed_batch_from_args(args, diffusion, device)

    losses = analysis.interpolation_losses(
        model, diffusion, sd_a, sd_b, alphas, batch, t, noise, model_kwargs
    )
    endpoint = analysis.interpolation_losses(
        model, diffusion, sd_a, sd_b, [0.0, 1.0], batch, t, noise, model_kwargs
    )
    result = {
        "alphas": alphas,
        "losses": losses,
        "loss_a": endpoint[0],
        "loss_b": endpoint[1],
        "model_a": args.model_a,
        "model_b": args.model_b,
        "definition": "theta(alpha) = (1 - alpha) theta_a + alpha theta_b; mean training loss "
        "on a fixed batch, fixed timesteps and noise, eval mode",
        "settings": {
            "data_dir": args.data_dir,
            "batch_size": int(batch.shape[0]),
            "seed": args.seed,
            "timestep": None if args.timestep < 0 else args.timestep,
            "timesteps": t.cpu().tolist(),
            "flags": flags,
        },
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "interpolation.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out, "interpolation.png"))
    for a, loss in zip(alphas, losses):
        print(f"alpha {a:+.3f}  loss {loss:.6f}")
    print(f"wrote {args.out}/interpolation.json and interpolation.png")


def parse_alphas(text, alpha_min=-0.5, alpha_max=1.5, num_alphas=21):
    """
    A comma-separated list of floats; empty: num_alphas evenly spaced points from alpha_min
    to alpha_max (0 and 1 are on the default grid). Write a list that starts with a minus
    sign as --alphas=-0.5,0,0.5 (argparse reads "-0.5,..." as an option otherwise).
    """
    if not text:
        if num_alphas < 2:
            raise ValueError(f"--num_alphas must be at least 2, got {num_alphas}")
        return [float(a) for a in np.round(np.linspace(alpha_min, alpha_max, num_alphas), 10)]
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--alphas must be comma-separated numbers, got {text!r}") from None


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(result["alphas"], result["losses"], "o-", ms=3, label="loss(theta(alpha))")
    ax.plot([0.0], [result["loss_a"]], "s", color="C3", ms=7, label="theta_a (alpha=0)")
    ax.plot([1.0], [result["loss_b"]], "D", color="C2", ms=7, label="theta_b (alpha=1)")
    for x in (0.0, 1.0):
        ax.axvline(x, color="gray", lw=0.6, ls="--")
    ax.set_xlabel("alpha")
    ax.set_ylabel("training loss (fixed batch, t, noise)")
    ax.set_title("1-D interpolation", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


HELP = {
    "model_a": "checkpoint at alpha = 0",
    "model_b": "checkpoint at alpha = 1 (same architecture)",
    "data_dir": "image folder or .npz; the first batch_size images form the fixed batch",
    "alphas": "explicit comma-separated alphas (write --alphas=-0.5,0,...); overrides the grid",
    "alpha_min": "first alpha of the default grid",
    "alpha_max": "last alpha of the default grid",
    "num_alphas": "number of points of the default grid",
    "batch_size": "size of the fixed batch",
    "seed": "seed of the fixed timesteps and noise",
    "timestep": "use this timestep for every image (-1: uniform random, fixed by --seed)",
    "out": "output folder",
}


def create_argparser():
    defaults = dict(
        model_a="",
        model_b="",
        data_dir="",
        alphas="",
        alpha_min=-0.5,
        alpha_max=1.5,
        num_alphas=21,
        batch_size=64,
        seed=0,
        timestep=-1,
        out="interpolation_out",
    )
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dict_to_argparser(parser, defaults, help_text=HELP)
    config.add_options(parser, ["config"])
    config.add_options(parser, config.names(*config.MODEL_GROUPS), "model and diffusion "
                       "(default: the training run's config.json beside --model_a)")
    return parser


if __name__ == "__main__":
    run_main(main)
