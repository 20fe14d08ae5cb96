"""
Write the demo's short markdown report from a finished run.

    python scripts/demo_report.py runs/demo [--seconds 720]

Reads RUN/train/progress.csv and config.json; expects RUN/report/samples.png and
curves.png (made by scripts/demo.sh) and writes RUN/report/report.md.
"""

import argparse
import json
import os
import platform

import torch

from improved_diffusion.logger import progress_series, read_progress


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("run", help="the demo's output folder (with train/ and report/)")
    parser.add_argument("--seconds", type=float, default=None, help="wall-clock time of the whole demo")
    args = parser.parse_args()

    train_dir = os.path.join(args.run, "train")
    report_dir = os.path.join(args.run, "report")
    rows = read_progress(train_dir)
    with open(os.path.join(train_dir, "config.json")) as f:
        config = json.load(f)
    losses, fids = progress_series(rows, "loss"), progress_series(rows, "fid")
    speed = progress_series(rows, "images_per_sec")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"

    lines = [
        "# Demo report",
        "",
        "A small UNet trained on 5,000 real MNIST digits (16x16) with the paper's two",
        "accelerations on: CLTS (`--schedule_sampler clts`) and MD + LRC",
        "(`--momentum_decay True --lr_compensation True`).",
        "",
        "| | |",
        "|---|---|",
        f"| machine | {device}, {platform.system()}, torch {torch.__version__} |",
        f"| steps | {config['total_steps']} at batch {config['batch_size']} |",
        f"| final training loss | {losses[-1][1]:.4f} (step {losses[-1][0]}) |" if losses else "| final training loss | - |",
        f"| training speed | {sum(v for _, v in speed) / len(speed):.1f} images/s |" if speed else "| training speed | - |",
    ]
    if args.seconds is not None:
        lines.append(f"| wall-clock time of the demo | {args.seconds / 60:.1f} min |")
    lines += ["", "## FID of the EMA model during training", ""]
    if fids:
        lines += ["| step | FID |", "|---|---|"] + [f"| {s} | {v:.2f} |" for s, v in fids]
        lines += [
            "",
            f"FID from {config.get('eval_num_samples')} samples (DDIM, {config.get('eval_respacing')}) against",
            "statistics of a subset of the training digits. Small-sample FID is biased upwards:",
            "compare runs only at equal sample counts.",
        ]
    else:
        lines.append("(no FID was logged)")
    lines += [
        "",
        "## Samples (EMA model, DDIM 50 steps)",
        "",
        "![samples](samples.png)",
        "",
        "## Loss and FID against step",
        "",
        "![curves](curves.png)",
        "",
    ]
    os.makedirs(report_dir, exist_ok=True)
    path = os.path.join(report_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
