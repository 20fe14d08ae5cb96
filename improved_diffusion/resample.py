"""
Timestep samplers for training: which t each example of a batch is trained
at, and with what loss weight.

UniformSampler and LossSecondMomentResampler are the original ones
(unbiased importance sampling), with the original base classes. The samplers
this project adds (the paper's CLTS and the rivals) live in
`improved_diffusion/methods/`; `create_named_schedule_sampler` finds every
sampler, original or added, through the registry there.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion, **kwargs):
    """
    Build a timestep sampler by its flag name (a registered sampler:
    `improved_diffusion.methods.sampler_names()`).

    :param name: "uniform", "loss-second-moment", "clts", ... (--schedule_sampler).
    :param diffusion: the diffusion process to sample timesteps for.
    :param kwargs: constructor keywords of the samplers, e.g. CLTS's mu, sigma,
                   target_steps; loss-second-moment's history_per_term,
                   uniform_prob. Those of other samplers are ignored, so a
                   launcher may always pass them all; missing ones take the
                   options table's defaults.
    """
    from .methods import registry  # imported here: the registered samplers import this module

    samplers = registry.methods(registry.SAMPLER)
    unknown = set(kwargs) - {kw for m in samplers for kw in m.keywords_accepted}
    if unknown:
        raise TypeError(f"unknown schedule sampler options: {sorted(unknown)}")
    if name not in registry.sampler_names():
        raise ValueError(f"unknown schedule_sampler {name!r}; valid names: "
                         + ", ".join(repr(n) for n in registry.sampler_names()))
    method = registry.get(registry.SAMPLER, name)
    return method.build(diffusion, **{k: v for k, v in kwargs.items() if k in method.keywords_accepted})


class ScheduleSampler(ABC):
    """
    A distribution over the diffusion timesteps.

    By default, sample() importance-weights the drawn timesteps by
    1 / (T p(t)), so that the expected loss equals the uniform-t objective and
    only its variance changes. Subclasses may change the weighting, and so the
    objective.

    update_with_local_losses / set_step / state_dict / load_state_dict are
    no-ops here, so a training loop can call them on any sampler.
    """

    # What the weights of sample() multiply in TrainLoop: False, the whole per-sample loss
    # (importance weights must, to keep the objective); True, the MSE term alone, the vb
    # term of learned sigmas unweighted (SpeeD's weights, as its code applies them).
    weights_mse_only = False

    @abstractmethod
    def weights(self):
        """
        A numpy array with one positive weight per timestep (need not sum to 1).
        """

    def sample(self, batch_size, device):
        """
        Draw timesteps for a batch, with numpy's global RNG (as the original).

        :param batch_size: the number of timesteps to draw.
        :param device: the torch device of the returned tensors.
        :return: a tuple (timesteps, weights): int64 indices and float32
                 loss weights, both of shape [batch_size].
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = torch.from_numpy(weights_np).float().to(device)
        return indices, weights

    def update_with_local_losses(self, local_ts, local_losses):
        """Learn from this step's losses: nothing here (LossAwareSampler learns), so a
        training loop can call it on any sampler."""

    def set_step(self, step):
        """Tell the sampler the global optimizer step (used by curricula)."""

    def schedule_values(self, step):
        """The curriculum's values at global step `step`, for the logs ({} without one)."""
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        pass


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely; all weights 1."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights

    def sample(self, batch_size, device):
        """Drawn on `device` with torch's generator: no host-to-device copy in the step."""
        indices = torch.randint(0, self.diffusion.num_timesteps, (batch_size,), device=device)
        return indices, torch.ones(batch_size, dtype=torch.float32, device=device)


class LossAwareSampler(ScheduleSampler):
    """A sampler whose distribution is updated from observed losses."""

    def update_with_local_losses(self, local_ts, local_losses):
        """
        Update the distribution from this rank's losses.

        Every rank must call this with its own batch: the losses of all ranks
        are all-gathered (when torch.distributed is initialised) so that all
        ranks keep the same distribution.

        :param local_ts: an integer tensor of timesteps.
        :param local_losses: a 1-D tensor of the losses at those timesteps.
        """
        local_losses = local_losses.detach()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return

        device = local_ts.device
        world_size = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
        dist.all_gather(sizes, torch.tensor([len(local_ts)], dtype=torch.int64, device=device))
        sizes = [int(s.item()) for s in sizes]
        max_size = max(sizes)

        # all_gather needs equal shapes: pad every rank's batch to the largest.
        padded_ts = torch.zeros(max_size, dtype=local_ts.dtype, device=device)
        padded_ts[: len(local_ts)] = local_ts
        padded_losses = torch.zeros(max_size, dtype=local_losses.dtype, device=device)
        padded_losses[: len(local_losses)] = local_losses
        ts_batches = [torch.zeros_like(padded_ts) for _ in sizes]
        loss_batches = [torch.zeros_like(padded_losses) for _ in sizes]
        dist.all_gather(ts_batches, padded_ts)
        dist.all_gather(loss_batches, padded_losses)
        timesteps = [x for batch, n in zip(ts_batches, sizes) for x in batch[:n].tolist()]
        losses = [x for batch, n in zip(loss_batches, sizes) for x in batch[:n].tolist()]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """
        Update the distribution from the losses of all ranks.

        Called with identical arguments on every rank, so it must be
        deterministic.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """
    Sample t proportionally to sqrt(E[loss_t^2]) over the last
    history_per_term losses seen at t, mixed with a little uniform mass;
    uniform until every timestep has a full history (Nichol & Dhariwal, 2021).
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros(
            [diffusion.num_timesteps, history_per_term], dtype=np.float64
        )
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()

    def state_dict(self):
        # Plain tensors, so that checkpoints load with weights_only=True.
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state_dict):
        history = np.asarray(state_dict["loss_history"], dtype=np.float64)
        counts = np.asarray(state_dict["loss_counts"], dtype=np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"loss history of shape {history.shape} does not fit "
                f"{self._loss_history.shape} (num_timesteps, history_per_term)"
            )
        self._loss_history = history.copy()
        self._loss_counts = counts.copy()
