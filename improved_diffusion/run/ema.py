"""
Exponential moving averages of the weights, one per rate (the original's `ema_rate` list).

The averages are plain fp32 tensors beside the model's parameters; a checkpoint stores each
as a full model state dict (`ema_RATE_STEP.pt`, the original format).

With `--ema_warmup` the decay of the update made at global step k is
min(rate, (1 + k) / (10 + k)) (`warmup_rate`): a function of the step alone, so a resumed
run averages exactly as an uninterrupted one (docs/methods.md).

`PowerEMA` (--phema_stds) keeps power-function averages (Karras et al. 2024, EDM2, section
3): after t applied updates, the weights after update i have weight proportional to i^gamma,
so each average covers a fixed fraction of training, whatever its length. Its snapshots let
`posthoc_ema.py` rebuild an average of any width after training (docs/methods.md).
"""

import copy

import numpy as np
import torch

# The widest power-function profile has relative std 0.3003 (gamma = -0.382); we accept up to here.
MAX_RELATIVE_STD = 0.3


def warmup_rate(rate, step):
    """The decay of the update at global step `step` under --ema_warmup: min(rate, (1 + step) / (10 + step))."""
    return min(rate, (1.0 + step) / (10.0 + step))


class EMA:
    """
    :param model: the (unwrapped) model whose trainable parameters are averaged.
    :param rates: one decay rate per average, each in [0, 1).
    """

    def __init__(self, model, rates):
        self.model = model
        self.rates = tuple(rates)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [[p.detach().clone() for _, p in named] for _ in self.rates]
        self._live = [p.detach() for _, p in named]  # views of the weights, updated in place
        self._eval_model = None

    def rates_at(self, step, warmup=False):
        """The decay of each average for the update at global step `step` (`warmup_rate` with `warmup`)."""
        return tuple(warmup_rate(rate, step) for rate in self.rates) if warmup else self.rates

    @torch.no_grad()
    def update(self, finite, rates=None):
        """
        ema += (1 - rate) * (param - ema); weight 0 after a skipped step (no host sync).

        :param rates: this update's decay of each average (`rates_at(step, warmup)`);
                      None: the constant rates.
        """
        rates = self.rates if rates is None else tuple(rates)
        if len(rates) != len(self.params):
            raise ValueError(f"EMA.update got {len(rates)} rates for {len(self.params)} averages")
        for rate, ema in zip(rates, self.params):
            delta = torch._foreach_sub(self._live, ema)
            torch._foreach_mul_(delta, finite.float() * (1.0 - rate))
            torch._foreach_add_(ema, delta)

    def state_dict(self, index=0):
        """A plain model state dict carrying average `index` (what ema_RATE_STEP.pt holds)."""
        state = self.model.state_dict()
        for name, value in zip(self.names, self.params[index]):
            state[name] = value.detach().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, index, state):
        """Set average `index` from a model state dict."""
        for p, name in zip(self.params[index], self.names):
            p.copy_(state[name])

    def eval_model(self, index=0):
        """A copy of the model carrying average `index`, in eval mode (kept for reuse)."""
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(self.model)
        self._eval_model.load_state_dict(self.state_dict(index))
        return self._eval_model.eval()

    def all_tensors(self):
        return [p for ema in self.params for p in ema]


def std_to_exponent(std):
    """
    The exponent gamma of the power-function profile with relative standard deviation `std`.

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (`exponent_to_std`) is a cubic in
    gamma; of its real roots the largest is the one whose profile is a plain average for
    sigma_rel = 1/sqrt(12) (gamma = 0) and narrows as sigma_rel falls.
    """
    std = float(std)
    if not 0.0 < std <= MAX_RELATIVE_STD:
        raise ValueError(f"a power-function EMA's relative std must be in (0, {MAX_RELATIVE_STD}], got {std}")
    q = std ** -2.0
    roots = np.roots([1.0, 7.0, 16.0 - q, 12.0 - q])
    real = roots.real[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))]
    return float(real.max())


def exponent_to_std(gamma):
    """The relative standard deviation of the profile t -> t^gamma on [0, T], divided by T."""
    gamma = float(gamma)
    return float(np.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0))))


def power_beta(gamma, t):
    """
    The decay of the update that makes `t` updates in all: (1 - 1/t)^(gamma + 1), so that after
    t updates the weights after update i count (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1):
    the profile t^gamma integrated over the update. t = 1 gives 0: the initial weights never count.
    """
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


class PowerEMA:
    """
    Power-function averages of the weights, one per relative std (--phema_stds).

    t counts the updates applied so far (a device counter): a skipped update (non-finite
    gradient, the classic EMA's `finite` mask) leaves both the weights and every average as
    they are and does not count, so each average stays exactly the power-function average of
    the applied updates, which post-hoc reconstruction assumes. Without skips t is the step.

    :param model: the (unwrapped) model whose trainable parameters are averaged.
    :param stds: relative standard deviations, each in (0, MAX_RELATIVE_STD].
    """

    def __init__(self, model, stds):
        self.model = model
        self.stds = tuple(float(s) for s in stds)
        self.gammas = tuple(std_to_exponent(s) for s in self.stds)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self._live = [p.detach() for _, p in named]
        self.params = [[p.detach().clone() for _, p in named] for _ in self.stds]
        device = self._live[0].device if self._live else "cpu"
        self.updates = torch.zeros((), dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, finite):
        """Fold in the weights after this step's update, when it was applied (no host sync)."""
        self.updates += finite.long()
        t = self.updates.double().clamp(min=1.0)
        for gamma, avg in zip(self.gammas, self.params):
            weight = finite.double() * (1.0 - power_beta(gamma, t))
            torch._foreach_lerp_(avg, self._live, weight.to(avg[0].dtype))

    def average_state_dict(self, index):
        """A plain model state dict carrying average `index`."""
        state = self.model.state_dict()
        for name, value in zip(self.names, self.params[index]):
            state[name] = value.detach().clone()
        return state

    def state_dict(self):
        """What a checkpoint or a snapshot holds: the stds, t, and each average as a model state dict."""
        return {"stds": list(self.stds), "updates": int(self.updates),
                "averages": [self.average_state_dict(i) for i in range(len(self.stds))]}

    @torch.no_grad()
    def load_state_dict(self, state):
        if [float(s) for s in state["stds"]] != list(self.stds):
            raise ValueError(f"--phema_stds {','.join(map(str, self.stds))}: the checkpoint tracks "
                             f"{','.join(map(str, state['stds']))}; resume with those")
        for params, saved in zip(self.params, state["averages"]):
            for p, name in zip(params, self.names):
                p.copy_(saved[name])
        self.updates.fill_(int(state["updates"]))
