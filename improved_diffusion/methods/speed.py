"""
SpeeD (Wang et al. 2024): asymmetric timestep sampling, dual timesteps and change-aware loss
weights, a rival for comparison: --schedule_sampler speed (docs/methods.md).
"""

import numpy as np
import torch

from ..options.option import Option, positive
from .fixed_distribution import FixedDistributionSampler, draw
from .registry import GROUP, SAMPLER, Method

TAU = Option("speed_tau", 0.7, "SpeeD sampler: boundary tau as a fraction of T; t < tau T is drawn speed_k times as "
             "often", GROUP, check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]")
K = Option("speed_k", 5.0, "SpeeD sampler: probability ratio of timesteps below tau to those above", GROUP,
           check=positive)
LAMBDA = Option("speed_lambda", 0.6, "SpeeD sampler: loss weights below tau span [1 - lambda, lambda] (change-aware)",
                GROUP)
WEIGHT_TERMS = Option("speed_weight_terms", "mse", "SpeeD sampler: the loss terms its weight multiplies: mse (SpeeD's "
                      "code: the MSE term, vb of learned sigmas unweighted) or all (mse + vb)", GROUP,
                      choices=("mse", "all"))


class SpeeDSampler(FixedDistributionSampler):
    """
    SpeeD's timestep sampling and loss weighting (Wang et al. 2024, "A Closer Look at
    Time Steps is Worthy of Triple Speed-Up for Diffusion Model Training"), with the
    semantics of its public Speed_IDDPM with weighting = sampling = "ours":

    - asymmetric sampling: with tau_T = round(tau T), the timesteps t < tau_T are
      drawn k times as often as those above: p(t) proportional to k for t < tau_T,
      1 otherwise;
    - dual (antithetic) timesteps: of a batch of n, the first n // 2 + 1 are drawn
      from p, the rest are their duals about m, the first t where the change of
      sqrt(1 - alpha_bar_t) (np.gradient) falls below 1e-4:
      dual(t) = m - t for t < m, t - m otherwise (clamped to T - 1; m = T when the
      change never falls below the threshold);
    - change-aware weighting: with d_t = np.gradient(1 - alpha_bar)_t min-max
      normalised over all t to [0, 1], the loss weight is
      (1 - lam) + (2 lam - 1) d_t for t < tau_T and 1 otherwise (lam = 0.6: weights
      in [0.4, 0.6] below tau).

    The weights come back from sample(); with weight_terms "mse" (the default) they
    multiply the MSE term alone, as SpeeD's `training_losses` applies them (the vb term
    of learned sigmas unweighted; TrainLoop passes them as `mse_weights`), with "all"
    the whole per-sample loss, mse + vb (this project's behaviour before; the two agree
    unless sigmas are learned). SpeeD's published constants for T = 1000: tau = 700
    (0.7 here), k = 5, lam = 0.6; the options' defaults are those.

    :param diffusion: the diffusion process (T and alpha_bar).
    :param tau: the boundary as a fraction of T, in (0, 1].
    :param k: the probability ratio below / above the boundary, > 0.
    :param lam: the weighting constant lambda.
    :param weight_terms: "mse" or "all", the terms the weights multiply.
    """

    THRESHOLD = 1e-4

    def __init__(self, diffusion, tau=TAU.default, k=K.default, lam=LAMBDA.default,
                 weight_terms=WEIGHT_TERMS.default):
        tau, k, lam = float(tau), float(k), float(lam)
        if weight_terms not in WEIGHT_TERMS.choices:
            raise ValueError(f"speed_weight_terms must be one of {WEIGHT_TERMS.choices}, got {weight_terms!r}")
        if weight_terms == "mse" and diffusion.loss_type.is_vb():
            raise ValueError(f"SpeeD weights the MSE term, but loss type {diffusion.loss_type.name} has none: "
                             "use_kl must be False, or --speed_weight_terms all weights the bound")
        self.weight_terms = weight_terms
        self.weights_mse_only = weight_terms == "mse"
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"speed_tau must lie in (0, 1], got {tau}")
        if not k > 0 or not np.isfinite(k):
            raise ValueError(f"speed_k must be > 0, got {k}")
        if not np.isfinite(lam):
            raise ValueError(f"speed_lambda must be finite, got {lam}")
        self.diffusion = diffusion
        self.tau, self.k, self.lam = tau, k, lam
        T = diffusion.num_timesteps
        alphas_cumprod = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
        self.tau_steps = min(max(int(round(tau * T)), 1), T)
        probs = np.where(np.arange(T) < self.tau_steps, k, 1.0)
        grad = np.gradient(np.sqrt(1.0 - alphas_cumprod)) if T > 1 else np.zeros(1)
        below = np.flatnonzero(grad < self.THRESHOLD)
        self.meaningful_steps = int(below[0]) + 1 if len(below) else T
        change = np.gradient(1.0 - alphas_cumprod) if T > 1 else np.zeros(1)
        span = change.max() - change.min()
        norm = (change - change.min()) / span if span > 0 else np.zeros(T)
        base = 1.0 - lam
        weights = np.where(np.arange(T) < self.tau_steps, base + (1 - 2 * base) * norm, 1.0)
        self._setup(probs, weights)

    def dual(self, t):
        """The dual timesteps of `t` (a tensor) about meaningful_steps."""
        m = self.meaningful_steps
        return torch.where(t < m, m - t, t - m).clamp_(max=self.diffusion.num_timesteps - 1)

    def sample(self, batch_size, device):
        """
        (timesteps, weights): batch_size // 2 + 1 draws from p followed by the duals of
        the first batch_size - (batch_size // 2 + 1) of them; float32 loss weights.
        """
        p, w = self._on(device)
        first = draw(p, batch_size // 2 + 1, p.device)
        indices = torch.cat([first, self.dual(first)])[:batch_size]
        return indices, w[indices].float()


METHODS = (Method("speed", SAMPLER, SpeeDSampler,
                  options={"tau": TAU, "k": K, "lam": LAMBDA, "weight_terms": WEIGHT_TERMS}, variant="speed"),)
