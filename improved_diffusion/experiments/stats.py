"""
Statistics of training curves over seeds, shared by the study (improved_diffusion/experiments/study.py)
and the ablation summary (scripts/launch/summarize.py), so that "steps to reach the
baseline" means one thing in every table: `steps_to_target`.
"""

import math

import numpy as np


def t_quantile(q, df):
    """The q quantile of Student's t with df degrees of freedom."""
    try:
        from scipy import stats

        return float(stats.t.ppf(q, df))
    except ImportError:  # pragma: no cover - scipy is in the dev requirements
        # Cornish-Fisher expansion around the normal quantile (good to ~1e-3 for df >= 2).
        from statistics import NormalDist

        z = NormalDist().inv_cdf(q)
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        return z + g1 / df + g2 / df**2 + g3 / df**3


def mean_interval(values, level=0.95):
    """
    Mean and two-sided t-interval of the mean over independent values (seeds).

    :return: dict(mean, lo, hi, n, sd); lo = hi = None when n < 2 (no interval).
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = len(v)
    if n == 0:
        return dict(mean=None, lo=None, hi=None, n=0, sd=None)
    mean = float(v.mean())
    if n < 2:
        return dict(mean=mean, lo=None, hi=None, n=1, sd=None)
    sd = float(v.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return dict(mean=mean, lo=mean - half, hi=mean + half, n=n, sd=sd)


def steps_to_target(steps, values, target):
    """
    The step at which a lower-is-better curve first reaches `target`: the first evaluation
    at or below it, moved back by linear interpolation from the evaluation before it (a
    curve evaluated every 1,000 steps that crosses the target just after one evaluation is
    not charged the whole interval). None if no evaluation reaches the target.

    A curve at or below the target at its first evaluation, or right after a missing value
    (None), gives that evaluation's step: nothing earlier was measured. Missing values are
    skipped. This is the rule of the study's committed results (docs/results.md); the
    ablation summary uses it too (before, it took the first evaluation step at or below
    the target, without interpolation).

    :param steps: evaluation steps, increasing.
    :param values: the metric at those steps (None where not evaluated).
    :return: a float step, or None.
    """
    steps = [float(s) for s in steps]
    for i, v in enumerate(values):
        if v is None:
            continue
        if v <= target:
            if i == 0 or values[i - 1] is None:
                return steps[i]
            v0 = values[i - 1]
            return steps[i - 1] + (v0 - target) / (v0 - v) * (steps[i] - steps[i - 1])
    return None
