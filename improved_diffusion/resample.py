"""
Timestep samplers for training: which t each example of a batch is trained
at, and with what loss weight.

UniformSampler and LossSecondMomentResampler are the original ones
(unbiased importance sampling). CLTSSampler is the paper's curriculum
timestep schedule, which deliberately changes the objective. SpeeDSampler
(Wang et al. 2024) and LogitNormalSampler (SD3's "lognorm") are rivals for
comparison; they change the objective too (docs/methods.md).
"""

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment", "clts", "speed", "lognormal")
_CLTS_KWARGS = ("mu", "sigma", "target_steps", "lambda_max", "importance_weighting")
_LSM_KWARGS = ("history_per_term", "uniform_prob")
_SPEED_KWARGS = ("tau", "k", "lam")
_LOGNORMAL_KWARGS = ("mean", "std")
_SAMPLER_KWARGS = {
    "loss-second-moment": _LSM_KWARGS,
    "clts": _CLTS_KWARGS,
    "speed": _SPEED_KWARGS,
    "lognormal": _LOGNORMAL_KWARGS,
}


def create_named_schedule_sampler(name, diffusion, **kwargs):
    """
    Build a timestep sampler by its flag name.

    :param name: "uniform", "loss-second-moment", "clts", "speed" or "lognormal".
    :param diffusion: the diffusion process to sample timesteps for.
    :param kwargs: options of the samplers: CLTS (mu, sigma, target_steps,
                   lambda_max, importance_weighting), loss-second-moment
                   (history_per_term, uniform_prob), SpeeD (tau, k, lam),
                   log-normal (mean, std). Options of the other samplers are
                   ignored, so a launcher may always pass them all.
    """
    known = {k for names in _SAMPLER_KWARGS.values() for k in names}
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"unknown schedule sampler options: {sorted(unknown)}")
    mine = {k: v for k, v in kwargs.items() if k in _SAMPLER_KWARGS.get(name, ())}
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion, **mine)
    if name == "clts":
        return CLTSSampler(diffusion, **mine)
    if name == "speed":
        return SpeeDSampler(diffusion, **mine)
    if name == "lognormal":
        return LogitNormalSampler(diffusion, **mine)
    raise ValueError(
        f"unknown schedule_sampler {name!r}; valid names: "
        + ", ".join(repr(n) for n in SCHEDULE_SAMPLERS)
    )


class ScheduleSampler(ABC):
    """
    A distribution over the diffusion timesteps.

    By default, sample() importance-weights the drawn timesteps by
    1 / (T p(t)), so that the expected loss equals the uniform-t objective and
    only its variance changes. Subclasses may change the weighting, and so the
    objective.

    set_step / state_dict / load_state_dict are no-ops here, so a training
    loop can call them on any sampler.
    """

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


class CLTSSampler(ScheduleSampler):
    """
    Curriculum-learning timestep schedule (CLTS, the paper's Eq. 7-8).

    With s = t / (T - 1), a Gaussian over timesteps
    g(t) = exp(-(s - mu)^2 / (2 sigma^2)) / Z, the uniform u(t) = 1 / T and
    lam_k = lambda_max * min(k / target_steps, 1) at global step k:

        p_k(t) = (1 - lam_k) u(t) + lam_k g(t)

    Training starts uniform and moves towards the Gaussian over target_steps
    optimizer steps. Drawn timesteps get weight 1: training easy timesteps
    less often is the point, so by default the loss is not importance-weighted
    back to the uniform objective (importance_weighting=True does that, with
    weights 1 / (T p_k(t))).

    Draws use torch's generator of the training device, so saving and
    restoring the training RNG state makes them reproducible; the distribution
    is built on that device, so a step copies nothing from the host.

    :param diffusion: the diffusion process (for T).
    :param mu: centre of the Gaussian in s = t / (T - 1), in [0, 1].
    :param sigma: its standard deviation in units of s, > 0.
    :param target_steps: K_target, the steps over which lam ramps to lambda_max.
    :param lambda_max: the final mixing weight of the Gaussian, in [0, 1].
    :param importance_weighting: return 1 / (T p_k(t)) instead of ones.
    """

    def __init__(
        self,
        diffusion,
        mu=0.3,
        sigma=1.0,
        target_steps=100000,
        lambda_max=1.0,
        importance_weighting=False,
    ):
        mu, sigma, lambda_max = float(mu), float(sigma), float(lambda_max)
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"clts_mu must lie in [0, 1], got {mu}")
        if not sigma > 0.0 or not np.isfinite(sigma):
            raise ValueError(f"clts_sigma must be > 0, got {sigma}")
        if not target_steps > 0:
            raise ValueError(f"clts_target_steps must be > 0, got {target_steps}")
        if not 0.0 <= lambda_max <= 1.0:
            raise ValueError(f"clts_lambda_max must lie in [0, 1], got {lambda_max}")
        self.diffusion = diffusion
        self.mu = mu
        self.sigma = sigma
        self.target_steps = target_steps
        self.lambda_max = lambda_max
        self.importance_weighting = bool(importance_weighting)
        self.step = 0

        T = diffusion.num_timesteps
        s = torch.arange(T, dtype=torch.float64) / max(T - 1, 1)
        g = torch.exp(-((s - mu) ** 2) / (2 * sigma**2))
        if not g.sum() > 0:
            raise ValueError(
                f"clts_sigma {sigma} is too small for T = {T} timesteps: the Gaussian is zero "
                f"at every timestep (its spacing is 1 / (T - 1) = {1 / max(T - 1, 1):.2g})"
            )
        self._gaussian = g / g.sum()
        self._uniform = torch.full((T,), 1.0 / T, dtype=torch.float64)
        self._cache = {}  # device -> (lam, p, cdf, gaussian, uniform) on that device

    @property
    def lam(self):
        """The current mixing weight lam_k of the Gaussian."""
        return self.lam_at(self.step)

    def lam_at(self, step):
        return self.lambda_max * min(step / self.target_steps, 1.0)

    def schedule_values(self, step):
        return {"clts_lambda": float(self.lam_at(step))}

    def lambda_(self):
        """The current mixing weight lam_k (same as the `lam` property)."""
        return self.lam

    def set_step(self, step):
        """Move the curriculum to global optimizer step k = step (>= 0)."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.step = step

    def _distribution(self, device):
        """p_k and its CDF on `device`, rebuilt there only when lam has changed."""
        device = torch.device(device)
        lam, p, cdf, gaussian, uniform = self._cache.get(device) or (None, None, None, None, None)
        if gaussian is None:
            gaussian, uniform = self._gaussian.to(device), self._uniform.to(device)
        if lam != self.lam:
            lam = self.lam
            p = (1.0 - lam) * uniform + lam * gaussian
            cdf = torch.cumsum(p, dim=0)
            self._cache[device] = (lam, p, cdf, gaussian, uniform)
        return p, cdf

    def weights(self):
        """p_k over the T timesteps, float64 numpy, summing to 1."""
        p, _ = self._distribution("cpu")
        return p.numpy().copy()

    def sample(self, batch_size, device):
        """
        Draw timesteps from p_k by inverse CDF (vectorised, no loop over T).

        :param batch_size: the number of timesteps to draw.
        :param device: the torch device of the returned tensors.
        :return: (timesteps, weights): int64 indices and float32 weights,
                 ones unless importance_weighting is set.
        """
        p, cdf = self._distribution(device)
        u = torch.rand(batch_size, dtype=torch.float64, device=cdf.device) * cdf[-1]
        indices = torch.searchsorted(cdf, u, right=True).clamp_(max=len(cdf) - 1)
        if self.importance_weighting:
            weights = (1.0 / (len(p) * p[indices])).float()
        else:
            weights = torch.ones(batch_size, dtype=torch.float32, device=cdf.device)
        return indices, weights

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state_dict):
        self.set_step(state_dict["step"])


def _draw(p, batch_size, generator_device):
    """Indices drawn from the float64 distribution `p` (on its device) by inverse CDF."""
    cdf = torch.cumsum(p, dim=0)
    u = torch.rand(batch_size, dtype=torch.float64, device=generator_device) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(cdf) - 1)


class _FixedDistributionSampler(ScheduleSampler):
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


class LogitNormalSampler(_FixedDistributionSampler):
    """
    Logit-normal ("log-normal") timestep sampling, as in SD3 (Esser et al. 2024) and
    SpeeD's "lognorm" baseline: u = t / T in (0, 1) with logit(u) ~ N(mean, std^2).

    Discretised at the mid-points u_t = (t + 1/2) / T:
        p(t) proportional to exp(-(logit(u_t) - mean)^2 / (2 std^2)) / (u_t (1 - u_t)),
    every drawn t with loss weight 1 (the objective changes, as in SD3).
    SpeeD's own code evaluates the density at the noise level sqrt(1 - alpha_bar_t)
    instead of t / T; over t / T it does not depend on the noise schedule.

    :param diffusion: the diffusion process (for T).
    :param mean: the mean m of logit(t / T).
    :param std: its standard deviation s, > 0.
    """

    def __init__(self, diffusion, mean=0.0, std=1.0):
        mean, std = float(mean), float(std)
        if not std > 0 or not np.isfinite(std) or not np.isfinite(mean):
            raise ValueError(f"lognormal_std must be > 0 and the mean finite, got mean {mean}, std {std}")
        self.diffusion = diffusion
        self.mean, self.std = mean, std
        T = diffusion.num_timesteps
        u = (np.arange(T, dtype=np.float64) + 0.5) / T
        logit = np.log(u) - np.log1p(-u)
        dens = np.exp(-((logit - mean) ** 2) / (2 * std**2)) / (u * (1 - u))
        if not dens.sum() > 0:
            raise ValueError(f"the logit-normal (mean {mean}, std {std}) is zero at every timestep")
        self._setup(dens, np.ones(T))

    def sample(self, batch_size, device):
        """(timesteps, weights): int64 indices drawn from p, float32 ones."""
        p, _ = self._on(device)
        indices = _draw(p, batch_size, p.device)
        return indices, torch.ones(batch_size, dtype=torch.float32, device=p.device)


class SpeeDSampler(_FixedDistributionSampler):
    """
    SpeeD's timestep sampling and loss weighting (Wang et al. 2024, "A Closer Look at
    Time Steps is Worthy of Triple Speed-Up for Diffusion Model Training"), with the
    semantics of its public Speed_IDDPM with weighting = sampling = "ours":

    - asymmetric sampling: with tau_T = round(tau T), the timesteps t < tau_T are
      drawn k times as often as those above: p(t) proportional to k for t < tau_T,
      1 otherwise;
    - dual (antithetic) timesteps: of a batch of n, the first n // 2 + 1 are drawn
      from p, the rest are their duals about m, the first t where the change of
      sqrt(1 - alpha_bar_t) (np.gradient) falls below 1e-4:
      dual(t) = m - t for t < m, t - m otherwise (clamped to T - 1; m = T when the
      change never falls below the threshold);
    - change-aware weighting: with d_t = np.gradient(1 - alpha_bar)_t min-max
      normalised over all t to [0, 1], the loss weight is
      (1 - lam) + (2 lam - 1) d_t for t < tau_T and 1 otherwise (lam = 0.6: weights
      in [0.4, 0.6] below tau).

    The weights come back from sample() and so multiply the whole per-sample loss
    (SpeeD's code multiplies the MSE term only; the same unless sigmas are learned).
    SpeeD's published constants for T = 1000: tau = 700 (0.7 here), k = 5,
    lam = 0.6; the class defaults are those.

    :param diffusion: the diffusion process (T and alpha_bar).
    :param tau: the boundary as a fraction of T, in (0, 1].
    :param k: the probability ratio below / above the boundary, > 0.
    :param lam: the weighting constant lambda.
    """

    THRESHOLD = 1e-4

    def __init__(self, diffusion, tau=0.7, k=5.0, lam=0.6):
        tau, k, lam = float(tau), float(k), float(lam)
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"speed_tau must lie in (0, 1], got {tau}")
        if not k > 0 or not np.isfinite(k):
            raise ValueError(f"speed_k must be > 0, got {k}")
        if not np.isfinite(lam):
            raise ValueError(f"speed_lambda must be finite, got {lam}")
        self.diffusion = diffusion
        self.tau, self.k, self.lam = tau, k, lam
        T = diffusion.num_timesteps
        alphas_cumprod = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
        self.tau_steps = min(max(int(round(tau * T)), 1), T)
        probs = np.where(np.arange(T) < self.tau_steps, k, 1.0)
        grad = np.gradient(np.sqrt(1.0 - alphas_cumprod)) if T > 1 else np.zeros(1)
        below = np.flatnonzero(grad < self.THRESHOLD)
        self.meaningful_steps = int(below[0]) + 1 if len(below) else T
        change = np.gradient(1.0 - alphas_cumprod) if T > 1 else np.zeros(1)
        span = change.max() - change.min()
        norm = (change - change.min()) / span if span > 0 else np.zeros(T)
        base = 1.0 - lam
        weights = np.where(np.arange(T) < self.tau_steps, base + (1 - 2 * base) * norm, 1.0)
        self._setup(probs, weights)

    def dual(self, t):
        """The dual timesteps of `t` (a tensor) about meaningful_steps."""
        m = self.meaningful_steps
        return torch.where(t < m, m - t, t - m).clamp_(max=self.diffusion.num_timesteps - 1)

    def sample(self, batch_size, device):
        """
        (timesteps, weights): batch_size // 2 + 1 draws from p followed by the duals of
        the first batch_size - (batch_size // 2 + 1) of them; float32 loss weights.
        """
        p, w = self._on(device)
        first = _draw(p, batch_size // 2 + 1, p.device)
        indices = torch.cat([first, self.dual(first)])[:batch_size]
        return indices, w[indices].float()
