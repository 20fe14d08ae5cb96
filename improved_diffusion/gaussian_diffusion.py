"""
The Gaussian diffusion process: noise schedules, the forward process q, the
learned reverse process p, the training objectives and the samplers.

Numerically this follows improved-diffusion / guided-diffusion (schedules and
coefficients in float64 numpy, gathered to float32 tensors per batch), so the
released checkpoints sample and score the same. Additions of this fork:

* every sampler takes ``randn_like`` so that the caller owns all randomness
  (per-seed noise for the consistency metric and for multi-GPU sampling);
  the DDPM and DDIM loops are one loop (``_sample_loop``) with two step functions;
* training losses are computed in float32 even when the model runs under
  bf16/fp16 autocast;
* optional Min-SNR-gamma weighting of the MSE term (Hang et al., 2023).
"""

import enum
import functools
import math

import numpy as np
import torch

from . import methods
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat

BETA_SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """
    Return a named beta schedule as a float64 numpy array.

    The schedules keep their shape when the number of steps changes, which is
    why the linear one is rescaled by 1000 / T.

    :param schedule_name: "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal).
    :param num_diffusion_timesteps: the number of betas T.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(
            scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64
        )
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown noise_schedule {schedule_name!r}; valid names: "
        + ", ".join(repr(n) for n in BETA_SCHEDULES)
    )


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """
    Discretise a continuous alpha_bar(s), s in [0, 1], into T betas.

    :param num_diffusion_timesteps: the number of betas T.
    :param alpha_bar: callable giving the cumulative product of (1 - beta) at
                      time s in [0, 1].
    :param max_beta: upper bound on each beta; values below 1 avoid the
                     singularity of the cosine schedule at s = 1.
    """
    # Scalar math on purpose: alpha_bar is any Python callable, and T is small.
    betas = []
    for i in range(num_diffusion_timesteps):
        s1 = i / num_diffusion_timesteps
        s2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(s2) / alpha_bar(s1), max_beta))
    return np.array(betas)


class ModelMeanType(enum.Enum):
    """What the network's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """
    Where the reverse-process variance comes from.

    LEARNED_RANGE interpolates, in log space, between the two fixed choices,
    which is easier for the network than predicting the variance directly.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE of the mean output (+ VB term for learned variances)
    RESCALED_MSE = enum.auto()  # as MSE, with the VB term scaled by T / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the bound scaled by T, an estimate of the full VLB

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _to_fp32(tensor):
    """Upcast half-precision network outputs; losses are always taken in fp32."""
    return tensor.float() if tensor.dtype in _HALF_DTYPES else tensor


def _loss_weighting(weighting, options):
    """The diffusion's LossWeighting: the one given, or one from weighting option keywords."""
    unknown = sorted(set(options) - set(methods.option_names(methods.WEIGHTING)))
    if unknown:
        raise TypeError(f"GaussianDiffusion() got unknown keyword(s): {', '.join(unknown)}")
    if weighting is not None and options:
        raise TypeError("give loss_weighting or the weighting options (min_snr_gamma, ...), not both")
    return weighting if weighting is not None else methods.loss_weighting(options)


class GaussianDiffusion:
    """
    Training and sampling utilities for a Gaussian diffusion model.

    :param betas: 1-D array of the T betas, for t = 0 .. T-1.
    :param model_mean_type: a ModelMeanType, what the model predicts.
    :param model_var_type: a ModelVarType, how the variance is obtained.
    :param loss_type: a LossType, the training objective.
    :param rescale_timesteps: if True, the model sees t * 1000 / T as floats,
                              so its inputs span 0..1000 whatever T is.
    :param loss_weighting: the loss weightings of the MSE term
                           (`methods.LossWeighting`, e.g. Min-SNR-gamma, P2;
                           improved_diffusion/methods/); None: unweighted.
    :param weighting_options: or the weightings' options as keywords
                              (min_snr_gamma=5.0, p2_gamma=1.0, p2_k=1.0, ...);
                              each becomes an attribute of the diffusion.
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps=False,
        loss_weighting=None,
        **weighting_options,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.loss_weighting = _loss_weighting(loss_weighting, weighting_options)
        self.__dict__.update(self.loss_weighting.values)  # diffusion.min_snr_gamma, diffusion.p2_gamma, ...

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1:
            raise ValueError(f"betas must be 1-D, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        # Everything below is float64 numpy; tensors are made per batch by
        # _extract, which gathers in float64 and rounds to float32 once.
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is 0 at t = 0; its log is clipped to the
        # t = 1 value so that it stays finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Derived arrays used per step, computed once instead of per call.
        self._one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self._log_betas = np.log(self.betas)
        # Fixed-large variance: beta_t, except at t = 0 where the posterior
        # variance of t = 1 gives a better decoder likelihood.
        self._fixed_large_variance = np.append(self.posterior_variance[1], self.betas[1:])
        self._fixed_large_log_variance = np.log(self._fixed_large_variance)
        self._recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self._posterior_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self._loss_weight_tables = self.loss_weighting.tables(self)  # {name: float64 factor per t}
        self._device_buffers = {}

    # ------------------------------------------------------------------ utils

    def loss_weights(self, t, name=None):
        """
        The factors of the MSE term for a batch of timesteps: of the loss weighting `name`
        (ones when it is off), or the product of all that are on (None). Float32 of shape [N]
        on t's device, gathered in float64 and rounded once.
        """
        names = self.loss_weighting.names if name is None else [name] if name in self.loss_weighting.names else []
        out = torch.ones(t.shape, dtype=torch.float32, device=t.device)
        for n in names:
            out = out * self._loss_weight(n, t)
        return out

    def _loss_weight(self, name, t):
        key = ("loss_weight", name, t.device)
        table = self._device_buffers.get(key)
        if table is None:
            table = self._device_buffers[key] = torch.from_numpy(self._loss_weight_tables[name]).to(t.device)
        return table[t].float()

    def p2_weights(self, t):
        """P2 loss weights 1 / (p2_k + SNR_t)^p2_gamma of timesteps `t` (ones when p2_gamma is 0)."""
        return self.loss_weights(t, "p2")

    def _buffer(self, name, device):
        """A float64 copy of a numpy buffer on `device`, cached per device."""
        key = (name, device)
        buf = self._device_buffers.get(key)
        if buf is None:
            buf = torch.from_numpy(getattr(self, name)).to(device)
            self._device_buffers[key] = buf
        return buf

    def _extract(self, name, t, shape):
        return _extract_into_tensor(self._buffer(name, t.device), t, shape)

    def __getstate__(self):
        # Device copies are a cache; do not pickle or deep-copy them.
        state = self.__dict__.copy()
        state["_device_buffers"] = {}
        return state

    def min_snr_weights(self, t):
        """
        Min-SNR-gamma loss weights of timesteps `t`: min(SNR, gamma) / SNR for epsilon
        prediction, min(SNR, gamma) for x_start prediction; ones when min_snr_gamma is 0.
        """
        return self.loss_weights(t, "min-snr")

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """
        The distribution q(x_t | x_0).

        :param x_start: the [N x C x ...] tensor of clean inputs.
        :param t: 1-D tensor of timestep indices (0 means one step of noise).
        :return: a tuple (mean, variance, log_variance), each shaped like x_start.
        """
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("_one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """
        Draw x_t ~ q(x_t | x_0).

        :param x_start: the clean batch.
        :param t: 1-D tensor of timestep indices (0 means one step of noise).
        :param noise: optional standard normal noise shaped like x_start.
        :return: the noised batch.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """
        The forward-process posterior q(x_{t-1} | x_t, x_0).

        :param x_start: the clean batch (or a prediction of it).
        :param x_t: the batch at step t.
        :param t: 1-D tensor of timestep indices.
        :return: a tuple (mean, variance, log_variance_clipped).
        """
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} != x_t {tuple(x_t.shape)}")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------- reverse process

    def p_mean_variance(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None
    ):
        """
        Run the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: callable model(x, t, **model_kwargs).
        :param x: the [N x C x ...] tensor at step t.
        :param t: 1-D tensor of timestep indices.
        :param clip_denoised: if True, clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: optional function applied to the x_0 prediction
                            before clipping and before it is used.
        :param model_kwargs: optional dict of extra model arguments
                             (e.g. class labels "y").
        :return: a dict with 'mean', 'variance', 'log_variance', 'pred_xstart'.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)
        return self._p_mean_variance_from_output(
            model_output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn
        )

    def _p_mean_variance_from_output(
        self, model_output, x, t, clip_denoised=True, denoised_fn=None
    ):
        """p_mean_variance for an already computed model output."""
        model_output = _to_fp32(model_output)
        B, C = x.shape[:2]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            expected = (B, C * 2, *x.shape[2:])
            if model_output.shape != expected:
                raise ValueError(
                    f"learned variance needs model output {expected}, "
                    f"got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                # var_values in [-1, 1] spans [posterior variance, beta] in log space.
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("_log_betas", t, x.shape)
                frac = (var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            model_variance = self._extract("_fixed_large_variance", t, x.shape)
            model_log_variance = self._extract("_fixed_large_log_variance", t, x.shape)
        elif self.model_var_type == ModelVarType.FIXED_SMALL:
            model_variance = self._extract("posterior_variance", t, x.shape)
            model_log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)
        else:
            raise NotImplementedError(self.model_var_type)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(
                self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
            )
            model_mean = model_output
        elif self.model_mean_type in (ModelMeanType.START_X, ModelMeanType.EPSILON):
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(
                    self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
                )
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            raise NotImplementedError(self.model_mean_type)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Inverts mean = coef1 * x_0 + coef2 * x_t.
        return (
            self._extract("_recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._extract("_posterior_coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    # -------------------------------------------------------------- guidance

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Shift the reverse-process mean by variance * grad log p(y | x_t)
        (Sohl-Dickstein et al., 2015; classifier guidance for DDPM sampling).

        :param cond_fn: callable cond_fn(x, t, **model_kwargs) returning the
                        gradient of log p(y | x) with respect to x.
        :param p_mean_var: the dict returned by p_mean_variance.
        :param x: the batch at step t.
        :param t: 1-D tensor of timestep indices.
        :param model_kwargs: optional dict passed to cond_fn.
        :return: the new mean.
        """
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Guide through the score instead of the mean (Song et al., 2020):
        eps <- eps - sqrt(1 - alpha_bar) * grad log p(y | x_t). Used by DDIM.

        :param cond_fn: as for condition_mean.
        :param p_mean_var: the dict returned by p_mean_variance.
        :param x: the batch at step t.
        :param t: 1-D tensor of timestep indices.
        :param model_kwargs: optional dict passed to cond_fn.
        :return: a copy of p_mean_var with 'pred_xstart' and 'mean' updated.
        """
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(
            x, self._scale_timesteps(t), **model_kwargs
        )
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(
            x_start=out["pred_xstart"], x_t=x, t=t
        )
        return out

    # ------------------------------------------------------------- sampling

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        *,
        randn_like=None,
    ):
        """
        Draw x_{t-1} ~ p(x_{t-1} | x_t) (ancestral DDPM step).

        :param model: the model to sample from.
        :param x: the batch at step t.
        :param t: 1-D tensor of timestep indices (0 is the last step, which
                  adds no noise).
        :param clip_denoised: if True, clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: optional function applied to the x_0 prediction.
        :param cond_fn: optional guidance gradient function, see condition_mean.
        :param model_kwargs: optional dict of extra model arguments.
        :param randn_like: optional callable f(x) -> standard normal tensor
                           like x; default torch.randn_like.
        :return: a dict with 'sample' and 'pred_xstart'.
        """
        randn_like = torch.randn_like if randn_like is None else randn_like
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        noise = randn_like(x)
        # No noise is added on the final step (t == 0).
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        *,
        randn_like=None,
    ):
        """
        Generate samples with the full ancestral (DDPM) chain.

        :param model: the model module.
        :param shape: the sample shape (N, C, H, W).
        :param noise: optional initial x_T of that shape.
        :param clip_denoised: if True, clamp x_0 predictions to [-1, 1].
        :param denoised_fn: optional function applied to each x_0 prediction.
        :param cond_fn: optional guidance gradient function.
        :param model_kwargs: optional dict of extra model arguments.
        :param device: where to create the samples; default: noise's device,
                       else a model parameter's device, else the CPU.
        :param progress: if True, show a tqdm progress bar.
        :param randn_like: optional callable f(x) -> standard normal tensor
                           like x, used for x_T (when noise is None) and for
                           every step's noise; default torch.randn_like.
        :return: the final batch of samples (no gradient).
        """
        return _last_sample(
            self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                model_kwargs, device, progress, randn_like=randn_like,
            )
        )

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        *,
        randn_like=None,
    ):
        """
        Like p_sample_loop, but yield the p_sample() dict of every step,
        from t = T-1 down to 0.

        :param randn_like: see p_sample_loop.
        """
        step = functools.partial(
            self.p_sample,
            model,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            randn_like=randn_like,
        )
        return self._sample_loop(step, model, shape, noise, device, progress, randn_like)

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
        *,
        randn_like=None,
    ):
        """
        One DDIM step x_t -> x_{t-1} (Song et al., 2021, Eq. 12).

        With eta == 0 the step is deterministic and draws no noise at all.

        :param eta: the amount of stochasticity; 1.0 matches DDPM's variance.
        :param randn_like: optional callable f(x) -> standard normal tensor
                           like x; default torch.randn_like.
        Other arguments as for p_sample (cond_fn uses condition_score).
        :return: a dict with 'sample' and 'pred_xstart'.
        """
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from x_0 so that any mean type (and guidance) works.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        if eta == 0:
            # sigma is exactly zero: skip the draw, so a deterministic sampler
            # consumes no random numbers after x_T.
            sample = mean_pred
        else:
            randn_like = torch.randn_like if randn_like is None else randn_like
            noise = randn_like(x)
            nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
            sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """
        One step of the deterministic DDIM ODE run forwards, x_t -> x_{t+1}
        (encoding images into latents).

        :param eta: must be 0; the reverse ODE is only defined deterministically.
        Other arguments as for p_sample.
        :return: a dict with 'sample' (x_{t+1}) and 'pred_xstart'.
        """
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample needs eta == 0 (deterministic path)")
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_next)
            + torch.sqrt(1 - alpha_bar_next) * eps
        )
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        *,
        randn_like=None,
    ):
        """
        Generate samples with DDIM; arguments as for p_sample_loop, plus eta.

        :param eta: DDIM stochasticity (0 = deterministic given x_T).
        :param randn_like: see p_sample_loop.
        :return: the final batch of samples (no gradient).
        """
        return _last_sample(
            self.ddim_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                model_kwargs, device, progress, eta, randn_like=randn_like,
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        *,
        randn_like=None,
    ):
        """
        Like ddim_sample_loop, but yield the ddim_sample() dict of every step.

        :param randn_like: see p_sample_loop.
        """
        step = functools.partial(
            self.ddim_sample,
            model,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            eta=eta,
            randn_like=randn_like,
        )
        return self._sample_loop(step, model, shape, noise, device, progress, randn_like)

    def _sample_loop(self, step, model, shape, noise, device, progress, randn_like):
        """
        The reverse-time loop every sampler shares: x_T (`noise`, else drawn
        with `randn_like`), then x <- step(x, t)["sample"] for t = T-1 .. 0,
        yielding each step's dict. A generator, so nothing (not even the
        argument checks) runs before the caller asks for the first step.

        :param step: callable step(x, t) -> dict with 'sample', e.g. p_sample
                     or ddim_sample with the model and options bound.
        :param model: only read to choose the device (see p_sample_loop).
        """
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        device = _resolve_device(model, noise, device)
        if noise is not None:
            img = noise
        elif randn_like is None:
            img = torch.randn(*shape, device=device)
        else:
            img = randn_like(torch.empty(*shape, device=device))
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm  # only needed for interactive use

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            # Autograd stays off for the step and while the caller holds its
            # output, as in the original loop; cond_fn turns it on for itself.
            with torch.no_grad():
                out = step(img, t)
                yield out
                img = out["sample"]

    # ------------------------------------------------------ objective / bpd

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """
        One term of the variational bound, in bits per dimension: the decoder
        NLL at t == 0, else KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).

        :return: a dict with 'output' (shape [N]) and 'pred_xstart'.
        """
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        return self._vb_terms_from_p(out, x_start, x_t, t)

    def _vb_terms_from_p(self, out, x_start, x_t, t):
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, input_noise=None, mse_weights=None):
        """
        Per-sample training losses at the given timesteps.

        Loss values are float32 even when the model runs under bf16/fp16
        autocast: its output is upcast before any loss arithmetic.

        :param model: callable model(x_t, t, **model_kwargs).
        :param x_start: the [N x C x ...] tensor of clean inputs.
        :param t: 1-D tensor of timestep indices.
        :param model_kwargs: optional dict of extra model arguments.
        :param noise: optional Gaussian noise to add (default: fresh draw).
        :param input_noise: optional noise that makes x_t instead of `noise`, which stays
                 the epsilon target (input perturbation, methods/input_perturbation.py);
                 everything computed from x_t uses this x_t.
        :param mse_weights: optional [N] factors of the MSE term alone, the vb term
                 unweighted (SpeeD's weights, as its code applies them).
        :return: a dict of shape-[N] tensors: 'loss' always; 'mse' for the
                 MSE losses (already multiplied by the factors of the loss
                 weightings that are on, see loss_weights); 'vb' when the variance is learned with an
                 MSE loss. loss = mse + vb, where vb gets no gradient into the
                 mean output.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise if input_noise is None else input_noise)
        terms = {}
        if mse_weights is not None and self.loss_type.is_vb():
            raise ValueError(f"mse_weights weight the MSE term, but loss type {self.loss_type.name} has none")

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model,
                x_start=x_start,
                x_t=x_t,
                t=t,
                clip_denoised=False,
                model_kwargs=model_kwargs,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = _to_fp32(model(x_t, self._scale_timesteps(t), **model_kwargs))
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                B, C = x_t.shape[:2]
                expected = (B, C * 2, *x_t.shape[2:])
                if model_output.shape != expected:
                    raise ValueError(
                        f"learned variance needs model output {expected}, "
                        f"got {tuple(model_output.shape)}"
                    )
                model_output, var_values = torch.split(model_output, C, dim=1)
                # The VB term trains only the variance: the mean output is
                # detached, so the mean is driven by the MSE term alone.
                frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
                p_out = self._p_mean_variance_from_output(
                    frozen_out, x_t, t, clip_denoised=False
                )
                terms["vb"] = self._vb_terms_from_p(p_out, x_start, x_t, t)["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Keeps the VB term's scale that of a 1000-step process,
                    # where it does not overwhelm the MSE term.
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            elif self.model_mean_type == ModelMeanType.EPSILON:
                target = noise
            else:
                raise NotImplementedError(self.model_mean_type)
            if model_output.shape != target.shape:
                raise ValueError(
                    f"model output {tuple(model_output.shape)} does not match "
                    f"target {tuple(target.shape)}"
                )
            terms["mse"] = mean_flat((target - model_output) ** 2)
            for name in self.loss_weighting.names:  # the one place a loss weighting is applied
                terms["mse"] = terms["mse"] * self._loss_weight(name, t)
            if mse_weights is not None:
                terms["mse"] = terms["mse"] * mse_weights
            if "vb" in terms:
                terms["loss"] = terms["mse"] + terms["vb"]
            else:
                terms["loss"] = terms["mse"]
        else:
            raise NotImplementedError(self.loss_type)
        return terms

    def _prior_bpd(self, x_start):
        """
        KL(q(x_T | x_0) || N(0, I)) in bits per dimension, shape [N].

        It depends only on the fixed forward process, so it cannot be trained.
        """
        t = torch.full(
            (x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device
        )
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def heldout_loss_terms(self, model, x_start, t, noise, model_kwargs=None):
        """
        Unweighted loss terms of one model call at given (x_0, t, noise), for
        held-out curves that compare runs trained with different objectives
        or loss weightings (training_losses applies the run's own).

        :param model: callable model(x_t, t, **model_kwargs).
        :param x_start: the [N x C x ...] tensor of clean inputs.
        :param t: 1-D tensor of timestep indices.
        :param noise: the Gaussian noise that makes x_t (same shape as x_start).
        :param model_kwargs: optional dict of extra model arguments.
        :return: a dict of shape-[N] tensors:
                 - 'eps_mse': float64 MSE between `noise` and the noise the
                   model's output implies (whatever it predicts);
                 - 'vb': the variational-bound term L_t in bits/dim (the
                   decoder NLL at t == 0), unclipped x_0 prediction;
                 - 'prior_bpd': KL(q(x_T | x_0) || N(0, I)) in bits/dim, so
                   that T * mean(vb) + mean(prior_bpd) estimates the bound.
        """
        if model_kwargs is None:
            model_kwargs = {}
        x_t = self.q_sample(x_start, t, noise=noise)
        output = _to_fp32(model(x_t, self._scale_timesteps(t), **model_kwargs))
        mean_output = output[:, : x_start.shape[1]]
        if self.model_mean_type == ModelMeanType.EPSILON:
            eps = mean_output
        elif self.model_mean_type == ModelMeanType.START_X:
            eps = self._predict_eps_from_xstart(x_t, t, mean_output)
        else:
            pred_xstart = self._predict_xstart_from_xprev(x_t, t, mean_output)
            eps = self._predict_eps_from_xstart(x_t, t, pred_xstart)
        p_out = self._p_mean_variance_from_output(output, x_t, t, clip_denoised=False)
        return {
            "eps_mse": mean_flat((eps.double() - noise.double()) ** 2),
            "vb": self._vb_terms_from_p(p_out, x_start, x_t, t)["output"],
            "prior_bpd": self._prior_bpd(x_start),
        }

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """
        The whole variational bound in bits per dimension, with per-step terms.

        :param model: the model to evaluate.
        :param x_start: the [N x C x ...] tensor of inputs in [-1, 1].
        :param clip_denoised: if True, clamp x_0 predictions to [-1, 1].
        :param model_kwargs: optional dict of extra model arguments.
        :return: a dict with
                 - 'total_bpd': [N], the bound: prior_bpd + vb.sum(1);
                 - 'prior_bpd': [N], the prior term;
                 - 'vb': [N x T], the per-step terms;
                 - 'xstart_mse': [N x T], MSE of the x_0 predictions;
                 - 'mse': [N x T], MSE of the implied epsilon predictions.
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((batch_size,), i, dtype=torch.long, device=device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = torch.stack(vb, dim=1)
        xstart_mse = torch.stack(xstart_mse, dim=1)
        mse = torch.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


def _resolve_device(model, noise, device):
    if device is not None:
        return device
    if noise is not None:
        return noise.device
    params = getattr(model, "parameters", None)
    if params is not None:
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _last_sample(steps):
    """The 'sample' of the last dict a progressive sampling loop yields."""
    out = None
    for out in steps:
        pass
    return out["sample"]


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """
    Gather values of a 1-D array at a batch of timesteps, as float32, and
    broadcast them to broadcast_shape ([N, 1, ...] expanded).

    :param arr: a 1-D numpy array or tensor (float64 for exact gathers).
    :param timesteps: a tensor of indices into arr.
    :param broadcast_shape: a shape whose first dimension is the batch size.
    :return: a float32 tensor of shape broadcast_shape.
    """
    if isinstance(arr, np.ndarray):
        arr = torch.from_numpy(arr)
    res = arr.to(device=timesteps.device)[timesteps].float()
    while res.dim() < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)
