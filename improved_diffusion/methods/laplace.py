"""
Laplace timestep sampling over log-SNR (Hang et al. 2024, "Improved Noise Schedule for
Diffusion Training", arXiv 2407.03297), a rival for comparison: --schedule_sampler laplace.

The paper draws lambda = log SNR from a Laplace distribution,
p(lambda) = exp(-|lambda - mu| / b) / (2 b) (best: mu = 0, b = 0.5), which concentrates
training on the transition between signal and noise (log SNR near 0). On a fixed schedule of
T steps, each timestep t gets the Laplace mass of the log-SNR values nearer to its own
lambda_t = log(alpha_bar_t / (1 - alpha_bar_t)) than to its neighbours' (boundaries at the
midpoints, the first and last open), so a drawn t is the nearest timestep of a drawn lambda.
Every t gets loss weight 1: the objective changes, as in the paper (docs/methods.md).
"""

import numpy as np
import torch

from ..options.option import Option, positive
from .fixed_distribution import FixedDistributionSampler, draw
from .registry import GROUP, SAMPLER, Method

MU = Option("laplace_mu", 0.0, "Laplace sampler: location mu of the Laplace over log SNR (Hang et al. 2024)", GROUP)
B = Option("laplace_b", 0.5, "Laplace sampler: scale b of the Laplace over log SNR", GROUP, check=positive)


def laplace_mass(lower, upper, mu, b):
    """P(lower < lambda <= upper) under Laplace(mu, b), elementwise, without cancellation in
    either tail (each side of mu uses its own tail's exponential)."""
    z_lo, z_hi = (lower - mu) / b, (upper - mu) / b
    below = 0.5 * np.exp(np.minimum(z_hi, 0)) - 0.5 * np.exp(np.minimum(z_lo, 0))  # the part left of mu
    above = 0.5 * np.exp(-np.maximum(z_lo, 0)) - 0.5 * np.exp(-np.maximum(z_hi, 0))  # the part right of mu
    return below + above


class LaplaceSampler(FixedDistributionSampler):
    """
    :param diffusion: the diffusion process (its alpha_bar gives log SNR per timestep).
    :param mu: the Laplace's location over log SNR.
    :param b: its scale, > 0.
    """

    def __init__(self, diffusion, mu=MU.default, b=B.default):
        mu, b = float(mu), float(b)
        if not b > 0 or not np.isfinite(b) or not np.isfinite(mu):
            raise ValueError(f"laplace_b must be > 0 and laplace_mu finite, got mu {mu}, b {b}")
        self.diffusion = diffusion
        self.mu, self.b = mu, b
        alphas_cumprod = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
        log_snr = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)  # decreasing in t
        mid = (log_snr[:-1] + log_snr[1:]) / 2
        upper = np.concatenate([[np.inf], mid])
        lower = np.concatenate([mid, [-np.inf]])
        probs = laplace_mass(lower, upper, mu, b)
        if not probs.sum() > 0:
            raise ValueError(f"the Laplace (mu {mu}, b {b}) puts no mass on this schedule's timesteps")
        self._setup(probs, np.ones(len(probs)))

    def sample(self, batch_size, device):
        """(timesteps, weights): int64 indices drawn from p, float32 ones."""
        p, _ = self._on(device)
        indices = draw(p, batch_size, p.device)
        return indices, torch.ones(batch_size, dtype=torch.float32, device=p.device)


METHODS = (Method("laplace", SAMPLER, LaplaceSampler, options={"mu": MU, "b": B}, variant="laplace"),)
