"""
Write the demo's report from a finished run.

    python scripts/demo_report.py runs/demo --data data/demo/mnist_demo_grey.npz \
        [--seconds 620 --stages install=95,data=1,reference=60,train=377,sample=30,score=54 --record_time]

Reads RUN/train/progress.csv and config.json, RUN/report/samples.npz (image_sample.py),
RUN/report/digits.json (scripts/digit_score.py) and fid.json (scripts/fid.py fid --out), when
present, and 64 real digits from --data; writes into RUN/report/:

- `samples_vs_real.png`: the first 64 samples beside 64 real digits, both enlarged 4x
  (nearest neighbour, so every pixel stays a square),
- `curves.png`: the training loss of every log interval (the very numbers the report quotes,
  not smoothed) and the lr and beta1 that MD + LRC set, against step,
- `report.md`: the numbers, the figures and a line on what to look for.

The demo's time: with --record_time (scripts/demo.sh passes it when this invocation trained
from step 0) --seconds and --stages are written to RUN/timing.json. Without it a recorded
time is kept and reported, and --seconds is reported as the time of this rerun.
"""

import argparse
import glob
import json
import os
import platform
import time

import numpy as np
import torch

from improved_diffusion.logger import progress_series, read_progress
from improved_diffusion.options import config
from improved_diffusion.evaluation.sampling import make_grid
from improved_diffusion.script_util import run_main

SCALE = 4  # enlargement of the grids in samples_vs_real.png
GRID = 64  # images per grid (8 x 8)


def parse_stages(text):
    """'install=170,data=3' -> [["install", 170.0], ["data", 3.0]]."""
    stages = []
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        try:
            stages.append([name, float(value)])
        except ValueError:
            raise ValueError(f"--stages: expected NAME=SECONDS items separated by commas, got {item!r}") from None
    return stages


def recorded_time(run, seconds=None, stages=(), record=False):
    """The demo's recorded time ({"seconds", "stages", "date"}) or None; with `record`, write it first."""
    path = os.path.join(run, "timing.json")
    if record and seconds is not None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"seconds": seconds, "stages": list(stages), "date": time.strftime("%Y-%m-%d %H:%M")}, f)
        os.replace(tmp, path)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def grid(images, nrow=8, padding=2):
    """uint8 (N, H, W, C) -> one RGB grid image, `nrow` per row, black between the images."""
    return make_grid(images, nrow, padding)[..., :3]


def real_digits(data_path, n=GRID, seed=0):
    """A fixed random `n` of the real digits, in random order (the demo file is sorted by class)."""
    with np.load(data_path) as f:
        images = f["arr_0"]
    return images[np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)]


def samples_vs_real(samples, real, path, sampling):
    """Save both grids side by side, enlarged SCALE x, with a title over each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = grid(samples[:GRID]), grid(real[:GRID])
    height, width = a.shape[0] * SCALE, a.shape[1] * SCALE
    dpi, gap, title = 100, 40, 40
    fig = plt.figure(figsize=((2 * width + gap) / dpi, (height + title) / dpi), dpi=dpi)
    for i, (image, name) in enumerate([(a, f"generated (EMA model, {sampling})"), (b, "real training digits")]):
        ax = fig.add_axes([i * (width + gap) / (2 * width + gap), 0, width / (2 * width + gap), height / (height + title)])
        ax.imshow(image, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(name, fontsize=13)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def curves(rows, path):
    """Training loss per log interval (raw) and the MD + LRC lr and beta1, against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    loss = progress_series(rows, "loss")
    if loss:
        ax_loss.plot(*zip(*loss), marker=".")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (mean of each log interval)")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    lr, beta1 = progress_series(rows, "lr"), progress_series(rows, "beta1")
    if lr:
        ax_lr.plot(*zip(*lr), color="C0", label="lr (LRC)")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("lr", color="C0")
    ax_lr.set_title("MD lowers beta1, LRC scales the lr with it")
    if beta1:
        ax_b = ax_lr.twinx()
        ax_b.plot(*zip(*beta1), color="C1", label="beta1 (MD)")
        ax_b.set_ylabel("beta1", color="C1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def fid_line(fid, fids, config):
    """The table row of the FID: from RUN/report/fid.json (scripts/fid.py), else the last in progress.csv."""
    if fid and fid.get("fid") is not None:
        return (f"| FID of the samples against {fid.get('num_ref')} training digits | **{fid['fid']:.1f}** "
                f"({fid.get('num_samples')} samples) |")
    if fids:
        step, value = fids[-1]
        return (f"| FID of the EMA model at step {step} | **{value:.1f}** ({config.get('eval_num_samples')} "
                f"samples, {config.get('eval_respacing')}) |")
    return "| FID | - (not evaluated) |"


def model_line(config, train_dir):
    """What the model is, with its parameter count read from the newest EMA checkpoint."""
    checkpoints = sorted(glob.glob(os.path.join(train_dir, "ema_*.pt")), key=lambda p: p.rsplit("_", 1)[-1])
    params = ""
    if checkpoints:
        state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
        params = f"{sum(v.numel() for v in state.values()) / 1e6:.2f}M parameters, "
    target = "x_0" if config.get("predict_xstart") else "the noise"
    return (f"| model | UNet, {params}{config.get('num_channels')} channels x ({config.get('channel_mult')}), "
            f"{config.get('num_res_blocks')} res block(s) per level, attention at {config.get('attention_resolutions')} px; "
            f"predicts {target}; {config.get('diffusion_steps')} {config.get('noise_schedule')} diffusion steps |")


def minutes(seconds):
    return f"{seconds / 60:.1f} min"


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("run", help="the demo's output folder (with train/ and report/)")
    parser.add_argument("--data", required=True, help="the training digits (.npz), for the grid of real digits")
    config.add_options(parser, config.TOOLS["demo_report"], table=config.TOOLS["demo_report"])
    parser.add_argument("--record_time", action="store_true",
                        help="this invocation trained from step 0: record --seconds and --stages in RUN/timing.json")
    return parser


def read_run(args):
    """What the report is made of: the run's progress, config.json, samples and the scores
    written beside them; a missing input is an error naming it."""
    train_dir = os.path.join(args.run, "train")
    report_dir = os.path.join(args.run, "report")
    config = read_json(os.path.join(train_dir, "config.json"))
    if config is None:
        raise FileNotFoundError(f"{train_dir}/config.json not found: is {args.run} the OUT folder of scripts/demo.sh?")
    samples_path = os.path.join(report_dir, "samples.npz")
    if not os.path.isfile(samples_path):
        raise FileNotFoundError(f"{samples_path} not found (scripts/image_sample.py writes it)")
    with np.load(samples_path) as f:
        samples = f["arr_0"]
    return dict(train_dir=train_dir, report_dir=report_dir, rows=read_progress(train_dir), config=config,
                samples=samples, digits=read_json(os.path.join(report_dir, "digits.json")),
                fid=read_json(os.path.join(report_dir, "fid.json")))


def methods_line(config):
    """The paper's accelerations the run used."""
    methods = []
    if config.get("schedule_sampler") == "clts":
        methods.append(f"CLTS (mu {config.get('clts_mu')}, sigma {config.get('clts_sigma')}, "
                       f"K_target {config.get('clts_target_steps')})")
    if config.get("momentum_decay"):
        methods.append(f"MD (beta1 {config.get('md_beta_init')} -> {config.get('md_beta_min')})")
    if config.get("lr_compensation"):
        methods.append("LRC")
    return " + ".join(methods) or "none"


def report_lines(run, args, timing):
    """The lines of report.md."""
    config, rows, digits = run["config"], run["rows"], run["digits"]
    loss, fids = progress_series(rows, "loss"), progress_series(rows, "fid")
    speed = progress_series(rows, "images_per_sec")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    lines = [
        "# Demo report",
        "",
        f"A {config.get('image_size')}x{config.get('image_size')} UNet diffusion model trained on 5,000 real MNIST "
        f"digits with the paper's accelerations on: {methods_line(config)}.",
        "",
    ]
    if digits and "samples" in digits:
        s = digits["samples"]
        lines += [
            f"**What you should see:** handwritten digits 0-9 in the left grid, drawn like the real ones on "
            f"the right, among them some malformed strokes: a digit classifier recognises "
            f"{s['recognisable']:.0%} of the {s['num_images']} samples ({digits['heldout']['recognisable']:.0%} "
            f"of real held-out digits).",
            "",
        ]
    lines += ["![samples beside real digits](samples_vs_real.png)", "", "| | |", "|---|---|",
              f"| machine | {device}, {platform.system()}, torch {torch.__version__} |",
              model_line(config, run["train_dir"]),
              f"| training | {config['total_steps']} steps at batch {config['batch_size']}, lr {config['lr']}, "
              f"EMA {config['ema_rate']} |"]
    if loss:
        lines.append(f"| training loss at step {loss[-1][0]} | {loss[-1][1]:.4f} (mean over the steps since the "
                     f"previous log point: the last point of the loss curve) |")
    if speed:
        lines.append(f"| training speed | {sum(v for _, v in speed) / len(speed):.0f} images/s |")
    if digits and "samples" in digits:
        s, held = digits["samples"], digits["heldout"]
        lines.append(f"| recognisable samples (`scripts/digit_score.py`, top class probability >= "
                     f"{digits['threshold']}) | **{s['recognisable']:.0%}** of {s['num_images']}; "
                     f"per class 0-9: {' '.join(str(c) for c in s['class_counts'])} |")
        lines.append(f"| the same classifier on {held['num_images']} held-out real digits | "
                     f"{held['recognisable']:.0%} recognisable, accuracy {digits['heldout_accuracy']:.1%} |")
    lines.append(fid_line(run["fid"], fids, config))
    if timing:
        parts = ", ".join(f"{name} {value:.0f} s" for name, value in timing.get("stages", []))
        lines.append(f"| time of the demo (first full run, {timing['date']}) | **{minutes(timing['seconds'])}**"
                     + (f" ({parts})" if parts else "") + " |")
    if args.seconds is not None and not args.record_time:
        lines.append(f"| this rerun (training already done or resumed) | {minutes(args.seconds)} |")
    lines += [
        "",
        "FID from a few hundred samples is biased upwards: compare it only with FIDs of the same",
        "sample and reference counts (docs/results.md has the ones we measured).",
        "",
        "## Loss and the MD + LRC schedule against step",
        "",
        "![curves](curves.png)",
        "",
    ]
    return lines


def main():
    args = create_argparser().parse_args()
    run = read_run(args)
    timing = recorded_time(args.run, args.seconds, parse_stages(args.stages), args.record_time)
    report_dir = run["report_dir"]
    samples_vs_real(run["samples"], real_digits(args.data), os.path.join(report_dir, "samples_vs_real.png"),
                    args.sampling)
    curves(run["rows"], os.path.join(report_dir, "curves.png"))
    lines = report_lines(run, args, timing)
    os.makedirs(report_dir, exist_ok=True)
    path = os.path.join(report_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
