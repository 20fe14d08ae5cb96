"""
The closing table of scripts/gpu_check.sh: each benchmark JSON in a folder, then the SPEC's
section 6 targets against what was measured (met / not met / not measured).

    python scripts/gpu_check_table.py runs/gpu_check
"""

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark import format_table  # noqa: E402

RUN_LABELS = ("plain", "fast", "run")


def targets(results):
    """(target, measured, verdict) rows for the SPEC's GPU targets."""
    rows = []
    compare = results.get("compare", {})
    fast = compare.get("fast", {})
    train = fast.get("train")
    timed = results.get("ddim10k", {}).get("run", {}).get("sample_images") or fast.get("sample_images")
    compiled = [results.get(name, {}).get("run", {}).get("train") for name in ("compiled", "graphs")]
    best = max((t for t in (train, *compiled) if t), key=lambda t: t["images_per_s"], default=None)
    if best and best.get("mfu") is not None:
        rows.append(("CIFAR-10 b128 bf16 MFU >= 40%", f"{100 * best['mfu']:.1f}% ({best['images_per_s']:,.0f} img/s)",
                     "met" if best["mfu"] >= 0.40 else "not met"))
    plain = compare.get("plain", {}).get("train")
    if best and plain:  # the fastest path (eager, compiled or with CUDA graphs) over the original's
        speedup = best["images_per_s"] / plain["images_per_s"]
        rows.append(("fastest >= 3x plain fp32 (training)", f"{speedup:.2f}x", "met" if speedup >= 3 else "not met"))
    if timed:
        rows.append((f"{timed['num_samples']:,} DDIM-50 samples < 60 s", f"{timed['seconds']:.1f} s",
                     "met" if timed["seconds"] < 60 and timed["num_samples"] >= 10000 else "not met"))
    overhead = fast.get("overhead") or compare.get("plain", {}).get("overhead")
    if overhead and "percent_of_step" in overhead:
        share = overhead["percent_of_step"]
        rows.append(("CLTS + MDLRC < 1% of a step", f"{share:.3f}%", "met" if share < 1 else "not met"))
    return rows


def main(folder):
    results = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            results[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
    if not results:
        print(f"no benchmark JSON in {folder}")
        return 1
    for name, result in results.items():
        print(f"\n[{name}]")
        print(format_table(result, [label for label in RUN_LABELS if label in result]))
    rows = targets(results)
    if rows:
        print("\nSPEC section 6 targets")
        width = max(len(r[0]) for r in rows)
        for target, measured, verdict in rows:
            print(f"  {target.ljust(width)}  {measured:>28}  {verdict}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    sys.exit(main(sys.argv[1]))
