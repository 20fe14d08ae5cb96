"""
A multi-seed study: does a method train faster than the baseline, and by how much?

Trains variants x seeds with scripts/image_train.py (one process per run, one thread
each), evaluates the EMA model at fixed steps (held-out loss; FID or digit quality where the
preset asks) and summarises over seeds: mean and 95% t-interval per variant and step, steps
to reach the baseline's value and the speed-up (improved_diffusion/experiments/study.py says how).

Resumable: each run's evaluations are written to OUT/runs/VARIANT_seedS.json as they are
made; a run whose file holds every evaluation is skipped (training and all), a partly
trained run resumes from its newest checkpoint (image_train.py --resume auto). Kill the
study and run the same command again; copy OUT to another machine and it continues there.

    python scripts/study.py --preset cpu                       # the main table
    python scripts/study.py --preset cpu --sweeps              # + the CLTS / MD sweeps
    python scripts/study.py --preset cpu --summarize_only      # tables and plot from OUT
    python scripts/study.py --preset cpu --plan                # print the runs, run nothing
    python scripts/study.py --preset cpu --parallel 2          # two runs at once (2 cores)

Outputs in OUT (default docs/study/PRESET): runs/*.json (one per run), summary.json,
summary.md, curves.png (the paper's modules: mean with 95% bands), rivals.png (the rival
methods beside the baseline) and sweeps.png. With the digit metrics, summary.md ends with the
paper's claims marked holds / does not hold / cannot tell by one written rule
(improved_diffusion/experiments/claims.py), at the fixed EMA and at the best post-hoc EMA.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from improved_diffusion.options import config  # noqa: E402
from improved_diffusion.script_util import run_main  # noqa: E402
from improved_diffusion.experiments.study import (  # noqa: E402,F401  (the study's API, as before)
    MAIN_VARIANTS, PAPER_VARIANTS, PRESETS, SWEEPS, configure, markdown, mean_interval, plan_of, run_all, run_done,
    run_parallel, summarize, steps_to_target, t_quantile, with_steps, write_summary,
)

OPTIONS = ("preset", "out", "runs_dir", "variants", "seeds", "sweep_seeds", "steps", "fid_steps", "fid_samples",
           "quality_samples", "data", "holdout", "extra_flags", "parallel", "run_index")


def create_argparser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_options(p, OPTIONS + ("sweeps",), table=config.TOOLS["study"])
    p.add_argument("--summarize_only", action="store_true")
    p.add_argument("--plan", action="store_true", help="print the runs and stop")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep a finished run's checkpoints")
    return p


def main(argv=None):
    args = create_argparser().parse_args(argv)
    for name in OPTIONS:
        config.TOOLS["study"][name].validate(getattr(args, name))
    preset = configure(args)
    out, runs_dir, plan = plan_of(args, preset)
    if args.plan:
        for name, cfg, flags, seed in plan:
            print(f"{name}\tseed {seed}\t{cfg} {' '.join(flags)}")
        return 0
    if args.run_index >= 0:  # one run, for --parallel
        return run_all(preset, plan[args.run_index:args.run_index + 1], out, runs_dir, args.preset, args.keep_checkpoints)
    if not args.summarize_only and args.parallel > 1:
        worker = [sys.executable, os.path.abspath(__file__)] + [a for a in (argv or sys.argv[1:]) if a != "--summarize_only"]
        run_parallel(preset, plan, out, runs_dir, args.parallel, worker)
    elif not args.summarize_only:
        run_all(preset, plan, out, runs_dir, args.preset, keep_checkpoints=args.keep_checkpoints)
    write_summary(preset, out, args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
