"""
Soak test of resuming (not a unit test): train a tiny model while killing it with SIGKILL at
random moments, many of them while it saves (it saves every step), restart it each time with
the same command, let it finish, and compare its final checkpoint bit for bit with an
uninterrupted run of the same command.

    python scripts/soak_kill.py --kills 20 --out runs/soak     # a few minutes on 2 CPU cores

Every other kill waits for a save in progress (a temporary checkpoint file in the log dir).
Prints a JSON summary (kills, how many landed during a save, restarts, identical or not) and
exits 1 when the final weights differ. docs/robustness.md records a result.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from improved_diffusion.options import config  # noqa: E402
from improved_diffusion.run import checkpoint as ckpt  # noqa: E402

TINY = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "4", "--num_heads", "2", "--diffusion_steps", "40", "--noise_schedule", "cosine",
        "--learn_sigma", "True", "--batch_size", "4", "--ema_rate", "0.9,0.99", "--save_interval", "1",
        "--log_interval", "2", "--keep_checkpoints", "3", "--schedule_sampler", "clts", "--clts_target_steps", "20",
        "--momentum_decay", "True", "--lr_compensation", "True"]


def final_files(log_dir, step):
    names = [ckpt.model_name(step), ckpt.ema_name(0.9, step), ckpt.ema_name(0.99, step), ckpt.opt_name(step)]
    return {n: torch.load(os.path.join(log_dir, n), weights_only=True) for n in names}


def identical(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    config.add_options(parser, config.TOOLS["soak_kill"], table=config.TOOLS["soak_kill"])
    args = parser.parse_args()
    if args.kills < 1 or args.steps < 2:
        parser.error("--kills must be >= 1 and --steps >= 2")
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    rng = np.random.default_rng(0)
    data = os.path.join(args.out, "train.npz")
    np.savez(data, arr_0=rng.integers(0, 256, size=(24, 8, 8, 3), dtype=np.uint8))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)

    def command(log_dir):
        return [sys.executable, os.path.join(ROOT, "scripts", "image_train.py"), "--data_dir", data,
                "--log_dir", log_dir, "--total_steps", str(args.steps)] + TINY

    straight, killed = os.path.join(args.out, "straight"), os.path.join(args.out, "killed")
    subprocess.run(command(straight), env=env, check=True, stdout=subprocess.DEVNULL)
    moments = random.Random(args.seed)
    kills = during_save = restarts = 0
    start = time.time()
    while kills < args.kills:
        proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        restarts += 1
        time.sleep(moments.uniform(2.0, 5.0))  # start-up takes about 2 s; then one step and save at a time
        if kills % 2 == 0:  # every other kill waits for a save in progress (a temporary file)
            deadline = time.time() + 10
            while time.time() < deadline and proc.poll() is None and not any(".tmp" in n for n in os.listdir(killed)):
                time.sleep(0.001)
        if proc.poll() is not None:  # it finished before the kill
            if proc.returncode != 0:
                raise SystemExit(f"the run failed: {proc.stderr.read().decode()[-2000:]}")
            break
        saving = any(".tmp" in n for n in os.listdir(killed))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        during_save += saving
    finish = subprocess.run(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if finish.returncode != 0:
        raise SystemExit(f"the final run failed: {finish.stderr[-2000:]}")
    same = identical(final_files(straight, args.steps), final_files(killed, args.steps))
    summary = {"kills": kills, "kills_seen_during_a_save": during_save, "starts": restarts + 1,
               "steps": args.steps, "seconds": round(time.time() - start, 1), "bitwise_identical": same}
    print(json.dumps(summary, indent=2))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
