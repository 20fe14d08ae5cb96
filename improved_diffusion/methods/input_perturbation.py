"""
Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion
Models", DDPM-IP, public code forever208/DDPM-IP on the ADM code), a rival for comparison:
--input_perturbation GAMMA (0: off).

At sampling time the network sees its own, imperfect x_t, not one made from the true noise;
DDPM-IP simulates that gap during training. The network's input is made from a perturbed
noise, x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) (eps + GAMMA xi) with xi a fresh
standard normal, while the loss keeps everything else as without it: the epsilon target is
the unperturbed eps, the x_0 target is x_0, and the terms that depend on x_t (the x_{t-1}
target, the vb term of learned sigmas, a KL loss) use the perturbed x_t, as in DDPM-IP's
`training_losses` (docs/methods.md).
"""

import torch

from ..options.option import Option, non_negative
from .registry import GROUP, NOISE, Method

GAMMA = Option("input_perturbation", 0.0, "input perturbation (Ning et al. 2023, DDPM-IP): x_t is made from "
               "noise + GAMMA xi, the target stays the noise (0: off; the paper: 0.1), for comparison", GROUP,
               check=non_negative)


def input_perturbation(gamma=GAMMA.default):
    """The NOISE step: adds gamma times a fresh standard normal (drawn from torch's generator of
    the batch's device, after the noise, in NCHW order) to the noise that makes x_t."""
    gamma = float(gamma)
    if not gamma >= 0:
        raise ValueError(f"--input_perturbation must be >= 0, got {gamma}")

    def perturb(x_start, noise, input_noise):
        xi = torch.randn(noise.shape, device=noise.device, dtype=noise.dtype)
        return noise, input_noise + gamma * xi

    return perturb


METHODS = (Method("input_perturbation", NOISE, input_perturbation, options={"gamma": GAMMA}, switch="gamma",
                  variant="ip"),)
