"""
Hessian spectrum of the diffusion loss (paper section 3.3): the top eigenvalues of the
Hessian of the mean training loss on one fixed batch, with fixed timesteps and noise (drawn
from --seed) and the model in eval mode, by Lanczos with full reorthogonalisation and/or
power iteration on Hessian-vector products (double backprop); optionally the eigenvalue
density by stochastic Lanczos quadrature.

    python scripts/hessian.py --model_path run/ema_0.9999_100000.pt \\
        --data_dir datasets/cifar10_train.npz --batch_size 64 --top_k 5 --method both \\
        --out hessian_cifar

The model and diffusion flags come from the training run's `config.json` beside the
checkpoint; a checkpoint without one needs them on the command line or in `--config FILE`.

GAN checkpoints (ganNNNNNN.pt of scripts/gan_train.py, or any path written "gan:PATH"): the
Hessian of one player's loss with respect to its own parameters, --gan_loss generator (the
non-saturating L_G, generator parameters, discriminator fixed) or discriminator (L_D,
discriminator parameters), on one fixed real batch and fixed latents (from --seed), BatchNorm
on batch statistics:

    python scripts/hessian.py --model_path runs/gan_seed0/gan001000.pt --gan_loss generator \\
        --data_dir data/demo/mnist_demo.npz --batch_size 64 --out hessian_gan_g

Put runs side by side (top eigenvalues and densities of several hessian.json files):

    python scripts/hessian.py --compare hessian_dm/hessian.json,hessian_gan_g/hessian.json \\
        --names diffusion,DCGAN_G --out hessian_compare

Writes OUT/hessian.json (top eigenvalues, lambda_1 / lambda_k, power-iteration estimate,
optional density) and OUT/hessian.png. Memory: the Lanczos basis holds --iters vectors of
all parameters (8 bytes each in float64; --lanczos_dtype float32 halves it).
"""

import argparse
import json
import os
import sys
import time

import torch as th

from improved_diffusion.experiments import analysis, gan
from improved_diffusion.options import config
from improved_diffusion import dist_util
from improved_diffusion.evaluation.sampling import run_overrides
from improved_diffusion.script_util import args_to_dict, run_main


def check_args(args):
    """Reject bad flags before the model is built and the data are read."""
    if args.method not in ("lanczos", "power", "both"):
        raise ValueError(f"--method must be lanczos, power or both, not {args.method!r}")
    analysis.require_inputs(args, ("model_path", "data_dir"))
    for flag in ("batch_size", "top_k", "power_iters"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.iters and args.iters < args.top_k:
        raise ValueError(
            f"--iters {args.iters} gives at most {args.iters} eigenvalues but --top_k is "
            f"{args.top_k}: give --iters >= --top_k (0: max(3 top_k, 20))"
        )
    if args.gan_loss not in analysis.GAN_PLAYERS:
        raise ValueError(f"--gan_loss must be generator or discriminator, not {args.gan_loss!r}")
    analysis.check_timestep(args.diffusion_steps, args.timestep_respacing, args.timestep)


def main(argv=None):
    args, run_config = config.parse(create_argparser(), argv, checkpoint_flag="model_path")
    if args.compare:
        return compare(args)
    check_args(args)
    device = dist_util.dev()
    if gan.is_gan_checkpoint(args.model_path):
        loss_fn, params, info = gan_loss(args, device)
    else:
        for note in run_overrides(args, run_config, args.model_path, argv):
            print(note, file=sys.stderr)
        loss_fn, params, info = diffusion_loss(args, device)
    hvp_fn = analysis.make_hvp_fn(loss_fn, params)
    print(f"{hvp_fn.dim:,} parameters, loss {hvp_fn.loss:.6f}", flush=True)
    result = {
        "kind": info.pop("kind"),
        "model_path": args.model_path,
        "num_params": hvp_fn.dim,
        "loss": hvp_fn.loss,
        **info.pop("top"),
        "settings": {**info, **{k: getattr(args, k) for k in SETTINGS}},
    }
    result.update(spectrum(hvp_fn, args, device))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hessian.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out, "hessian.png"))
    if result["ratio_1_k"] is not None:
        print(f"lambda_1 / lambda_{len(result['eigenvalues'])} = {result['ratio_1_k']:.4g}")
    print(f"wrote {args.out}/hessian.json and hessian.png")


SETTINGS = ("data_dir", "seed", "method", "top_k", "iters", "power_iters", "tol", "lanczos_dtype")


def spectrum(hvp_fn, args, device):
    """The result entries of --method (lanczos, power) and --density, and the top eigenvalues."""
    dim, result = hvp_fn.dim, {}
    vec_dtype = {"float32": th.float32, "float64": th.float64}[args.lanczos_dtype]
    if args.method in ("lanczos", "both"):
        start = time.time()
        res = analysis.lanczos(
            hvp_fn, dim, k=args.top_k, num_iters=args.iters or None, seed=args.seed,
            device=device, dtype=vec_dtype,
        )
        top = [float(x) for x in res.eigenvalues]
        result["lanczos"] = {
            "eigenvalues": top,
            "ratio_1_k": _ratio(top),
            "num_iters": res.num_iters,
            "ritz_values": [float(x) for x in res.ritz_values],
            "seconds": time.time() - start,
        }
        print(f"lanczos ({res.num_iters} steps): top {len(top)} = {_fmt(top)}")
        if len(top) < args.top_k:
            print(f"note: Lanczos found only {len(top)} of --top_k {args.top_k} eigenvalues "
                  f"(it stopped at an invariant subspace, or the model has fewer parameters)")
    if args.method in ("power", "both"):
        start = time.time()
        lam, _, used = analysis.power_iteration(
            hvp_fn, dim, iters=args.power_iters, tol=args.tol, seed=args.seed,
            device=device, dtype=vec_dtype,
        )
        result["power"] = {"eigenvalue": lam, "iters": used, "seconds": time.time() - start}
        print(f"power iteration ({used} steps): dominant eigenvalue {lam:.6g}")
    if "lanczos" in result:
        result["eigenvalues"] = result["lanczos"]["eigenvalues"]
        result["ratio_1_k"] = result["lanczos"]["ratio_1_k"]
    else:
        result["eigenvalues"] = [result["power"]["eigenvalue"]]
        result["ratio_1_k"] = None
    if args.density:
        result["density"] = density(hvp_fn, args, device, vec_dtype)
    return result


def density(hvp_fn, args, device, vec_dtype):
    """The spectral density by stochastic Lanczos quadrature, as JSON."""
    start = time.time()
    dens = analysis.spectral_density(
        hvp_fn, hvp_fn.dim, num_iters=args.density_iters, num_runs=args.density_runs,
        seed=args.seed + 1, device=device, dtype=vec_dtype,
    )
    return {
        "grid": dens["grid"].tolist(),
        "density": dens["density"].tolist(),
        "nodes": [n.tolist() for n in dens["nodes"]],
        "weights": [w.tolist() for w in dens["weights"]],
        "sigma": dens["sigma"],
        "seconds": time.time() - start,
    }


def diffusion_loss(args, device):
    """The diffusion training loss on the fixed batch, timesteps and noise, and the model's parameters."""
    flags = args_to_dict(args, config.names(*config.MODEL_GROUPS))
    model, diffusion, _ = analysis.load_model_and_diffusion(args.model_path, flags, device)
    batch, t, noise, model_kwargs = analysis.fixed_batch_from_args(args, diffusion, device)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = analysis.diffusion_loss_fn(model, diffusion, batch, t, noise, model_kwargs)
    info = {
        "kind": "diffusion",
        "top": {},
        "batch_size": int(batch.shape[0]),
        "timestep": None if args.timestep < 0 else args.timestep,
        "timesteps": t.cpu().tolist(),
        "flags": flags,
    }
    return loss_fn, params, info


def gan_loss(args, device):
    """One GAN player's loss on the fixed real batch and latents, and that player's parameters."""
    from improved_diffusion.image_datasets import load_image_dataset

    generator, discriminator, arch = gan.load_gan(args.model_path, device)
    data = load_image_dataset(args.data_dir, arch["image_size"], image_channels=arch.get("channels", 3))
    if args.batch_size > len(data.images):
        print(f"note: --batch_size {args.batch_size} but {args.data_dir} holds {len(data.images)} images; "
              f"the batch is all {len(data.images)}", file=sys.stderr)
    real, z = analysis.fixed_gan_inputs(data.images, args.batch_size, arch["latent_dim"], args.seed, device)
    net = generator if args.gan_loss == "generator" else discriminator
    params = [p for p in net.parameters() if p.requires_grad]
    loss_fn = analysis.gan_loss_fn(generator, discriminator, real, z, args.gan_loss)
    info = {"kind": "gan", "top": {"gan_loss": args.gan_loss}, "batch_size": int(real.shape[0]), "arch": arch}
    return loss_fn, params, info


def compare(args):
    """Top eigenvalues and densities of several hessian.json files in one figure."""
    paths = [p for p in args.compare.split(",") if p]
    names = [n for n in args.names.split(",") if n] if args.names else [os.path.basename(os.path.dirname(p)) for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"--names has {len(names)} entries for {len(paths)} --compare files")
    results = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--compare {path}: no such file")
        with open(path) as f:
            results.append(json.load(f))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "hessian_compare.png")
    plot_compare(results, names, path)
    for name, r in zip(names, results):
        ratio = r["ratio_1_k"]
        print(f"{name}: lambda_1 {r['eigenvalues'][0]:.6g}" + (f", lambda_1/lambda_k {ratio:.4g}" if ratio else ""))
    print(f"wrote {path}")


def plot_compare(results, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_density = any("density" in r for r in results)
    fig, axes = plt.subplots(1, 2 if has_density else 1, figsize=(10 if has_density else 5, 3.6), squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / len(results)
    for n, (r, name) in enumerate(zip(results, names)):
        top = r["eigenvalues"]
        ax.bar([i + 1 + (n - (len(results) - 1) / 2) * width for i in range(len(top))], top, width,
               label=f"{name} (lambda_1 {top[0]:.3g})")
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("eigenvalue lambda_i (log scale)")
    ax.set_title("top Hessian eigenvalues (Lanczos)", fontsize=9)
    ax.legend(fontsize=7)
    if has_density:
        ax = axes[0, 1]
        for r, name in zip(results, names):
            if "density" in r:
                d = r["density"]
                ax.semilogy(d["grid"], [max(x, 1e-12) for x in d["density"]], lw=1, label=name)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("eigenvalue (symlog scale)")
        ax.set_ylabel("density (SLQ)")
        ax.set_title("spectral density", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ratio(top):
    if len(top) < 2 or top[-1] == 0:
        return None
    return top[0] / top[-1]


def _fmt(values):
    return ", ".join(f"{v:.6g}" for v in values)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if "density" in result else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.5), squeeze=False)
    ax = axes[0, 0]
    top = result["eigenvalues"]
    label = "Lanczos" if "lanczos" in result else "power iteration"
    ax.bar(range(1, len(top) + 1), top, color="C0", label=label)
    if "power" in result and "lanczos" in result:
        lam = result["power"]["eigenvalue"]
        ax.axhline(lam, color="C3", ls="--", lw=1, label="power iteration")
    ax.set_xlabel("index i")
    ax.set_ylabel("eigenvalue lambda_i")
    ratio = result["ratio_1_k"]
    title = "top Hessian eigenvalues"
    if ratio is not None:
        title += f"  (lambda_1/lambda_{len(top)} = {ratio:.3g})"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    if "density" in result:
        ax = axes[0, 1]
        d = result["density"]
        ax.semilogy(d["grid"], [max(x, 1e-12) for x in d["density"]], lw=1)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (SLQ)")
        ax.set_title("spectral density", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


FLAGS = ["model_path", "data_dir", "batch_size", "seed", "timestep", "top_k", "iters", "method", "power_iters", "tol",
         "density", "density_iters", "density_runs", "lanczos_dtype", "out", "gan_loss", "compare", "names"]


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config.add_options(parser, FLAGS, table=config.SAMPLING, use="hessian")
    config.add_options(parser, ["config"])
    config.add_model_options(parser)
    return parser


if __name__ == "__main__":
    run_main(main)
