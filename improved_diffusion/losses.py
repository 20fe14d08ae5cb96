"""
Likelihood terms of the variational bound: Gaussian KL divergences and the
discretised Gaussian decoder likelihood of 8-bit images.

The formulas follow Ho et al. (2020) and improved-diffusion, including the
tanh approximation of the normal CDF, so bits/dim numbers stay comparable with
published ones.
"""

import math

import torch

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# Half the width of one 8-bit intensity bin once pixels are mapped to [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Floor for probabilities before the log, so that empty bins give a large
# finite penalty instead of -inf.
_LOG_FLOOR = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2):
    """
    KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise.

    Arguments broadcast, so a batch can be compared with scalars (e.g. the
    standard normal prior); at least one of them must be a tensor, which fixes
    the dtype and device of the result.
    """
    ref = next(
        (a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)),
        None,
    )
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    # exp() does not accept Python numbers, so the log-variances become tensors.
    logvar1 = logvar1 if isinstance(logvar1, torch.Tensor) else torch.tensor(logvar1).to(ref)
    logvar2 = logvar2 if isinstance(logvar2, torch.Tensor) else torch.tensor(logvar2).to(ref)
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """
    Standard normal CDF through the tanh approximation (max abs error ~2e-4).

    Kept instead of erf so that likelihoods match the original code exactly.
    """
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """
    Log-probability (nats) of 8-bit pixels under a Gaussian integrated over
    each pixel's bin.

    The outermost bins extend to infinity, so that the decoder is a proper
    distribution over the 256 levels.

    :param x: target images, uint8 values rescaled to [-1, 1].
    :param means: the Gaussian means, shaped like x.
    :param log_scales: the Gaussian log standard deviations, shaped like x.
    :return: a tensor like x of log-probabilities in nats.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + _HALF_BIN))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - _HALF_BIN))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=_LOG_FLOOR))
    log_sf_lower = torch.log((1.0 - cdf_lower).clamp(min=_LOG_FLOOR))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=_LOG_FLOOR))
    # Lowest level (-1): all mass below its upper edge; highest level (+1):
    # all mass above its lower edge.
    return torch.where(
        x < -0.999,
        log_cdf_upper,
        torch.where(x > 0.999, log_sf_lower, log_bin),
    )
