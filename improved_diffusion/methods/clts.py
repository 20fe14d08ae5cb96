"""
The paper's curriculum-learning timestep schedule (CLTS, Eq. 7-8; docs/methods.md), a
registered timestep sampler: --schedule_sampler clts.
"""

import numpy as np
import torch

from ..options.option import Option
from ..resample import ScheduleSampler
from .registry import GROUP, SAMPLER, Method

# Values a constructor checks (mu, sigma, lambda_max) have no check in the table: training
# builds the sampler before reading data, so a bad value still fails early, once.
MU = Option("clts_mu", 0.3, "CLTS: centre of the Gaussian over t/(T-1)", GROUP)
SIGMA = Option("clts_sigma", 1.0, "CLTS: width of the Gaussian over t/(T-1)", GROUP)
TARGET_STEPS = Option("clts_target_steps", 100000, "CLTS: steps until the Gaussian fully replaces the uniform", GROUP)
LAMBDA_MAX = Option("clts_lambda_max", 1.0, "CLTS: final weight of the Gaussian in the mixture", GROUP)
IMPORTANCE_WEIGHTING = Option("clts_importance_weighting", False, "CLTS: weight losses back to the uniform objective",
                              GROUP)


class CLTSSampler(ScheduleSampler):
    """
    Curriculum-learning timestep schedule (CLTS, the paper's Eq. 7-8).

    With s = t / (T - 1), a Gaussian over timesteps
    g(t) = exp(-(s - mu)^2 / (2 sigma^2)) / Z, the uniform u(t) = 1 / T and
    lam_k = lambda_max * min(k / target_steps, 1) at global step k:

        p_k(t) = (1 - lam_k) u(t) + lam_k g(t)

    Training starts uniform and moves towards the Gaussian over target_steps
    optimizer steps. Drawn timesteps get weight 1: training easy timesteps
    less often is the point, so by default the loss is not importance-weighted
    back to the uniform objective (importance_weighting=True does that, with
    weights 1 / (T p_k(t))).

    Draws use torch's generator of the training device, so saving and
    restoring the training RNG state makes them reproducible; the distribution
    is built on that device, so a step copies nothing from the host.

    :param diffusion: the diffusion process (for T).
    :param mu: centre of the Gaussian in s = t / (T - 1), in [0, 1].
    :param sigma: its standard deviation in units of s, > 0.
    :param target_steps: K_target, the steps over which lam ramps to lambda_max.
    :param lambda_max: the final mixing weight of the Gaussian, in [0, 1].
    :param importance_weighting: return 1 / (T p_k(t)) instead of ones.
    """

    def __init__(
        self,
        diffusion,
        mu=MU.default,
        sigma=SIGMA.default,
        target_steps=TARGET_STEPS.default,
        lambda_max=LAMBDA_MAX.default,
        importance_weighting=IMPORTANCE_WEIGHTING.default,
    ):
        mu, sigma, lambda_max = float(mu), float(sigma), float(lambda_max)
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"clts_mu must lie in [0, 1], got {mu}")
        if not sigma > 0.0 or not np.isfinite(sigma):
            raise ValueError(f"clts_sigma must be > 0, got {sigma}")
        if not target_steps > 0:
            raise ValueError(f"clts_target_steps must be > 0, got {target_steps}")
        if not 0.0 <= lambda_max <= 1.0:
            raise ValueError(f"clts_lambda_max must lie in [0, 1], got {lambda_max}")
        self.diffusion = diffusion
        self.mu = mu
        self.sigma = sigma
        self.target_steps = target_steps
        self.lambda_max = lambda_max
        self.importance_weighting = bool(importance_weighting)
        self.step = 0

        T = diffusion.num_timesteps
        s = torch.arange(T, dtype=torch.float64) / max(T - 1, 1)
        g = torch.exp(-((s - mu) ** 2) / (2 * sigma**2))
        if not g.sum() > 0:
            raise ValueError(
                f"clts_sigma {sigma} is too small for T = {T} timesteps: the Gaussian is zero "
                f"at every timestep (its spacing is 1 / (T - 1) = {1 / max(T - 1, 1):.2g})"
            )
        self._gaussian = g / g.sum()
        self._uniform = torch.full((T,), 1.0 / T, dtype=torch.float64)
        self._cache = {}  # device -> (lam, p, cdf, gaussian, uniform) on that device

    @property
    def lam(self):
        """The current mixing weight lam_k of the Gaussian."""
        return self.lam_at(self.step)

    def lam_at(self, step):
        return self.lambda_max * min(step / self.target_steps, 1.0)

    def schedule_values(self, step):
        return {"clts_lambda": float(self.lam_at(step))}

    def lambda_(self):
        """The current mixing weight lam_k (same as the `lam` property)."""
        return self.lam

    def set_step(self, step):
        """Move the curriculum to global optimizer step k = step (>= 0)."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.step = step

    def _distribution(self, device):
        """p_k and its CDF on `device`, rebuilt there only when lam has changed."""
        device = torch.device(device)
        lam, p, cdf, gaussian, uniform = self._cache.get(device) or (None, None, None, None, None)
        if gaussian is None:
            gaussian, uniform = self._gaussian.to(device), self._uniform.to(device)
        if lam != self.lam:
            lam = self.lam
            p = (1.0 - lam) * uniform + lam * gaussian
            cdf = torch.cumsum(p, dim=0)
            self._cache[device] = (lam, p, cdf, gaussian, uniform)
        return p, cdf

    def weights(self):
        """p_k over the T timesteps, float64 numpy, summing to 1."""
        p, _ = self._distribution("cpu")
        return p.numpy().copy()

    def sample(self, batch_size, device):
        """
        Draw timesteps from p_k by inverse CDF (vectorised, no loop over T).

        :param batch_size: the number of timesteps to draw.
        :param device: the torch device of the returned tensors.
        :return: (timesteps, weights): int64 indices and float32 weights,
                 ones unless importance_weighting is set.
        """
        p, cdf = self._distribution(device)
        u = torch.rand(batch_size, dtype=torch.float64, device=cdf.device) * cdf[-1]
        indices = torch.searchsorted(cdf, u, right=True).clamp_(max=len(cdf) - 1)
        if self.importance_weighting:
            weights = (1.0 / (len(p) * p[indices])).float()
        else:
            weights = torch.ones(batch_size, dtype=torch.float32, device=cdf.device)
        return indices, weights

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state_dict):
        self.set_step(state_dict["step"])


METHODS = (
    Method("clts", SAMPLER, CLTSSampler, options={
        "mu": MU, "sigma": SIGMA, "target_steps": TARGET_STEPS, "lambda_max": LAMBDA_MAX,
        "importance_weighting": IMPORTANCE_WEIGHTING,
    }),
)
