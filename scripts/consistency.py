"""
Consistency of several diffusion models (paper section 3.1, Eq. 1): sample the same seeds
(same initial noise and same per-step noise) with every model and measure the PSNR between
their images, pair by pair; C is the mean over pairs.

Two checkpoints of one architecture: the model and diffusion flags come from the training
run's `config.json` beside the first checkpoint (a warning names any flag that another
model's run has otherwise); a checkpoint without one needs them on the command line or in
`--config FILE`. Flags on the command line override the run's:

    python scripts/consistency.py --model_paths runA/ema_0.9999_500000.pt,runB/ema_0.9999_500000.pt \\
        --timestep_respacing 250 --num_samples 32 --batch_size 32 --seed 0 --out consistency_cifar

Different architectures: per-model flag strings (or .json files of flags) override the shared
flags, one per model, in the order of --model_paths:

    mpiexec -n 8 python scripts/consistency.py \\
        --model_paths big/ema_0.9999_500000.pt,small/ema_0.9999_500000.pt \\
        --model_flags "--num_channels 128" "--num_channels 64 --num_res_blocks 2"

GAN generators beside them (the paper's contrast, Table 1): a ganNNNNNN.pt of
scripts/gan_train.py, or any path written "gan:PATH", is a DCGAN; every GAN gets the same
latents (latent m drawn from the same per-sample seed as diffusion sample m), sampled in
eval mode; its --model_flags entry must be empty. The JSON then also gives C within each
kind ("C_by_kind"):

    python scripts/consistency.py --model_paths dmA/ema_0.995_001000.pt,dmB/ema_0.995_001000.pt,\\
gan0/gan001000.pt,gan1/gan001000.pt --names DM_seed0,DM_seed1,GAN_seed0,GAN_seed1

Writes, on rank 0: OUT/consistency.json (pairwise PSNRs, C, per-model flags, settings),
OUT/consistency.png (one row of images per model) and OUT/samples_<n>.npz per model.
"""

import argparse
import json
import os
import shlex

import numpy as np

from improved_diffusion.experiments import analysis, gan
from improved_diffusion.options import config
from improved_diffusion import dist_util
from improved_diffusion.run.run_dir import load_run
from improved_diffusion.evaluation.sampling import (
    check_counts,
    classes_to_sample,
    run_differences,
    run_overrides,
    sample_with_flags,
)
from improved_diffusion.script_util import args_to_dict, run_main

MODEL_FLAGS = config.names(*config.MODEL_GROUPS)


def parse_args(argv=None):
    """
    The flags, the model's from the run of the first of --model_paths (config.parse reads
    the config.json beside one checkpoint, named by a flag: the first path is handed to it
    as the hidden default `first_model_path`). Returns (args, the run's config or None).
    """
    parser = create_argparser()
    pre, _ = parser.parse_known_args(argv)
    diffusion_paths = [p for p in pre.model_paths.split(",") if p and not gan.is_gan_checkpoint(p)]
    parser.set_defaults(first_model_path=next(iter(diffusion_paths), ""))
    return config.parse(parser, argv, checkpoint_flag="first_model_path")


def resolve_models(args, device):
    """(paths, kinds, names, loaded GANs by index, per-model flags) of --model_paths, checked."""
    paths = [p for p in args.model_paths.split(",") if p]
    if len(paths) < 2:
        raise ValueError("--model_paths needs at least two comma-separated checkpoints")
    kinds = ["gan" if gan.is_gan_checkpoint(p) else "diffusion" for p in paths]
    paths = [gan.strip_prefix(p) for p in paths]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"--model_paths: no such checkpoint file: {', '.join(missing)}")
    names = [n for n in args.names.split(",") if n] if args.names else _default_names(paths)
    gans = {}
    for n, (path, kind) in enumerate(zip(paths, kinds)):
        if kind == "gan":
            try:
                gans[n] = gan.load_gan(path, device)
            except (ValueError, FileNotFoundError) as exc:
                raise ValueError(f"model {n} ({path}): {exc}") from None
    latent_dims = {arch["latent_dim"] for _, _, arch in gans.values()}
    if len(latent_dims) > 1:
        raise ValueError(f"the GANs must share one latent dimension (same latents for all), got {sorted(latent_dims)}")
    if len(names) != len(paths):
        raise ValueError(f"--names has {len(names)} entries for {len(paths)} models")
    check_counts(args)
    flags = per_model_flags(args, len(paths), kinds)
    sizes = {f["image_size"] if f is not None else gans[n][2]["image_size"] for n, f in enumerate(flags)}
    if len(sizes) != 1:
        raise ValueError(f"all models must produce the same image size, got {sorted(sizes)}")
    return paths, kinds, names, gans, flags


def main(argv=None):
    args, run_config = parse_args(argv)
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    device = dist_util.dev()
    paths, kinds, names, gans, flags = resolve_models(args, device)
    log = print if rank == 0 else (lambda *a: None)
    diffusion = [n for n, kind in enumerate(kinds) if kind == "diffusion"]
    notes = run_overrides(args, run_config, paths[diffusion[0]], argv) if diffusion else []
    for n in diffusion[1:]:
        notes += run_differences(flags[n], paths[n], paths[diffusion[0]], log)
    for line in notes:
        log(line)

    # Every model gets the same labels: drawn from the classes of the first model's run.
    class_cond = any(f["class_cond"] for f in flags if f is not None)
    num_classes = classes_to_sample(args.num_classes, class_cond, paths[diffusion[0]] if diffusion else "", log)
    image_sets = []
    for n, (path, model_flags) in enumerate(zip(paths, flags)):
        if rank == 0:
            print(f"[{names[n]}] {path}", flush=True)
        if model_flags is None:  # a GAN: every rank makes all images (one forward pass each)
            arrays = {"arr_0": gan_images(gans.pop(n), args)}
        else:
            arrays = diffusion_images(path, names[n], n, model_flags, args, device, num_classes)
        image_sets.append(arrays["arr_0"])
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            np.savez(os.path.join(args.out, f"samples_{n}.npz"), **arrays)
    if rank == 0:
        report(args, image_sets, names, kinds, paths, flags)
    dist_util.barrier()


def gan_images(loaded, args):
    """The images of a GAN's generator from the latents of --seed."""
    generator, _, arch = loaded
    return gan.generate(generator, gan.sample_latents(args.num_samples, arch["latent_dim"], args.seed), args.batch_size)


def diffusion_images(path, name, n, model_flags, args, device, num_classes):
    """{"arr_0": images, "arr_1": labels (class-conditional)} of one diffusion model."""
    try:
        run = load_run(path, overrides=model_flags, device=device)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"model {n} ({name}): {exc}") from None
    images, labels, _ = sample_with_flags(run.model, run.diffusion, args, device, image_size=model_flags["image_size"],
                                          class_cond=model_flags["class_cond"], num_classes=num_classes)
    return {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}


def report(args, image_sets, names, kinds, paths, flags):
    """consistency.json, consistency.png and the printed C (rank 0)."""
    result = analysis.consistency(image_sets, names=names, cap_db=args.cap_db)
    result["kinds"] = kinds
    result["C_by_kind"] = analysis.consistency_by_kind(result, kinds)
    result["models"] = [
        {"name": name, "kind": kind, "path": path, "flags": f}
        for name, kind, path, f in zip(names, kinds, paths, flags)
    ]
    result["settings"] = {
        k: getattr(args, k)
        for k in ("num_samples", "batch_size", "seed", "use_ddim", "eta", "clip_denoised")
    }
    result["settings"]["world_size"] = dist_util.get_world_size()
    with open(os.path.join(args.out, "consistency.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot_rows(image_sets, names, result, args, os.path.join(args.out, "consistency.png"))
    capped = f" ({result['capped']} identical image pairs capped at {args.cap_db:g} dB)"
    print(f"C = {result['C']:.2f} dB" + (capped if result["capped"] else ""))
    for p in result["pairs"]:
        print(f"  {p['name_i']} vs {p['name_j']}: {p['psnr']:.2f} dB" + (" (capped)" if p["capped"] else ""))
    if len(result["C_by_kind"]) > 1:
        for kind, c in result["C_by_kind"].items():
            print(f"C within {kind} models: {c['C']:.2f} dB ({c['pairs']} pairs)")
    print(f"wrote {args.out}/consistency.json and consistency.png")


def per_model_flags(args, num_models, kinds=None):
    """
    Resolve the create_model_and_diffusion flags of every model: the shared flags, overridden
    by that model's --model_flags entry (a flag string, or a .json file of flags). A GAN (kinds[n]
    == "gan") has no flags: None, and its entry must be empty.
    """
    kinds = kinds or ["diffusion"] * num_models
    shared = args_to_dict(args, MODEL_FLAGS)
    entries = args.model_flags or []
    if len(entries) not in (0, 1, num_models):
        raise ValueError(
            f"--model_flags has {len(entries)} entries; give none, one (for every model) "
            f"or one per model ({num_models})"
        )
    if len(entries) <= 1:
        entries = entries * num_models or [""] * num_models
    resolved = []
    for entry, kind in zip(entries, kinds):
        if kind == "gan":
            if entry.strip() and len(args.model_flags or []) == num_models:
                raise ValueError(f"--model_flags {entry!r} is given for a GAN, whose networks come from "
                                 "its checkpoint: leave its entry empty (\"\")")
            resolved.append(None)
            continue
        flags = dict(shared)
        if entry.endswith(".json") and os.path.isfile(entry):
            flags.update(config.load_config(entry, MODEL_FLAGS))
        elif entry.strip():
            parser = argparse.ArgumentParser(prog=f"--model_flags {entry!r}")
            config.add_options(parser, MODEL_FLAGS)
            parser.set_defaults(**shared)
            flags = args_to_dict(parser.parse_args(shlex.split(entry)), MODEL_FLAGS)
        config.validate(flags)
        resolved.append(flags)
    return resolved


def _default_names(paths):
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(names)) != len(names):
        names = [f"{n}:{name}" for n, name in enumerate(names)]
    return names


def plot_rows(image_sets, names, result, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(args.grid_images, image_sets[0].shape[0])
    fig, axes = plt.subplots(
        len(image_sets), 1, figsize=(1.2 * cols + 1.5, 1.3 * len(image_sets) + 0.6), squeeze=False
    )
    for ax, images, name in zip(axes[:, 0], image_sets, names):
        gap = max(1, images.shape[2] // 16)
        pad = np.full((images.shape[1], gap, images.shape[3]), 255, np.uint8)
        row = np.concatenate([x for im in images[:cols] for x in (im, pad)][:-1], axis=1)
        row = row.squeeze(-1) if row.shape[-1] == 1 else row
        ax.imshow(row, cmap="gray", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    capped = " (capped)" if result["capped"] else ""
    fig.suptitle(
        f"consistency C = {result['C']:.2f} dB{capped}, {result['num_images']} images, "
        f"seed {args.seed}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


FLAGS = ["model_paths", "names", "num_samples", "batch_size", "seed", "use_ddim", "eta", "clip_denoised",
         "num_classes", "cap_db", "grid_images", "out"]


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config.add_options(parser, FLAGS, table=config.SAMPLING, use="consistency")
    config.add_options(parser, ["config", "precision"])
    config.add_options(parser, MODEL_FLAGS, "model and diffusion (default: the training run's "
                       "config.json beside the first of --model_paths)")
    config.add_options(parser, ["model_flags"], table=config.SAMPLING)
    return parser


if __name__ == "__main__":
    run_main(main)
