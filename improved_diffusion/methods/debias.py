"""
The debiased loss weighting (Yu et al. 2024, "Unmasking Bias in Diffusion Model Training",
arXiv 2310.08442), a rival for comparison: --debias_weighting True.

The noise-prediction MSE term is weighted by 1 / sqrt(SNR_t), SNR_t = alpha_bar_t /
(1 - alpha_bar_t), unnormalised, as in the authors' code (yuhuUSTC/Debias); the VB term of
learned variances is not weighted. For x_start prediction the same objective is written on
the x_0 error: the noise MSE is SNR_t times the x_0 MSE, so the factor is sqrt(SNR_t)
(docs/methods.md). Refused for x_{t-1} prediction and for a loss of the bound alone.
"""

import numpy as np

from ..gaussian_diffusion import ModelMeanType
from ..options.option import Option
from .loss_weights import refuse_vb_loss, snr
from .registry import GROUP, WEIGHTING, Method

ON = Option("debias_weighting", False, "debiased weighting (Yu et al. 2024): noise MSE term x 1/sqrt(SNR_t), "
            "for comparison", GROUP)


def debias_weights(diffusion, on):
    """1 / sqrt(SNR_t) per timestep for epsilon prediction, sqrt(SNR_t) for x_start prediction."""
    refuse_vb_loss(diffusion, "debias_weighting")
    ratio = snr(diffusion)
    if diffusion.model_mean_type == ModelMeanType.EPSILON:
        return 1.0 / np.sqrt(ratio)
    if diffusion.model_mean_type == ModelMeanType.START_X:
        return np.sqrt(ratio)
    raise ValueError(
        f"debias_weighting supports epsilon and x_start prediction only, not {diffusion.model_mean_type.name}")


METHODS = (Method("debias", WEIGHTING, debias_weights, options={"on": ON}, switch="on", variant="debias"),)
