"""
Diffusion processes that keep only a subset of a base process's timesteps,
for sampling (and evaluating) with fewer steps than the model was trained on.
"""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """
    Choose which timesteps of a T-step process to keep.

    The process is cut into len(section_counts) equal portions (the first
    T % len portions one step longer), and each portion is strided, with
    rounding, to its count of steps, first and last step included. For
    example T = 300 with [10, 15, 20] takes 10 steps from 0..99, 15 from
    100..199 and 20 from 200..299.

    A string "ddimN" instead asks for the single integer stride of the DDIM
    paper that gives exactly N steps (range(0, T, stride)).

    :param num_timesteps: T, the number of steps of the base process.
    :param section_counts: a list of ints, an int, or a string of
                           comma-separated ints, or "ddimN".
    :return: the set of kept timesteps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired_count} steps out of "
                f"{num_timesteps} with an integer stride"
            )
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]

    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate (rather than multiply) the fractional index: the kept
        # steps then match the original code bit for bit, ties included.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion process that skips steps of a base process.

    The kept steps get new betas, 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}], so
    that alpha_bar at every kept step equals the base process's. The model
    still sees the base process's timesteps (through timestep_map).

    :param use_timesteps: the base-process timesteps to keep (any collection).
    :param kwargs: the keyword arguments of the base GaussianDiffusion
                   (betas, model_mean_type, ..., min_snr_gamma).
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])

        base = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._timestep_map_cache = {}

    def p_mean_variance(self, model, *args, **kwargs):  # pylint: disable=signature-differs
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):  # pylint: disable=signature-differs
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def heldout_loss_terms(self, model, *args, **kwargs):  # pylint: disable=signature-differs
        return super().heldout_loss_terms(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model,
            self.timestep_map,
            self.rescale_timesteps,
            self.original_num_steps,
            map_cache=self._timestep_map_cache,
        )

    def _scale_timesteps(self, t):
        # The wrapped model maps and rescales the timesteps itself.
        return t

    def __getstate__(self):
        state = super().__getstate__()
        state["_timestep_map_cache"] = {}
        return state


class _WrappedModel:
    """
    Calls a model with base-process timesteps: maps spaced indices through
    timestep_map and, if asked, rescales them to 0..1000.
    """

    def __init__(
        self, model, timestep_map, rescale_timesteps, original_num_steps, map_cache=None
    ):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        # device -> int64 tensor of timestep_map; shared across wrappers so a
        # sampling loop copies the map to the GPU once, not every step.
        self._map_cache = {} if map_cache is None else map_cache

    def _map_on(self, device):
        mapped = self._map_cache.get(device)
        if mapped is None:
            mapped = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            self._map_cache[device] = mapped
        return mapped

    def __call__(self, x, ts, **kwargs):
        new_ts = self._map_on(ts.device)[ts].to(ts.dtype)
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
