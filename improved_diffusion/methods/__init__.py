"""
Training methods as components: timestep samplers, loss weightings, optimizer-side
schedules and changes to the training noise, each declared once in a module of this package
and found through the registry (`registry.py` says what an entry holds; docs/design.md shows
how one is added).
"""

from .registry import (  # noqa: F401
    DEFAULT_SAMPLER,
    KINDS,
    NOISE,
    OPTIMIZER,
    PAPER_VARIANTS,
    SAMPLER,
    WEIGHTING,
    LossWeighting,
    Method,
    build_optimizer_schedule,
    build_sampler,
    get,
    loss_weighting,
    methods,
    noise_transform,
    option_names,
    options,
    sampler_names,
    sampler_option,
    variants,
)
