"""
Time and memory of improved precision / recall (improved_diffusion/evaluation/metrics.py) on two sets of
random features, by default 50,000 x 2048 each: CIFAR-10's 50k samples against its 50k
training images.

    OMP_NUM_THREADS=1 python scripts/benchmark_metrics.py --num 50000 --dim 2048

Prints one JSON line: the sizes, seconds, the process's resident memory with the features
alone (`rss_features_mib`) and at its peak (`peak_rss_mib`), what the full distance matrix
would have taken (`full_matrix_mib`), and the precision and recall found. `--pr_mode adm`
times guided-diffusion's float16 arithmetic instead of the exact float32 one.
"""

import argparse
import json
import time

import numpy as np
import torch

from improved_diffusion.evaluation import metrics
from improved_diffusion.options import config


def memory_mib(field):
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def random_features(num, dim, seed, shift=0.0):
    """Non-negative float32 features (like pooled Inception ones), made in chunks."""
    rng = np.random.default_rng(seed)
    out = np.empty((num, dim), np.float32)
    for start in range(0, num, 4096):
        rows = min(4096, num - start)
        out[start : start + rows] = np.abs(rng.standard_normal((rows, dim), dtype=np.float32) + shift)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_options(parser, config.TOOLS["benchmark_metrics"], table=config.TOOLS["benchmark_metrics"])
    args = parser.parse_args()

    ref = random_features(args.num, args.dim, seed=0, shift=0.0)
    samples = random_features(args.num, args.dim, seed=1, shift=0.0)
    rss_features = memory_mib("VmRSS")
    start = time.time()
    precision, recall = metrics.precision_recall(ref, samples, block_size=args.block_size, device=args.device,
                                                 mode=args.pr_mode)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.time() - start
    print(json.dumps({
        "num": args.num, "dim": args.dim, "block_size": args.block_size, "device": args.device, "pr_mode": args.pr_mode,
        "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
        "rss_features_mib": round(rss_features), "peak_rss_mib": round(memory_mib("VmHWM")),
        "full_matrix_mib": round(args.num * args.num * 4 / 2**20),
        "precision": precision, "recall": recall,
    }))


if __name__ == "__main__":
    main()
