"""
Exponential moving averages of the weights, one per rate (the original's `ema_rate` list).

The averages are plain fp32 tensors beside the model's parameters; a checkpoint stores each
as a full model state dict (`ema_RATE_STEP.pt`, the original format).

With `--ema_warmup` the decay of the update made at global step k is
min(rate, (1 + k) / (10 + k)) (`warmup_rate`): a function of the step alone, so a resumed
run averages exactly as an uninterrupted one (docs/methods.md).
"""

import copy

import torch


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
