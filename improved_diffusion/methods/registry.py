"""
The registry of training methods: every timestep sampler, loss weighting, optimizer-side
schedule and change to the training noise is one `Method` entry in the `METHODS` tuple of a module of this package.

An entry declares what the rest of the code needs to know, so that nothing else lists
methods: its name, its options (`Option` entries that `config.OPTIONS` gathers, so `--help`,
`config.json`, validation and `docs/train-help.txt` follow), its builder and, for a rival
method, the variant of the study and the launch scripts that trains with it (the overlay
config `configs/EXPERIMENT_VARIANT.json`). Adding a method is adding one module here (found by
`methods()` without an import list), its test and its overlay config (docs/design.md).

What a builder is given and returns, by kind:
- SAMPLER (chosen by `--schedule_sampler NAME`): `build(diffusion, **keywords)` -> a
  `resample.ScheduleSampler`.
- WEIGHTING (on when the value of its `switch` option is not 0 / False; several multiply):
  `build(diffusion, **keywords)` -> float64 numpy array of one factor of the MSE term per
  timestep of `diffusion`, applied in one place, `GaussianDiffusion.training_losses`.
- OPTIMIZER: `build(total_steps, **keywords)` -> the schedule of Adam's beta1 and the lr
  factor that `TrainLoop` applies each step.
- NOISE (on when the value of its `switch` option is not 0 / False; several compose in
  registry order): `build(**keywords)` -> a function `(x_start, noise, input_noise) ->
  (noise, input_noise)` over one rank's whole batch, where `noise` is the noise the loss
  regresses and `input_noise` the noise that makes x_t; `noise_transform` composes them and
  `TrainLoop.run_step` applies the result in one place, where it draws the batch's noise.

`keywords` are the builder's keyword arguments: `Method.options` maps each to its option.
"""

import functools
import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..options.option import Option

SAMPLER, WEIGHTING, OPTIMIZER, NOISE = "timestep sampler", "loss weighting", "optimizer", "noise"
KINDS = (SAMPLER, WEIGHTING, OPTIMIZER, NOISE)
GROUP = "methods"  # the options table's group of every method option
DEFAULT_SAMPLER = "uniform"
# The paper's ablation: combinations of its methods (CLTS, MD, LRC), each an overlay config.
# The rivals' variants follow, one per method that declares one.
PAPER_VARIANTS = ("baseline", "md", "md_lrc", "clts", "all")


@dataclass(frozen=True)
class Method:
    name: str  # SAMPLER: the value of --schedule_sampler; otherwise a name for messages and logs
    kind: str  # one of KINDS
    build: Callable
    options: Mapping[str, Option] = field(default_factory=dict)  # builder keyword -> its option
    switch: str = ""  # WEIGHTING, NOISE (OPTIMIZER optionally): the keyword whose value turns it on (0 / False: off)
    variant: str = ""  # a rival's study and launch variant: configs/EXPERIMENT_VARIANT.json
    # SAMPLER: builder keywords that are no option (an original constructor's), which only
    # resample.create_named_schedule_sampler passes
    extra_keywords: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        for keyword, o in self.options.items():
            if o.group != GROUP:
                raise ValueError(f"method {self.name!r}: option --{o.name} must be in group {GROUP!r}")
        if self.kind in (WEIGHTING, NOISE) and self.switch not in self.options:
            raise ValueError(f"{self.kind} {self.name!r}: its switch must be one of its options' keywords")

    @property
    def keywords_accepted(self):
        return tuple(self.options) + tuple(self.extra_keywords)

    def keywords(self, values):
        """The builder's keywords from option values ({option name: value}); options that
        `values` lacks take the table's default."""
        return {kw: values.get(o.name, o.default) for kw, o in self.options.items()}

    def active(self, values):
        """Whether a weighting or noise method is switched on by `values` (samplers: chosen by name)."""
        o = self.options[self.switch]
        return bool(values.get(o.name, o.default))


@functools.lru_cache(maxsize=None)
def methods(kind=None):
    """Every registered method (of `kind`), by kind, then by module name and order in its module."""
    if kind is not None:
        return tuple(m for m in methods() if m.kind == kind)
    found = []
    package = __name__.rsplit(".", 1)[0]
    for info in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]), key=lambda i: i.name):
        found += getattr(importlib.import_module(f"{package}.{info.name}"), "METHODS", ())
    found.sort(key=lambda m: KINDS.index(m.kind))
    _check_unique(found)
    return tuple(found)


def _check_unique(found):
    for what, keys in (
        ("method", [(m.kind, m.name) for m in found]),
        ("option", [o.name for m in found for o in m.options.values()]),
        ("variant", list(PAPER_VARIANTS) + [m.variant for m in found if m.variant]),
    ):
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"improved_diffusion/methods: {what} declared twice: {', '.join(twice)}")


def get(kind, name):
    """The method of `kind` called `name`; ValueError listing the valid names."""
    for m in methods(kind):
        if m.name == name:
            return m
    names = ", ".join(repr(m.name) for m in methods(kind))
    raise ValueError(f"unknown {kind} {name!r}; valid names: {names}")


def sampler_names():
    return tuple(m.name for m in methods(SAMPLER))


def options():
    """The Option entries of every method, for the options table."""
    return tuple(o for m in methods() for o in m.options.values())


def option_names(kind):
    return tuple(o.name for m in methods(kind) for o in m.options.values())


def sampler_option():
    """--schedule_sampler: the originals' flag, its choices the registered samplers."""
    names = sampler_names()
    return Option("schedule_sampler", DEFAULT_SAMPLER, "timestep sampler: " + ", ".join(names), GROUP, choices=names)


def variants():
    """The variants of the study and the launch scripts: the paper's, then each rival's."""
    return PAPER_VARIANTS + tuple(m.variant for m in methods() if m.variant)


def build_sampler(name, diffusion, values):
    """The timestep sampler `name` for `diffusion`, its options from `values` ({option name: value})."""
    m = get(SAMPLER, name)
    return m.build(diffusion, **m.keywords(values))


def build_optimizer_schedule(name, values, total_steps):
    m = get(OPTIMIZER, name)
    return m.build(total_steps=total_steps, **m.keywords(values))


def noise_transform(values):
    """
    The NOISE methods that `values` ({option name: value}) switch on, composed in registry
    order into one function `(x_start, noise) -> (noise, input_noise)`; None when none is on,
    so that the loop then draws and uses its noise exactly as without them. The order is the
    modules' (immiscible before input_perturbation): the noise is assigned to the images
    first and the perturbation added to the assigned noise, as a run of both sources would.
    """
    steps = [m.build(**m.keywords(values)) for m in methods(NOISE) if m.active(values)]
    if not steps:
        return None

    def transform(x_start, noise):
        input_noise = noise
        for step in steps:
            noise, input_noise = step(x_start, noise, input_noise)
        return noise, input_noise

    return transform


@dataclass(frozen=True)
class LossWeighting:
    """
    The loss weightings a run switched on, as plain values (so a diffusion holding it pickles):
    `values` has every weighting option, `names` the active weightings, in registry order.
    """

    values: Mapping[str, object]
    names: tuple

    @classmethod
    def from_options(cls, values):
        """From option values (any mapping with weighting options; missing ones are off)."""
        weightings = methods(WEIGHTING)
        known = {o.name: o.default for m in weightings for o in m.options.values()}
        merged = {name: values.get(name, default) for name, default in known.items()}
        return cls(merged, tuple(m.name for m in weightings if m.active(merged)))

    def tables(self, diffusion):
        """{name: float64 factor per timestep of `diffusion`} of each active weighting, in order;
        the builders refuse a diffusion they are not defined for (ValueError naming the flag)."""
        out = {}
        for name in self.names:
            m = get(WEIGHTING, name)
            out[name] = m.build(diffusion, **m.keywords(self.values))
        return out


def loss_weighting(values):
    """The LossWeighting of option values (the diffusion factory's keywords or a run's options)."""
    return LossWeighting.from_options(values)
