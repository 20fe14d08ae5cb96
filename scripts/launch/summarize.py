"""
Summarise an ablation: one row per run of OUT_DIR, from each run's progress.csv.

    python scripts/launch/summarize.py runs/ablation [--baseline baseline]

Runs are the sub-folders named in OUT_DIR/runs.tsv (written by ablation.sh: name, then the
flags of the run), else every sub-folder with a progress.csv. Per run:

- `steps`: the last logged step; `final_loss`: the last logged loss;
- `final_fid` / `best_fid` (at `best_fid_step`): FID during training (the `fid` column,
  written with --eval_interval); `fid@STEP`: FID at each evaluation step;
- `steps_to_baseline_fid`: the step at which the run's FID reaches the baseline's final FID,
  linearly interpolated between the evaluations around the first one at or below it (the
  study's rule, `improved_diffusion.experiments.stats.steps_to_target`), and `speedup` = the baseline's
  own steps_to_baseline_fid / the run's (the paper's "2x fewer iterations to the baseline's
  FID"); empty when never reached or when there is no baseline run (`--baseline NAME` picks it; default `baseline`);
- `sample_fid`: FID of the final samples (`samples/*_fid.json` written by train.sh), if any.

Writes OUT_DIR/summary.csv and OUT_DIR/summary.md and prints the markdown.
"""

import argparse
import csv
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from improved_diffusion.options import config  # noqa: E402
from improved_diffusion import logger
from improved_diffusion.experiments.stats import steps_to_target  # noqa: E402


def sample_fid(run_dir):
    """FID of the newest final-sample evaluation written by train.sh, or None."""
    paths = sorted(glob.glob(os.path.join(run_dir, "samples", "*_fid.json")), key=os.path.getmtime)
    for path in reversed(paths):
        try:
            with open(path) as f:
                value = logger.parse_number(json.load(f).get("fid"))
        except (OSError, ValueError, AttributeError):
            continue
        if value is not None:
            return value
    return None


def run_config(run_dir):
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def summarize_run(name, run_dir):
    rows = logger.read_progress(run_dir)
    loss = logger.progress_series(rows, "loss")
    fid = logger.progress_series(rows, "fid")
    out = {
        "run": name,
        "steps": max(rows) if rows else None,
        "final_loss": loss[-1][1] if loss else None,
        "fid": fid,
        "final_fid": fid[-1][1] if fid else None,
        "final_fid_step": fid[-1][0] if fid else None,
        "best_fid": None,
        "best_fid_step": None,
        "sample_fid": sample_fid(run_dir),
        "config": run_config(run_dir),
    }
    if fid:
        best_step, best = min(fid, key=lambda sv: (sv[1], sv[0]))
        out["best_fid"], out["best_fid_step"] = best, best_step
    return out


def add_baseline_comparison(runs, baseline):
    """
    Fill steps_to_baseline_fid and speedup of every run, against the baseline's final FID.

    The target is the baseline's last FID value; every run, the baseline included, is timed by
    `stats.steps_to_target` (the study's rule: linear interpolation between the evaluations
    around the first one at or below the target), and speedup = the baseline's time / the
    run's time (so the baseline itself gets 1.0 even when its FID curve dipped below its final
    value earlier).
    """
    base = next((r for r in runs if r["run"] == baseline), None)
    for r in runs:
        r["steps_to_baseline_fid"] = r["speedup"] = None
    if base is None or base["final_fid"] is None:
        return None
    target = base["final_fid"]
    base_steps = steps_to_target(*zip(*base["fid"]), target)
    for r in runs:
        step = steps_to_target(*zip(*r["fid"]), target) if r["fid"] else None
        r["steps_to_baseline_fid"] = step
        if step:
            r["speedup"] = base_steps / step
    return base


def find_runs(out_dir, names=None):
    """[(name, dir, flags)] in the order of runs.tsv, else sorted with 'baseline' first."""
    listed = []
    tsv = os.path.join(out_dir, "runs.tsv")
    if names:
        listed = [(n, "") for n in names]
    elif os.path.isfile(tsv):
        with open(tsv) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if parts and parts[0] and not parts[0].startswith("#"):
                    listed.append((parts[0], parts[1] if len(parts) > 1 else ""))
    else:
        found = sorted(
            d for d in os.listdir(out_dir) if os.path.isfile(os.path.join(out_dir, d, "progress.csv"))
        )
        found.sort(key=lambda d: d != "baseline")
        listed = [(d, "") for d in found]
    runs = []
    for name, flags in listed:
        run_dir = os.path.join(out_dir, name)
        if not os.path.isfile(os.path.join(run_dir, "progress.csv")):
            print(f"warning: {run_dir} has no progress.csv, left out", file=sys.stderr)
            continue
        runs.append((name, run_dir, flags))
    return runs


def fmt(value, spec):
    return "" if value is None else format(value, spec)


def write_csv(path, runs, eval_steps):
    columns = ["run", "steps", "final_loss", "final_fid", "best_fid", "best_fid_step",
               "steps_to_baseline_fid", "speedup", "sample_fid"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns + [f"fid@{s}" for s in eval_steps])
        for r in runs:
            by_step = dict(r["fid"])
            cells = [r["run"]] + [fmt(r[c], ".6g") if isinstance(r[c], float) else
                                  ("" if r[c] is None else r[c]) for c in columns[1:]]
            w.writerow(cells + [fmt(by_step.get(s), ".6g") for s in eval_steps])


def markdown(out_dir, runs, eval_steps, baseline, base):
    lines = [f"# Ablation summary: {out_dir}", ""]
    if base is not None:
        lines.append(f"Baseline `{baseline}`: final FID {base['final_fid']:.2f} (step "
                     f"{base['final_fid_step']}). *Steps to baseline FID*: where a run's FID curve "
                     "reaches it (linear between evaluations); *speed-up*: the baseline's steps to it / "
                     "the run's.")
    elif any(r["fid"] for r in runs):
        lines.append(f"No baseline run (`{baseline}`) with FID here: no steps-to-baseline column.")
    else:
        lines.append("No FID values in these runs (train with REF_STATS set, or --eval_interval "
                     "and --eval_ref_stats).")
    lines.append("")
    samples = {r["config"].get("eval_num_samples") for r in runs if r["fid"]} - {None}
    respacing = {r["config"].get("eval_respacing") for r in runs if r["fid"]} - {None}
    if samples:
        lines.append(f"FID during training from {', '.join(map(str, sorted(samples)))} samples of the "
                     f"EMA model ({', '.join(sorted(map(str, respacing)))} sampling steps); compare "
                     "only runs with the same sample count.")
    lines += ["", "| run | steps | final loss | final FID | best FID (step) | steps to baseline FID "
              "| speed-up | sample FID |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        best = "" if r["best_fid"] is None else f"{r['best_fid']:.2f} ({r['best_fid_step']})"
        lines.append(
            f"| {r['run']} | {fmt(r['steps'], 'd')} | {fmt(r['final_loss'], '.4g')} "
            f"| {fmt(r['final_fid'], '.2f')} | {best} | {fmt(r['steps_to_baseline_fid'], '.0f')} "
            f"| {fmt(r['speedup'], '.2f') + ('x' if r['speedup'] else '')} "
            f"| {fmt(r['sample_fid'], '.2f')} |"
        )
    if eval_steps:
        lines += ["", "FID at each evaluation step:", "",
                  "| step | " + " | ".join(r["run"] for r in runs) + " |",
                  "|---:|" + "---:|" * len(runs)]
        for s in eval_steps:
            cells = [fmt(dict(r["fid"]).get(s), ".2f") for r in runs]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    flags = [(r["run"], r["flags"]) for r in runs if r.get("flags")]
    if flags:
        lines += ["", "Runs:", ""] + [f"- `{n}`: `{f}`" for n, f in flags]
    if os.path.isfile(os.path.join(out_dir, "curves.png")):
        lines += ["", "![loss and FID against step](curves.png)"]
    return "\n".join(lines) + "\n"


def summarize(out_dir, baseline="baseline", names=None):
    """Write OUT_DIR/summary.csv and summary.md; returns (runs, markdown text)."""
    found = find_runs(out_dir, names)
    if not found:
        raise FileNotFoundError(f"no runs with a progress.csv in {out_dir}")
    runs = []
    for name, run_dir, flags in found:
        r = summarize_run(name, run_dir)
        r["flags"] = flags
        runs.append(r)
    base = add_baseline_comparison(runs, baseline)
    eval_steps = sorted({s for r in runs for s, _ in r["fid"]})
    write_csv(os.path.join(out_dir, "summary.csv"), runs, eval_steps)
    text = markdown(out_dir, runs, eval_steps, baseline, base)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    return runs, text


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder holding one sub-folder per run")
    config.add_options(parser, ["baseline", "runs"], table=config.TOOLS["summarize"])
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out_dir):
        print(f"error: {args.out_dir}: no such directory", file=sys.stderr)
        sys.exit(2)
    names = [n for n in args.runs.split(",") if n] or None
    try:
        _, text = summarize(args.out_dir, args.baseline, names)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(text, end="")
    print(f"wrote {os.path.join(args.out_dir, 'summary.csv')} and {os.path.join(args.out_dir, 'summary.md')}")


if __name__ == "__main__":
    main()
