"""
Logit-normal timestep sampling (SD3, Esser et al. 2024; SpeeD's "lognorm" baseline), a rival
for comparison: --schedule_sampler lognormal (docs/methods.md).
"""

import numpy as np
import torch

from ..options.option import Option, positive
from .fixed_distribution import FixedDistributionSampler, draw
from .registry import GROUP, SAMPLER, Method

MEAN = Option("lognormal_mean", 0.0, "lognormal sampler: mean m of the logit-normal over t/T (SD3)", GROUP)
STD = Option("lognormal_std", 1.0, "lognormal sampler: std s of the logit-normal over t/T", GROUP, check=positive)


class LogitNormalSampler(FixedDistributionSampler):
    """
    Logit-normal ("log-normal") timestep sampling, as in SD3 (Esser et al. 2024) and
    SpeeD's "lognorm" baseline: u = t / T in (0, 1) with logit(u) ~ N(mean, std^2).

    Discretised at the mid-points u_t = (t + 1/2) / T:
        p(t) proportional to exp(-(logit(u_t) - mean)^2 / (2 std^2)) / (u_t (1 - u_t)),
    every drawn t with loss weight 1 (the objective changes, as in SD3); over t / T it
    does not depend on the noise schedule. SpeeD's "lognorm" code draws from another
    distribution: with x_t = sqrt(1 - alpha_bar_t), p(t) proportional to
    x_t / (1 - x_t) times the logit-normal density at x_t, i.e.
    exp(-(logit(x_t) - mean)^2 std^2 / 2) / (1 - x_t)^2 (its `/ 2 * s**2`; the same at
    std 1), which differs from the density at x_t alone by a total variation of about 0.4.

    :param diffusion: the diffusion process (for T).
    :param mean: the mean m of logit(t / T).
    :param std: its standard deviation s, > 0.
    """

    def __init__(self, diffusion, mean=MEAN.default, std=STD.default):
        mean, std = float(mean), float(std)
        if not std > 0 or not np.isfinite(std) or not np.isfinite(mean):
            raise ValueError(f"lognormal_std must be > 0 and the mean finite, got mean {mean}, std {std}")
        self.diffusion = diffusion
        self.mean, self.std = mean, std
        T = diffusion.num_timesteps
        u = (np.arange(T, dtype=np.float64) + 0.5) / T
        logit = np.log(u) - np.log1p(-u)
        dens = np.exp(-((logit - mean) ** 2) / (2 * std**2)) / (u * (1 - u))
        if not dens.sum() > 0:
            raise ValueError(f"the logit-normal (mean {mean}, std {std}) is zero at every timestep")
        self._setup(dens, np.ones(T))

    def sample(self, batch_size, device):
        """(timesteps, weights): int64 indices drawn from p, float32 ones."""
        p, _ = self._on(device)
        indices = draw(p, batch_size, p.device)
        return indices, torch.ones(batch_size, dtype=torch.float32, device=p.device)


METHODS = (Method("lognormal", SAMPLER, LogitNormalSampler, options={"mean": MEAN, "std": STD}, variant="lognormal"),)
