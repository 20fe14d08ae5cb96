"""
The shared part of the samplers with a fixed distribution over timesteps (log-normal, SpeeD):
the distribution kept per device, drawn by inverse CDF with torch's generator of the training
device (so the training RNG state fixes the draws and a step copies nothing from the
host). Not a method itself: it declares none.
"""

import torch

from ..resample import ScheduleSampler


def draw(p, batch_size, generator_device):
    """Indices drawn from the float64 distribution `p` (on its device) by inverse CDF."""
    cdf = torch.cumsum(p, dim=0)
    u = torch.rand(batch_size, dtype=torch.float64, device=generator_device) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(cdf) - 1)


class FixedDistributionSampler(ScheduleSampler):
    """A fixed distribution over timesteps, kept per device, drawn with torch's generator."""

    def _setup(self, probs, loss_weights):
        self._p = torch.as_tensor(probs, dtype=torch.float64)
        self._p = self._p / self._p.sum()
        self._loss_weights = torch.as_tensor(loss_weights, dtype=torch.float64)
        self._cache = {}

    def _on(self, device):
        device = torch.device(device)
        if device not in self._cache:
            self._cache[device] = (self._p.to(device), self._loss_weights.to(device))
        return self._cache[device]

    def weights(self):
        """The sampling distribution over the T timesteps, float64 numpy, summing to 1."""
        return self._p.numpy().copy()

    def loss_weights(self):
        """The loss weight of each timestep, float64 numpy."""
        return self._loss_weights.numpy().copy()
