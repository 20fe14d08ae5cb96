"""
The originals' timestep samplers (improved-diffusion, Nichol & Dhariwal 2021), registered:
uniform (the baseline of every comparison) and loss-second-moment. Their code stays in
`improved_diffusion/resample.py`, the original module.
"""

from ..resample import LossSecondMomentResampler, UniformSampler
from .registry import SAMPLER, Method

METHODS = (
    Method("uniform", SAMPLER, UniformSampler),
    Method("loss-second-moment", SAMPLER, LossSecondMomentResampler,
           extra_keywords=("history_per_term", "uniform_prob")),
)
