"""
Train a small DCGAN (improved_diffusion/experiments/gan.py), the paper's contrast model for the
consistency, interpolation and Hessian analyses (docs/analysis.md).

    python scripts/gan_train.py --data_dir data/demo/mnist_demo.npz --log_dir runs/gan_seed0 \\
        --seed 0 --total_steps 1000 --save_interval 250

One process (CPU or one GPU). Every `--save_interval` steps it writes a checkpoint
(LOG_DIR/ganNNNNNN.pt with both networks, gan_optNNNNNN.pt with both optimizers, and
stateNNNNNN.pt with the RNG states and the data position); run the same command again (with
a larger --total_steps) and training continues from the newest intact checkpoint, bit for bit
as if it had not stopped (on the CPU). Also writes LOG_DIR/gan_config.json (the options; it
marks the folder as a GAN run for the analysis scripts), progress.csv / progress.jsonl /
log.txt (losses, mean D(x) and D(G(z))), and samples.png (64 images from fixed latents).
"""

import argparse
import os
import time

import torch as th

from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion import dist_util
from improved_diffusion.experiments import gan
from improved_diffusion.image_datasets import BatchStream, load_image_dataset, to_model_input
from improved_diffusion.run.preemption import StopRequest
from improved_diffusion.run.run_dir import RunDir
from improved_diffusion.evaluation.sampling import save_grid
from improved_diffusion.options import config
from improved_diffusion.script_util import run_main

# Options that fix the networks' shapes: a run cannot continue with other values.
ARCH_KEYS = ("latent_dim", "g_width", "d_width", "image_size", "channels")
# Options that change the training itself: continuing with other values is allowed, with a note.
TRAIN_KEYS = ("data_dir", "seed", "batch_size", "lr", "beta1", "beta2")
# How a run stops (the training table's): on a scheduler's signal, and saving by the clock.
RUN_FLAGS = ("stop_signals", "save_minutes")


def check_args(args):
    if not args.data_dir:
        raise ValueError("--data_dir is required: an image folder or .npz of uint8 images")
    if not os.path.exists(args.data_dir):
        raise FileNotFoundError(f"--data_dir {args.data_dir}: no such file or folder")
    if not args.log_dir:
        raise ValueError("--log_dir is required: the run folder (checkpoints, progress, samples)")
    for flag in ("total_steps", "batch_size", "latent_dim", "g_width", "d_width", "save_interval", "log_interval"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    for flag in ("beta1", "beta2"):
        if not 0 <= getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be in [0, 1), got {getattr(args, flag)}")
    if args.image_size:
        gan.num_levels(args.image_size)
    config.validate({name: getattr(args, name) for name in RUN_FLAGS})


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_args(args)
    # The images' own channel count (grey, RGB, RGBA): the GAN is built for what the data is.
    data = load_image_dataset(args.data_dir, args.image_size or _native_size(args.data_dir), image_channels=None)
    image_size = data.images.shape[1]
    gan.num_levels(image_size)
    options = vars(args).copy()
    options["image_size"], options["channels"] = image_size, data.channels

    with RunDir.open(args.log_dir, tensorboard=False) as run_dir:
        with run_dir.starting():
            check_run_config(run_dir, options)
            # Seed, networks, optimizers and the data stream: all reproducible from --seed.
            th.manual_seed(args.seed)
            nets = gan.create_gan({k: options[k] for k in ARCH_KEYS})
            betas = (args.beta1, args.beta2)
            opts = [th.optim.Adam(net.to(dist_util.dev()).train().parameters(), lr=args.lr, betas=betas)
                    for net in nets]
            stream = BatchStream(data, args.batch_size, seed=args.seed, random_flip=False)
            step = resume(run_dir, nets, opts, stream)
            if step == 0:
                run_dir.logger.log(
                    f"DCGAN at {image_size}x{image_size}: generator {gan.count_params(nets[0]):,} parameters, "
                    f"discriminator {gan.count_params(nets[1]):,}; {len(data)} images")
            run_dir.write_config(options, gan.GAN_CONFIG)
        train(args, run_dir, options, step, nets, opts, stream)
        run_dir.logger.close()


def train(args, run_dir, options, step, nets, opts, stream):
    """One discriminator and one generator update per step, from `step` to --total_steps."""
    (generator, discriminator), (opt_g, opt_d), log = nets, opts, run_dir.logger
    device = dist_util.dev()
    start = time.time()
    # A --stop_signals signal saves at the step reached, then exits with code 75 (a requeue).
    with StopRequest(args.stop_signals, args.save_minutes, log=log.log,
                     failure=lambda: log.write_error) as request:
        while step < args.total_steps:
            images, _ = next(stream)
            real = to_model_input(images, device)
            z = th.randn(real.shape[0], args.latent_dim, device=device)

            # Discriminator step: real and fake batches pass through D separately.
            fake = generator(z)
            real_logits = discriminator(real)
            fake_logits = discriminator(fake.detach())
            loss_d = gan.discriminator_loss(real_logits, fake_logits)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

            # Generator step: the non-saturating loss through the updated discriminator.
            fake_logits_g = discriminator(fake)
            loss_g = gan.generator_loss(fake_logits_g)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            step += 1

            log.logkv_mean("loss_d", loss_d)
            log.logkv_mean("loss_g", loss_g)
            log.logkv_mean("d_real", th.sigmoid(real_logits.detach()).mean())
            log.logkv_mean("d_fake", th.sigmoid(fake_logits.detach()).mean())
            if step % args.log_interval == 0 or step == args.total_steps:
                log.logkv("step", step)
                log.logkv("steps_per_sec", round(args.log_interval / max(time.time() - start, 1e-9), 2))
                log.dumpkvs()
                start = time.time()
            due = request.due(step)  # "stop", "save" (--save_minutes) or None
            if due or step % args.save_interval == 0 or step == args.total_steps:
                arch = {k: options[k] for k in ARCH_KEYS}
                state = {"kind": "gan", "rank": ckpt.rank_state(stream), "options": _plain(options)}
                run_dir.save(step, lambda: (gan.checkpoint_files(step, generator, discriminator, opt_g, opt_d, arch),
                                            state))
            if due == "stop":
                break

    z = gan.sample_latents(args.grid_images, args.latent_dim, args.grid_seed)
    grid = os.path.join(run_dir.path, "samples.png")
    save_grid(gan.generate(generator, z), grid, nrow=8)
    log.log(f"done: {step} steps; samples in {grid}")


def _native_size(data_dir):
    """The side of the images of an .npz as stored (a folder: 16, the demo's)."""
    if data_dir.lower().endswith(".npz"):
        import numpy as np

        with np.load(data_dir, mmap_mode="r") as d:
            return int(d["arr_0"].shape[1])
    return 16


def _plain(options):
    return {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))}


def check_run_config(run_dir, options):
    """A run folder's gan_config.json must have the same architecture; other differences get a note."""
    old = run_dir.read_config(gan.GAN_CONFIG)
    if old is None:
        if run_dir.read_config() is not None:
            raise ValueError(f"--log_dir {run_dir.path} holds a diffusion run (config.json): use another folder")
        return
    differ = [k for k in ARCH_KEYS if k in old and old[k] != options[k]]
    if differ and run_dir.steps():
        raise ValueError(
            f"--log_dir {run_dir.path} holds a GAN run with other networks ("
            + ", ".join(f"--{k} {old[k]} there, {options[k]} here" for k in differ)
            + "): use another --log_dir, or the run's values"
        )
    for k in TRAIN_KEYS:
        if k in old and old[k] != options[k]:
            run_dir.logger.log(f"note: --{k} {options[k]} differs from the run's {old[k]} "
                               f"({os.path.join(run_dir.path, gan.GAN_CONFIG)})")


def resume(run_dir, nets, opts, stream):
    """Load the newest intact checkpoint of the run, if any (the GAN always continues its
    folder: --resume auto); returns its step (0: a fresh start)."""
    found = run_dir.find("auto")
    if found is None:
        return 0
    saved_nets = run_dir.read(found, gan.gan_name(found.step), "GAN checkpoint")
    saved_opts = run_dir.read(found, gan.gan_opt_name(found.step), "GAN optimizer checkpoint")
    for net, opt, key in zip(nets, opts, ("generator", "discriminator")):
        ckpt.check_state_dict_matches(net, saved_nets[key], what=f"{gan.gan_name(found.step)} ({key})")
        net.load_state_dict(saved_nets[key], strict=True)
        opt.load_state_dict(saved_opts[key])
    mine = run_dir.rank_state(found)
    if mine is not None:
        ckpt.set_rank_state(mine, stream)
    run_dir.resumed(found)
    return found.step


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config.add_options(parser, config.TOOLS["gan_train"], table=config.TOOLS["gan_train"])
    config.add_options(parser, RUN_FLAGS)
    return parser


if __name__ == "__main__":
    run_main(main)
