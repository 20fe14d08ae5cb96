"""
Post-hoc EMA: an average of the weights of any relative std, at any saved step, rebuilt after
training from a run's power-function EMAs (Karras et al. 2024, EDM2, section 3.2 and its
appendix; the averages are run/ema.py's `PowerEMA`, trained with --phema_stds).

    python scripts/posthoc_ema.py --run runs/demo --std 0.08 [--step 4000] [--out PATH]

writes `runs/demo/ema_std0.08_004000.pt`, a plain model state dict that
`scripts/image_sample.py --model_path` samples from with the run's config.json beside it.

Why it works: after t applied updates, an average of exponent gamma is the integral of the
weight trajectory theta(tau) (constant over each update) against the profile
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]. Averages are linear in their profile,
so the combination sum_j x_j avg_j of the stored averages is the average under the profile
sum_j x_j p_j. We choose x to make that profile as close as possible to the target's in
L2 over [0, t]: the normal equations G x = b, with G the inner products of the stored profiles
and b theirs with the target, both in closed form (`profile_inner`). The sources are every
snapshot (phema_snapshotNNNNNN.pt) and every checkpoint's averages (phemaNNNNNN.pt) up to the
step asked for. The profile's error bounds the weights' error (Cauchy-Schwarz):
|avg_target - avg_rebuilt| <= ||p_target - p_rebuilt|| * ||theta - c|| for any constant c.
"""

import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from . import checkpoint as ckpt
from .ema import std_to_exponent
from .run_dir import CONFIG, RunDir, same_folder


@dataclass
class Source:
    """One stored power-function EMA: where it is, its step, applied updates t and std."""

    path: str
    index: int  # which of the file's averages
    step: int
    updates: int
    std: float


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """
    <p_a, p_b> = integral of p_a(tau) p_b(tau) over tau >= 0, for power-function profiles
    p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (numpy broadcasting, float64).
    The integral runs to min(t_a, t_b) = m: (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) /
    ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)), written with ratios of t, which stay in range.
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    scale = (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * m)
    return scale * (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1)


def coefficients(sources, t, std):
    """
    (x, error): the weights x of `sources` ((t_j, std_j) pairs) whose combined profile is
    nearest to the profile of `std` at `t` in L2, normalised to sum 1 (every profile integrates
    to 1), and that combination's L2 error relative to the target profile's norm.
    Least squares (lstsq) rather than a plain solve: two stored profiles may coincide.
    """
    ts = np.array([s[0] for s in sources], dtype=np.float64)
    gammas = np.array([std_to_exponent(s[1]) for s in sources])
    gamma = std_to_exponent(std)
    gram = profile_inner(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])
    b = profile_inner(ts, gammas, t, gamma)
    x = np.linalg.lstsq(gram, b, rcond=None)[0]
    x = x / x.sum()
    target = profile_inner(t, gamma, t, gamma)
    error = max(float(target - 2 * x @ b + x @ gram @ x), 0.0) ** 0.5 / target ** 0.5
    return x, error


def find_sources(run_dir, log=print):
    """Every intact stored power-function EMA of `run_dir`, by step (a snapshot and a
    checkpoint of one step hold the same averages: the snapshot is taken); damaged ones are
    named through `log` and passed over. Each file is read and checked here, keeping only what
    the solve needs: the weights are read again, one file at a time, to be combined."""
    run, by_step = RunDir(run_dir), {}
    for step in run.steps():
        state = ckpt.load_state_file(os.path.join(run_dir, ckpt.state_name(step)))
        name = ckpt.phema_name(step)
        if state is not None and name in state["files"]:
            path = os.path.join(run_dir, name)
            if os.path.isfile(path) and ckpt.file_sha256(path) == state["files"][name]["sha256"]:
                by_step[step] = (path, _kept(ckpt.read_file(path, "power-function EMA")))
            else:
                log(f"{path}: missing or damaged, passed over")
    for step in run.snapshots():
        path = os.path.join(run_dir, ckpt.snapshot_name(step))
        try:
            by_step[step] = (path, _kept(ckpt.read_snapshot(path)))
        except ckpt.CheckpointError as e:
            log(f"{e}, passed over")
    return [Source(path, i, step, updates, std) for step, (path, (updates, stds)) in sorted(by_step.items())
            for i, std in enumerate(stds) if updates > 0]


def _kept(stored):
    """What the solve needs of a stored file: (updates, stds)."""
    return int(stored["updates"]), [float(s) for s in stored["stds"]]


def reconstruct(run_dir, std, step=None, log=print):
    """
    The model state dict of the EMA of relative std `std` at `step` (default: the newest
    stored step), rebuilt from the stored averages up to that step, and a dict of what was
    done (step, updates, sources, error: the profile's relative L2 error; below 1e-6, round-off,
    for a tracked std at a stored step).
    """
    sources = find_sources(run_dir, log)
    if not sources:
        raise FileNotFoundError(f"{run_dir}: no power-function EMA snapshots or checkpoints (train with --phema_stds)")
    step = max(s.step for s in sources) if step is None else step
    at_step = [s for s in sources if s.step == step]
    if not at_step:
        raise ValueError(f"--step {step}: {run_dir} has no power-function EMAs stored at that step; "
                         f"it has them at {', '.join(str(s) for s in sorted({s.step for s in sources}))}")
    used = [s for s in sources if s.step <= step]
    x, error = coefficients([(s.updates, s.std) for s in used], at_step[0].updates, std)
    log(f"std {std} at step {step} ({at_step[0].updates} updates) from {len(used)} stored averages: "
        f"relative L2 error of the profile {error:.2e}")
    total, template, paths = None, None, list(dict.fromkeys(s.path for s in used))
    for n, path in enumerate(paths):
        log(f"reading {os.path.basename(path)} ({n + 1}/{len(paths)})")
        stored = ckpt.read_file(path, "power-function EMA")
        for s, weight in zip(used, x):
            if s.path == path:
                avg = stored["averages"][s.index]
                template = avg
                if total is None:
                    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in avg.items() if v.is_floating_point()}
                for k in total:
                    total[k] += float(weight) * avg[k].double()
    state = {k: total[k].to(v.dtype) if k in total else v for k, v in template.items()}
    return state, {"step": step, "updates": at_step[0].updates, "sources": len(used), "error": error}


def output_path(run_dir, std, step, out=""):
    """--out, else RUN/ema_std{STD}_{STEP}.pt: "std" keeps it apart from ema_RATE_STEP.pt's pattern."""
    return out or os.path.join(run_dir, f"ema_std{std:g}_{step:06d}.pt")


def write(state, path, run_dir):
    """Write the rebuilt weights, and the run's config.json beside them when `path` is elsewhere
    (so that image_sample.py --model_path PATH needs no model flags)."""
    folder = os.path.dirname(os.path.abspath(path))
    source, target = os.path.join(run_dir, CONFIG), os.path.join(folder, CONFIG)
    copy = os.path.isfile(source) and not same_folder(run_dir, folder)
    if copy and os.path.isfile(target) and open(target).read() != open(source).read():
        raise ValueError(f"--out {path}: {target} exists and holds another run's options; choose another folder")
    os.makedirs(folder, exist_ok=True)
    ckpt.atomic_save(state, path)
    if copy:
        shutil.copyfile(source, target)
    return path
