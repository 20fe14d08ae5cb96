"""
Mixed precision in one place: which precision a run uses, the autocast around the model,
and the optimizer step that skips a non-finite update (training, sampling and the
benchmark all use these).

Parameters, gradients and the optimizer state stay float32; `torch.autocast` runs the
model in bf16 or fp16. fp16 scales the loss (GradScaler); bf16 needs no scaling.
`fp64` is a reference precision, not a training one: weights (initialised in float64),
inputs, noise and the optimizer are float64, so a run's numbers depend on the code's
arithmetic and not on which CPU kernels round it (tests/test_pinned_weights.py).
"""

from contextlib import nullcontext

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": None}  # autocast dtype


def param_dtype(precision):
    """The dtype of weights, inputs and noise of a resolved precision (autocast casts inside)."""
    return torch.float64 if precision == "fp64" else torch.float32


def resolve(precision, device, purpose="train", use_fp16=False):
    """
    The concrete precision ('fp32', 'bf16', 'fp16' or 'fp64') of a `--precision` value.

    'auto' is bf16 for training on a CUDA GPU that has it, else fp32; sampling and
    evaluation resolve 'auto' to fp32, as the original sampled. The original's
    `--use_fp16 True` means fp16.
    """
    if use_fp16:
        return "fp16"
    if precision != "auto":
        if precision not in DTYPES:
            raise ValueError(f"--precision must be one of auto, {', '.join(DTYPES)}, got {precision!r}")
        if precision == "fp64" and purpose != "train":
            raise ValueError("--precision fp64 is for training reference runs; sampling takes fp32, bf16 or fp16")
        return precision
    device = torch.device(device)
    if purpose == "train" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(precision, device):
    """The autocast context of a resolved precision (none for fp32)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_scaler(precision, device, scale_growth):
    """fp16's loss scaler (the loss scale doubles after 1/scale_growth clean steps); None otherwise."""
    if precision != "fp16":
        return None
    growth_interval = max(1, round(1.0 / scale_growth))
    return torch.amp.GradScaler(torch.device(device).type, init_scale=2.0**16, growth_interval=growth_interval)


class MixedPrecision:
    """
    Autocast, loss scaling and the optimizer step of one training run.

    A non-finite loss or gradient skips the update. The decision stays on the device where
    the optimizer takes fused AdamW's `found_inf` input (the mechanism GradScaler uses), so
    the step never waits for the host; other AdamW kernels need one host read.
    """

    def __init__(self, precision, device, optimizer, scale_growth=1e-3):
        self.precision, self.device, self.optimizer = precision, torch.device(device), optimizer
        self.scaler = make_scaler(precision, device, scale_growth)
        self.skips_on_device = bool(optimizer.param_groups[0].get("fused"))

    def autocast(self):
        return autocast(self.precision, self.device)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self):
        """Make the gradients true gradients (before measuring or clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def step(self, finite):
        """One optimizer step, skipped when `finite` (a device bool) is false."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips by itself when a gradient is not finite
            self.scaler.update()
        elif self.skips_on_device:
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif finite:  # a host read, only for optimizers without found_inf (foreach, single)
            self.optimizer.step()
