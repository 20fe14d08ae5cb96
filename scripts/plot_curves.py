"""
Loss and FID against training step for one or more runs, side by side.

    python scripts/plot_curves.py runs/baseline runs/clts_mdlrc --out curves.png
    python scripts/plot_curves.py runs/a runs/b --names baseline,ours --smooth 0.9 --out c.png

Each LOGDIR must hold the `progress.csv` written by training (columns `step`, `loss`, and
`fid` on the steps where FID was evaluated; empty cells elsewhere). The loss is smoothed
with an exponential moving average (`--smooth`, 0 = raw) and drawn on a log axis.
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from improved_diffusion import logger  # noqa: E402
from improved_diffusion.options import config  # noqa: E402


def read_progress(log_dir):
    """{column: [(step, value), ...]} from LOGDIR/progress.csv, skipping empty cells."""
    rows = logger.read_progress(log_dir)
    columns = {key for values in rows.values() for key in values}
    return {key: logger.progress_series(rows, key) for key in columns}


def ema(values, smooth):
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = smooth * avg + (1 - smooth) * v
        out.append(avg / (1 - smooth ** (i + 1)) if smooth > 0 else v)
    return out


def plot(runs, out, smooth=0.9, loss_key="loss", fid_key="fid"):
    """
    :param runs: list of (name, series) with series from :func:`read_progress`.
    :param out: PNG path.
    """
    fig, (ax_loss, ax_fid) = plt.subplots(1, 2, figsize=(12, 4.5))
    any_fid = False
    for name, series in runs:
        loss = sorted(series.get(loss_key, []))
        if loss:
            steps, values = zip(*loss)
            ax_loss.plot(steps, ema(values, smooth), label=name)
        fid = sorted(series.get(fid_key, []))
        if fid:
            any_fid = True
            steps, values = zip(*fid)
            ax_fid.plot(steps, values, marker="o", markersize=3, label=name)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"{loss_key} (EMA {smooth})" if smooth > 0 else loss_key)
    ax_loss.set_title("training loss")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend()
    ax_fid.set_xlabel("step")
    ax_fid.set_ylabel(fid_key.upper())
    ax_fid.set_title("FID vs step")
    ax_fid.grid(True, alpha=0.3)
    if any_fid:
        ax_fid.legend()
    else:
        ax_fid.text(0.5, 0.5, f"no '{fid_key}' values", ha="center", va="center",
                    transform=ax_fid.transAxes)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("log_dirs", nargs="+", metavar="LOGDIR", help="run directories")
    config.add_options(parser, config.TOOLS["plot_curves"], table=config.TOOLS["plot_curves"])
    args = parser.parse_args(argv)
    names = [n for n in args.names.split(",")] if args.names else [
        os.path.basename(os.path.normpath(d)) for d in args.log_dirs
    ]
    if len(names) != len(args.log_dirs):
        parser.error(f"--names has {len(names)} names for {len(args.log_dirs)} runs")
    if not 0 <= args.smooth < 1:
        parser.error("--smooth must be in [0, 1)")
    try:
        runs = [(n, read_progress(d)) for n, d in zip(names, args.log_dirs)]
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    out = args.out or os.path.join(args.log_dirs[0], "curves.png")
    plot(runs, out, smooth=args.smooth, loss_key=args.loss_key, fid_key=args.fid_key)
    print(out)


if __name__ == "__main__":
    main()
