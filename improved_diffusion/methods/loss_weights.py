"""
Loss weightings of the MSE term by the signal-to-noise ratio SNR_t = alpha_bar_t /
(1 - alpha_bar_t), rivals for comparison (docs/methods.md): Min-SNR-gamma (Hang et al. 2023)
and P2 (Choi et al. 2022). Each is on when its gamma is not 0; both on multiply (Min-SNR
first). The factors are applied in one place, `GaussianDiffusion.training_losses`; the VB
term of learned variances is never weighted.
"""

import math

import numpy as np

from ..gaussian_diffusion import ModelMeanType
from ..options.option import Option, non_negative, positive
from .registry import GROUP, WEIGHTING, Method

# Min-SNR-gamma's value is checked by its builder (naming the flag), so the table has no check.
MIN_SNR_GAMMA = Option("min_snr_gamma", 0.0, "Min-SNR-gamma loss weighting (0: off), for comparison", GROUP)
P2_GAMMA = Option("p2_gamma", 0.0, "P2 weighting (Choi et al. 2022): MSE term x 1/(p2_k + SNR_t)^p2_gamma (0: off), "
                  "for comparison", GROUP, check=non_negative)
P2_K = Option("p2_k", 1.0, "P2 weighting: the k in 1/(k + SNR_t)^gamma", GROUP, check=positive)


def snr(diffusion):
    """SNR_t of each timestep of `diffusion`, float64."""
    return diffusion.alphas_cumprod / (1.0 - diffusion.alphas_cumprod)


def refuse_vb_loss(diffusion, flag):
    """These weightings scale the MSE term: a loss made of the bound alone has none."""
    if diffusion.loss_type.is_vb():
        raise ValueError(f"{flag} weights the MSE term, but loss type "
                         f"{diffusion.loss_type.name} has none (use_kl must be False)")


def min_snr_weights(diffusion, gamma):
    """
    min(SNR_t, gamma) / SNR_t for epsilon prediction, min(SNR_t, gamma) for x_start
    prediction (Hang et al. 2023); refused for x_{t-1} prediction, for which the paper
    defines none.
    """
    gamma = float(gamma)
    if gamma < 0 or not math.isfinite(gamma):
        raise ValueError(f"min_snr_gamma must be >= 0 (0 = off), got {gamma}")
    refuse_vb_loss(diffusion, "min_snr_gamma")
    ratio = snr(diffusion)
    clipped = np.minimum(ratio, gamma)
    if diffusion.model_mean_type == ModelMeanType.EPSILON:
        return clipped / ratio
    if diffusion.model_mean_type == ModelMeanType.START_X:
        return clipped
    raise ValueError(
        f"min_snr_gamma supports epsilon and x_start prediction only, not {diffusion.model_mean_type.name}")


def p2_weights(diffusion, gamma, k):
    """
    1 / (k + SNR_t)^gamma, not normalised, whatever the model predicts: P2 as in its public
    code (jychoi118/P2-weighting).
    """
    gamma, k = float(gamma), float(k)
    if gamma < 0 or not math.isfinite(gamma):
        raise ValueError(f"p2_gamma must be >= 0 (0 = off), got {gamma}")
    if not k > 0 or not math.isfinite(k):
        raise ValueError(f"p2_k must be > 0, got {k}")
    refuse_vb_loss(diffusion, "p2_gamma")
    return 1.0 / (k + snr(diffusion)) ** gamma


METHODS = (
    Method("min-snr", WEIGHTING, min_snr_weights, options={"gamma": MIN_SNR_GAMMA}, switch="gamma",
           variant="minsnr"),
    Method("p2", WEIGHTING, p2_weights, options={"gamma": P2_GAMMA, "k": P2_K}, switch="gamma", variant="p2"),
)
