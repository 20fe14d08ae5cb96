"""
Momentum decay with learning-rate compensation (MDLRC; the paper's Eq. 9-10), the
optimizer-side method: the schedule of Adam's beta1 and an lr factor that TrainLoop applies
each step.

MD (Demon-style decay of Adam's beta1, with a floor), with r = 1 - k / K:

    beta_k = max(beta_min, beta_init * r / ((1 - beta_init) + beta_init * r))

LRC keeps the weight (1 - beta) of the current gradient in each update constant:

    lr_k = lr_base(k) * (1 - beta_init) / (1 - beta_k)

k is the global optimizer step (the number of updates already made), K the planned total.

LRC lowers the lr as beta1 falls (to 0.2x at the floor 0.5), so MD + LRC is also an lr decay.
`--md_hold_beta1 True` is the control that separates the two: the same lr curve, with Adam's
beta1 held at beta_init (the study's `lrc_curve` variant).

The formulas are reconstructed from the paper's prose and its reference [6]; see
docs/methods.md.
"""

from dataclasses import dataclass
from typing import Optional

from ..options.option import Option
from .registry import GROUP, OPTIMIZER, Method

# MomentumSchedule checks these values itself (naming the flag), so the table has no check.
MOMENTUM_DECAY = Option("momentum_decay", False, "MD: decay Adam's beta1 over --total_steps (Demon)", GROUP)
BETA_INIT = Option("md_beta_init", 0.9, "MD: beta1 at step 0", GROUP)
BETA_MIN = Option("md_beta_min", 0.5, "MD: floor of beta1", GROUP)
LR_COMPENSATION = Option("lr_compensation", False, "LRC: scale lr by (1 - beta_init) / (1 - beta1)", GROUP)
HOLD_BETA1 = Option("md_hold_beta1", False, "control: MD+LRC's lr curve, with Adam's beta1 held at --md_beta_init", GROUP)


@dataclass(frozen=True)
class MomentumSchedule:
    momentum_decay: bool = MOMENTUM_DECAY.default  # decay beta1 from beta_init towards beta_min
    lr_compensation: bool = LR_COMPENSATION.default  # scale lr by (1 - beta_init) / (1 - beta_k)
    beta_init: float = BETA_INIT.default  # beta1 at step 0 (Adam's default)
    beta_min: float = BETA_MIN.default  # floor of the decayed beta1
    total_steps: Optional[int] = None  # K, the planned number of optimizer steps
    hold_beta1: bool = HOLD_BETA1.default  # the control: LRC's lr curve, Adam's beta1 stays beta_init

    def __post_init__(self):
        if not 0.0 <= self.beta_init < 1.0:
            raise ValueError(f"--md_beta_init must be in [0, 1), got {self.beta_init}")
        if self.hold_beta1 and not (self.momentum_decay and self.lr_compensation):
            raise ValueError("--md_hold_beta1 True keeps the lr curve of MD + LRC: it needs "
                             "--momentum_decay True and --lr_compensation True")
        if self.momentum_decay:
            if self.total_steps is None or self.total_steps <= 0:
                raise ValueError(
                    "--momentum_decay True needs the planned number of training steps: "
                    "set --total_steps K (or --lr_anneal_steps K)"
                )
            if not 0.0 <= self.beta_min < self.beta_init:
                raise ValueError(
                    f"--md_beta_min must be in [0, --md_beta_init) = [0, {self.beta_init}), got {self.beta_min}"
                )

    def beta1(self, step):
        """Adam's beta1 for the update made at global step `step`."""
        return self.beta_init if self.hold_beta1 else self.decayed_beta1(step)

    def decayed_beta1(self, step):
        """MD's beta1 at global step `step` (beta_init without MD), which LRC's factor follows."""
        if not self.momentum_decay:
            return self.beta_init
        r = max(0.0, 1.0 - step / self.total_steps)
        demon = self.beta_init * r / ((1.0 - self.beta_init) + self.beta_init * r)
        return max(self.beta_min, demon)

    def lr_factor(self, step):
        """The learning-rate compensation factor (1 without MD or without LRC)."""
        if not (self.momentum_decay and self.lr_compensation):
            return 1.0
        return (1.0 - self.beta_init) / (1.0 - self.decayed_beta1(step))


METHODS = (
    Method("mdlrc", OPTIMIZER, MomentumSchedule, options={
        "momentum_decay": MOMENTUM_DECAY, "beta_init": BETA_INIT, "beta_min": BETA_MIN,
        "lr_compensation": LR_COMPENSATION, "hold_beta1": HOLD_BETA1,
    }, switch="momentum_decay", variant="lrc_curve"),
)
