"""
Rebuild an EMA of the weights of any relative std, at any saved step, after training
(post-hoc EMA, EDM2), from a run trained with --phema_stds:

    python scripts/image_train.py ... --log_dir runs/demo --phema_stds 0.05,0.1
    python scripts/posthoc_ema.py --run runs/demo --std 0.08 [--step 4000] [--out PATH]
    python scripts/image_sample.py --model_path runs/demo/ema_std0.08_004000.pt --num_samples 64

It combines the run's power-function EMA snapshots (phema_snapshotNNNNNN.pt) and checkpoint
averages (phemaNNNNNN.pt) up to --step by least squares over their profiles
(improved_diffusion/run/posthoc_ema.py, docs/methods.md), and writes a plain model state dict
with the run's config.json beside it. The relative L2 error of the rebuilt profile is printed:
about 0 for a std the run tracked (round-off), small for stds between tracked ones.
"""

import argparse

from improved_diffusion.options import config
from improved_diffusion.run import posthoc_ema
from improved_diffusion.script_util import run_main

FLAGS = ("run", "std", "step", "out")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_options(parser, FLAGS, table=config.TOOLS["posthoc_ema"])
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    for name in FLAGS:
        config.TOOLS["posthoc_ema"][name].validate(getattr(args, name))
    state, info = posthoc_ema.reconstruct(args.run, args.std, args.step)
    path = posthoc_ema.write(state, posthoc_ema.output_path(args.run, args.std, info["step"], args.out), args.run)
    print(f"wrote {path}: EMA of relative std {args.std} at step {info['step']} "
          f"(profile error {info['error']:.2e}); sample with scripts/image_sample.py --model_path {path}")
    return path


if __name__ == "__main__":
    run_main(main)
