"""
1-D linear interpolation between two checkpoints (paper section 3.3, Eq. 6):

    theta(alpha) = (1 - alpha) theta_a + alpha theta_b

and the diffusion training loss of theta(alpha) on one fixed batch, with fixed timesteps and
fixed noise (both drawn from --seed), the model in eval mode (no dropout). alpha = 0 and 1
give the losses of the two checkpoints themselves.

    python scripts/interpolate.py --model_a run/model010000.pt --model_b run/model100000.pt \\
        --data_dir datasets/cifar10_train.npz --batch_size 128 --seed 0 --out interp_cifar

GAN checkpoints (ganNNNNNN.pt of scripts/gan_train.py, or any path written "gan:PATH"):
generator and discriminator are interpolated together, and both losses, the generator's
non-saturating L_G and the discriminator's L_D, are evaluated on one fixed real batch with
fixed latents (from --seed), BatchNorm on batch statistics:

    python scripts/interpolate.py --model_a runs/gan_seed0/gan000250.pt \\
        --model_b runs/gan_seed0/gan001000.pt --data_dir data/demo/mnist_demo.npz --out interp_gan

Put runs side by side (one panel per curve, e.g. a diffusion run and a GAN run):

    python scripts/interpolate.py --compare interp_dm/interpolation.json,interp_gan/interpolation.json \\
        --names diffusion,DCGAN --out interp_compare

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

from improved_diffusion.run.checkpoint import read_file
from improved_diffusion.experiments import analysis, gan
from improved_diffusion.options import config
from improved_diffusion import dist_util
from improved_diffusion.evaluation.sampling import run_differences, run_overrides
from improved_diffusion.script_util import args_to_dict, run_main


def check_args(args):
    """Reject bad flags before the models are built and the data are read."""
    analysis.require_inputs(args, ("model_a", "model_b", "data_dir"))
    if gan.is_gan_checkpoint(args.model_a) != gan.is_gan_checkpoint(args.model_b):
        raise ValueError("--model_a and --model_b must both be diffusion checkpoints or both GAN checkpoints")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    analysis.check_timestep(args.diffusion_steps, args.timestep_respacing, args.timestep)


def main(argv=None):
    args, run_config = config.parse(create_argparser(), argv, checkpoint_flag="model_a")
    if args.compare:
        return compare(args)
    check_args(args)
    alphas = parse_alphas(args.alphas, args.alpha_min, args.alpha_max, args.num_alphas)
    device = dist_util.dev()
    if gan.is_gan_checkpoint(args.model_a):
        result = gan_interpolation(args, alphas, device)
    else:
        result = diffusion_interpolation(args, run_config, alphas, device, argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "interpolation.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out, "interpolation.png"))
    for i, a in enumerate(alphas):
        print(f"alpha {a:+.3f}  " + "  ".join(f"{name} {c[i]:.6f}" for name, c in result["curves"].items()))
    print(f"wrote {args.out}/interpolation.json and interpolation.png")


def diffusion_interpolation(args, run_config, alphas, device, argv):
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
    return {
        "kind": "diffusion",
        "alphas": alphas,
        "losses": losses,
        "loss_a": endpoint[0],
        "loss_b": endpoint[1],
        "curves": {"loss": losses},
        "endpoints": {"loss": endpoint},
        "roughness": {"loss": analysis.curve_roughness(alphas, losses)},
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


def gan_interpolation(args, alphas, device):
    """Both GAN losses along the line between two GAN checkpoints (fixed batch and latents)."""
    from improved_diffusion.image_datasets import load_image_dataset

    generator, discriminator, arch = gan.load_gan(args.model_a, device)
    nets_a = {"generator": generator.state_dict(), "discriminator": discriminator.state_dict()}
    nets_a = {k: {n: v.detach().clone() for n, v in sd.items()} for k, sd in nets_a.items()}
    _, _, arch_b = gan.load_gan(args.model_b, "cpu")
    if arch_b != arch:
        raise ValueError(f"the two GAN checkpoints have different networks ({arch} vs {arch_b}) "
                         "and cannot be interpolated")
    raw_b = read_file(gan.strip_prefix(args.model_b), "--model_b")
    nets_b = {k: raw_b[k] for k in analysis.GAN_PLAYERS}
    data = load_image_dataset(args.data_dir, arch["image_size"], image_channels=arch.get("channels", 3))
    real, z = analysis.fixed_gan_inputs(data.images, args.batch_size, arch["latent_dim"], args.seed, device)
    curves = analysis.gan_interpolation_losses(generator, discriminator, nets_a, nets_b, alphas, real, z)
    endpoints = analysis.gan_interpolation_losses(generator, discriminator, nets_a, nets_b, [0.0, 1.0], real, z)
    return {
        "kind": "gan",
        "alphas": alphas,
        "curves": curves,
        "endpoints": endpoints,
        "roughness": {k: analysis.curve_roughness(alphas, v) for k, v in curves.items()},
        "model_a": args.model_a,
        "model_b": args.model_b,
        "definition": "theta(alpha) = (1 - alpha) theta_a + alpha theta_b for generator and "
        "discriminator together; L_G (non-saturating) and L_D on a fixed real batch and fixed "
        "latents, BatchNorm on batch statistics",
        "settings": {"data_dir": args.data_dir, "batch_size": int(real.shape[0]), "seed": args.seed,
                     "arch": arch},
    }


def compare(args):
    """One figure with every curve of several interpolation.json files, a panel each."""
    paths = [p for p in args.compare.split(",") if p]
    names = [n for n in args.names.split(",") if n] if args.names else [os.path.basename(os.path.dirname(p)) for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"--names has {len(names)} entries for {len(paths)} --compare files")
    panels = []
    for name, path in zip(names, paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--compare {path}: no such file")
        with open(path) as f:
            result = json.load(f)
        curves = result.get("curves") or {"loss": result["losses"]}
        for curve, losses in curves.items():
            panels.append((f"{name}: {curve}" if len(curves) > 1 else name, result["alphas"], losses))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "interpolation_compare.png")
    plot_panels(panels, path)
    print(f"wrote {path}")


def plot_panels(panels, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.0), squeeze=False)
    for ax, (title, alphas, losses) in zip(axes[0], panels):
        ax.plot(alphas, losses, "o-", ms=3)
        for x in (0.0, 1.0):
            ax.axvline(x, color="gray", lw=0.6, ls="--")
        r = analysis.curve_roughness(alphas, losses)
        ax.set_title(f"{title}\nrange/ends {r['rel_range_0_1']:.2f}, "
                     f"slope sign changes {r['direction_changes']}", fontsize=8)
        ax.set_xlabel("alpha")
    axes[0, 0].set_ylabel("loss (fixed batch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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

    curves = result["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, losses) in zip(axes[0], curves.items()):
        loss_a, loss_b = result["endpoints"][name]
        ax.plot(result["alphas"], losses, "o-", ms=3, label=f"{name}(theta(alpha))")
        ax.plot([0.0], [loss_a], "s", color="C3", ms=7, label="theta_a (alpha=0)")
        ax.plot([1.0], [loss_b], "D", color="C2", ms=7, label="theta_b (alpha=1)")
        for x in (0.0, 1.0):
            ax.axvline(x, color="gray", lw=0.6, ls="--")
        ax.set_xlabel("alpha")
        what = "(fixed batch, t, noise)" if result.get("kind", "diffusion") == "diffusion" else "(fixed batch, latents)"
        ax.set_ylabel(f"{name} {what}" if len(curves) > 1 else f"training loss {what}")
        ax.set_title("1-D interpolation" + (f": {name}" if len(curves) > 1 else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


FLAGS = ["model_a", "model_b", "data_dir", "alphas", "alpha_min", "alpha_max", "num_alphas", "batch_size", "seed",
         "timestep", "out", "compare", "names"]


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config.add_options(parser, FLAGS, table=config.SAMPLING, use="interpolate")
    config.add_options(parser, ["config"])
    config.add_model_options(parser, "model_a")
    return parser


if __name__ == "__main__":
    run_main(main)
