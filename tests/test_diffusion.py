"""
GaussianDiffusion and the likelihood terms against independent float64
recomputations written here from the formulas (Ho et al. 2020; Nichol &
Dhariwal 2021), not from the package's code.
"""

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from improved_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from improved_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)

LN2 = math.log(2.0)


# --------------------------------------------------------------- reference


def ref_cosine_alpha_bar(s):
    return np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2


def ref_betas(name, T):
    if name == "linear":
        return np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    s = np.arange(T + 1) / T
    f = ref_cosine_alpha_bar(s)
    return np.minimum(1 - f[1:] / f[:-1], 0.999)


class Ref:
    """Float64 quantities of a diffusion process, from the DDPM formulas."""

    def __init__(self, betas):
        self.T = len(betas)
        self.beta = np.asarray(betas, dtype=np.float64)
        self.alpha = 1 - self.beta
        self.abar = np.cumprod(self.alpha)
        self.abar_prev = np.concatenate([[1.0], self.abar[:-1]])
        # q(x_{t-1} | x_t, x_0), DDPM Eq. 7
        self.post_var = self.beta * (1 - self.abar_prev) / (1 - self.abar)
        self.post_logvar_clipped = np.log(np.concatenate([[self.post_var[1]], self.post_var[1:]]))
        self.c1 = np.sqrt(self.abar_prev) * self.beta / (1 - self.abar)
        self.c2 = np.sqrt(self.alpha) * (1 - self.abar_prev) / (1 - self.abar)

    def col(self, arr, t, ndim):
        return torch.from_numpy(arr[t.numpy()]).view(-1, *([1] * (ndim - 1)))


def ref_approx_cdf(x):
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_decoder_logp(x, mean, log_scale):
    """Discretised Gaussian, tanh CDF, edge bins open, float64."""
    hi = ref_approx_cdf((x - mean + 1 / 255) / torch.exp(log_scale))
    lo = ref_approx_cdf((x - mean - 1 / 255) / torch.exp(log_scale))
    mid = torch.log(torch.clamp(hi - lo, min=1e-12))
    left = torch.log(torch.clamp(hi, min=1e-12))
    right = torch.log(torch.clamp(1 - lo, min=1e-12))
    return torch.where(x < -0.999, left, torch.where(x > 0.999, right, mid))


def ref_kl(m1, lv1, m2, lv2):
    s1, s2 = torch.exp(0.5 * lv1), torch.exp(0.5 * lv2)
    return torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def flat_mean(x):
    return x.reshape(x.shape[0], -1).mean(1)


def ref_training_losses(ref, mean_type, var_type, loss_type, model, x0, t, noise, gamma=0.0):
    """The losses of training_losses, recomputed in float64."""
    x0, noise = x0.double(), noise.double()
    nd = x0.dim()
    ab = ref.col(ref.abar, t, nd)
    x_t = torch.sqrt(ab) * x0 + torch.sqrt(1 - ab) * noise
    out = model(x_t, t).double()
    C = x0.shape[1]
    learned = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    mean_out, v = (out[:, :C], out[:, C:]) if learned else (out, None)

    if var_type == ModelVarType.FIXED_SMALL:
        logvar = ref.col(ref.post_logvar_clipped, t, nd).expand_as(x0)
    elif var_type == ModelVarType.FIXED_LARGE:
        large = np.concatenate([[ref.post_var[1]], ref.beta[1:]])
        logvar = ref.col(np.log(large), t, nd).expand_as(x0)
    elif var_type == ModelVarType.LEARNED:
        logvar = v
    else:
        frac = (v + 1) / 2
        logvar = frac * ref.col(np.log(ref.beta), t, nd) + (1 - frac) * ref.col(
            ref.post_logvar_clipped, t, nd
        )

    def post_mean(x_start):
        return ref.col(ref.c1, t, nd) * x_start + ref.col(ref.c2, t, nd) * x_t

    def vb(mean_pred):
        true_mean = post_mean(x0)
        true_logvar = ref.col(ref.post_logvar_clipped, t, nd)
        kl = flat_mean(ref_kl(true_mean, true_logvar, mean_pred, logvar)) / LN2
        nll = -flat_mean(ref_decoder_logp(x0, mean_pred, 0.5 * logvar)) / LN2
        return torch.where(t == 0, nll, kl)

    if mean_type == ModelMeanType.EPSILON:
        model_mean = post_mean((x_t - torch.sqrt(1 - ab) * mean_out) / torch.sqrt(ab))
        target = noise
    elif mean_type == ModelMeanType.START_X:
        model_mean = post_mean(mean_out)
        target = x0
    else:
        model_mean = mean_out
        target = post_mean(x0)

    res = {}
    if loss_type in (LossType.KL, LossType.RESCALED_KL):
        res["loss"] = vb(model_mean) * (ref.T if loss_type == LossType.RESCALED_KL else 1)
        return res
    mse = flat_mean((target - mean_out) ** 2)
    if gamma > 0:
        snr = torch.from_numpy(ref.abar[t.numpy()] / (1 - ref.abar[t.numpy()]))
        w = torch.clamp(snr, max=gamma)
        if mean_type == ModelMeanType.EPSILON:
            w = w / snr
        mse = mse * w
    res["mse"] = mse
    res["loss"] = mse
    if learned:
        res["vb"] = vb(model_mean) * (ref.T / 1000 if loss_type == LossType.RESCALED_MSE else 1)
        res["loss"] = mse + res["vb"]
    return res


class TinyModel(torch.nn.Module):
    """
    A deterministic 1x1-conv 'denoiser' with a timestep-dependent bias.

    Its mean channels stay close to the identity, so that at small t its
    predictions are near the data and the decoder term is not evaluated deep
    in a Gaussian tail (where float32 CDF differences cancel).
    """

    def __init__(self, channels=3, out_channels=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = 0.3 * torch.randn(out_channels, channels, generator=g)
        w[:channels] = torch.eye(channels) + 0.05 * torch.randn(channels, channels, generator=g)
        self.weight = torch.nn.Parameter(w)
        self.bias = torch.nn.Parameter(torch.randn(out_channels, generator=g) * 0.02)
        self.seen_t = []

    def forward(self, x, t, y=None):
        self.seen_t.append(t.detach().clone())
        out = torch.einsum("oc,nchw->nohw", self.weight.to(x.dtype), x)
        tt = t.to(x.dtype).view(-1, 1, 1, 1)
        out = out + self.bias.to(x.dtype).view(1, -1, 1, 1) * torch.cos(0.05 * tt)
        if y is not None:
            out = out + 0.01 * y.to(x.dtype).view(-1, 1, 1, 1)
        return out


def make_diffusion(T=50, schedule="cosine", mean=ModelMeanType.EPSILON,
                   var=ModelVarType.FIXED_SMALL, loss=LossType.MSE, **kw):
    return GaussianDiffusion(
        betas=get_named_beta_schedule(schedule, T),
        model_mean_type=mean,
        model_var_type=var,
        loss_type=loss,
        **kw,
    )


def image_batch(n=6, c=3, h=4, w=4, seed=1):
    """Data on the 8-bit grid in [-1, 1], including both edge levels."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (n, c, h, w), generator=g)
    levels[0, 0, 0, 0], levels[0, 0, 0, 1] = 0, 255
    return levels.float() / 127.5 - 1


# ------------------------------------------------------------- schedules


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_linear_betas_closed_form(T):
    betas = get_named_beta_schedule("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas, ref_betas("linear", T), rtol=1e-13, atol=0)


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_cosine_betas_closed_form(T):
    betas = get_named_beta_schedule("cosine", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas, ref_betas("cosine", T), rtol=1e-9, atol=1e-15)
    assert betas.max() <= 0.999
    # alpha_bar at the end of each step follows the continuous schedule
    abar = np.cumprod(1 - betas)
    s = np.arange(1, T + 1) / T
    target = ref_cosine_alpha_bar(s) / ref_cosine_alpha_bar(0.0)
    ok = betas < 0.999  # the clipped last step(s) leave the curve on purpose
    np.testing.assert_allclose(abar[ok], target[ok], rtol=1e-8)


def test_unknown_schedule_is_value_error():
    with pytest.raises(ValueError, match="noise_schedule") as info:
        get_named_beta_schedule("quadratic", 10)
    assert "linear" in str(info.value) and "cosine" in str(info.value)


# ------------------------------------------------------- forward process


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_mean_variance_analytic(schedule):
    diff = make_diffusion(T=100, schedule=schedule)
    ref = Ref(ref_betas(schedule, 100))
    x0 = image_batch()
    t = torch.tensor([0, 1, 10, 50, 98, 99])
    mean, var, logvar = diff.q_mean_variance(x0, t)
    ab = ref.col(ref.abar, t, 4)
    torch.testing.assert_close(mean.double(), torch.sqrt(ab) * x0.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var.double(), (1 - ab).expand_as(x0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        logvar.double(), torch.log(1 - ab).expand_as(x0), rtol=1e-6, atol=1e-6
    )


def test_q_sample_matches_given_noise_and_empirical_moments():
    diff = make_diffusion(T=100, schedule="linear")
    ref = Ref(ref_betas("linear", 100))
    x0 = image_batch(n=4)
    t = torch.tensor([0, 20, 60, 99])
    noise = torch.randn_like(x0)
    ab = ref.col(ref.abar, t, 4)
    expect = torch.sqrt(ab) * x0.double() + torch.sqrt(1 - ab) * noise.double()
    got = diff.q_sample(x0, t, noise=noise).double()
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)

    torch.manual_seed(0)
    n = 20000
    xs = diff.q_sample(x0.repeat(n, 1, 1, 1), t.repeat(n)).view(n, *x0.shape).double()
    emp_mean, emp_var = xs.mean(0), xs.var(0)
    se_mean = torch.sqrt((1 - ab) / n)
    assert ((emp_mean - torch.sqrt(ab) * x0.double()).abs() < 5 * se_mean).all()
    # var of a sample variance: 2 sigma^4 / (n - 1)
    se_var = (1 - ab) * math.sqrt(2 / (n - 1))
    assert ((emp_var - (1 - ab)).abs() < 5 * se_var).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_by_completing_the_square(schedule):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), for t >= 1."""
    T = 200
    diff = make_diffusion(T=T, schedule=schedule)
    b = ref_betas(schedule, T)
    abar = np.cumprod(1 - b)
    t = np.arange(1, T)
    precision = (1 - b[t]) / b[t] + 1 / (1 - abar[t - 1])
    var = 1 / precision
    coef_x0 = var * np.sqrt(abar[t - 1]) / (1 - abar[t - 1])
    coef_xt = var * np.sqrt(1 - b[t]) / b[t]
    np.testing.assert_allclose(diff.posterior_variance[1:], var, rtol=1e-9)
    np.testing.assert_allclose(diff.posterior_mean_coef1[1:], coef_x0, rtol=1e-9)
    np.testing.assert_allclose(diff.posterior_mean_coef2[1:], coef_xt, rtol=1e-9)
    # t = 0: the posterior collapses on x_0; its log-variance is clipped
    assert diff.posterior_variance[0] == 0.0
    assert diff.posterior_mean_coef1[0] == pytest.approx(1.0, abs=1e-12)
    assert diff.posterior_mean_coef2[0] == 0.0
    np.testing.assert_allclose(diff.posterior_log_variance_clipped[0], np.log(var[0]), rtol=1e-12)

    x0, xt = image_batch(n=3), torch.randn(3, 3, 4, 4)
    tt = torch.tensor([0, 5, 150])
    mean, v, lv = diff.q_posterior_mean_variance(x0, xt, tt)
    c1 = torch.tensor([1.0, coef_x0[4], coef_x0[149]]).view(-1, 1, 1, 1)
    c2 = torch.tensor([0.0, coef_xt[4], coef_xt[149]]).view(-1, 1, 1, 1)
    want = c1 * x0.double() + c2 * xt.double()
    torch.testing.assert_close(mean.double(), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ likelihoods


def test_normal_kl_closed_form_and_scalars():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        normal_kl(m1, lv1, m2, lv2), ref_kl(m1, lv1, m2, lv2), rtol=1e-12, atol=1e-12
    )
    # scalars broadcast against tensors (the prior term uses N(0, 1))
    zero = torch.zeros(()).double()
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), ref_kl(m1, lv1, zero, zero))
    assert torch.all(normal_kl(m1, lv1, m1, lv1).abs() < 1e-12)


def test_normal_kl_monte_carlo():
    m1, s1, m2, s2 = 0.3, 0.7, -0.2, 1.3
    torch.manual_seed(0)
    x = m1 + s1 * torch.randn(400000, dtype=torch.float64)
    log_q1 = -0.5 * ((x - m1) / s1) ** 2 - math.log(s1)
    log_q2 = -0.5 * ((x - m2) / s2) ** 2 - math.log(s2)
    diff = log_q1 - log_q2
    mc, se = diff.mean().item(), diff.std().item() / math.sqrt(len(x))
    kl = normal_kl(torch.tensor(m1), torch.tensor(2 * math.log(s1)), m2, 2 * math.log(s2)).item()
    assert abs(kl - mc) < 4 * se


def test_approx_cdf_close_to_erf():
    x = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    err = (approx_standard_normal_cdf(x) - torch.from_numpy(ndtr(x.numpy()))).abs().max()
    assert err < 2e-4


def _exact_bin_prob(x, mean, std):
    """Exact normal mass of the pixel's bin, edge bins open, via erf."""
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    lo = -math.inf if x < -0.999 else (x - 1 / 255 - mean) / std
    hi = math.inf if x > 0.999 else (x + 1 / 255 - mean) / std
    return (1.0 if hi == math.inf else cdf(hi)) - (0.0 if lo == -math.inf else cdf(lo))


def test_discretized_gaussian_vs_erf_interior_and_edges():
    g = torch.Generator().manual_seed(3)
    levels = torch.tensor([0, 0, 1, 17, 127, 128, 200, 254, 255, 255] * 3)
    x = levels.double() / 127.5 - 1
    means = x + 0.05 * torch.randn(len(x), generator=g, dtype=torch.float64)
    log_scales = torch.tensor([-3.0, -2.0, -1.0] * 10, dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    exact = torch.tensor(
        [
            _exact_bin_prob(a, m, math.exp(s))
            for a, m, s in zip(x.tolist(), means.tolist(), log_scales.tolist())
        ],
        dtype=torch.float64,
    )
    # tanh CDF: each CDF is within 1.8e-4 of erf's, so a bin mass within 3.6e-4
    assert (logp.exp() - exact).abs().max() < 4e-4
    # edge bins really are open: a mean far outside [-1, 1] keeps the mass
    far = discretized_gaussian_log_likelihood(
        torch.tensor([-1.0, 1.0]),
        means=torch.tensor([-3.0, 3.0]),
        log_scales=torch.tensor([-1.0, -1.0]),
    )
    assert torch.all(far > -1e-6)
    # empty bins hit the 1e-12 floor, not -inf
    empty = discretized_gaussian_log_likelihood(
        torch.tensor([0.0]), means=torch.tensor([0.9]), log_scales=torch.tensor([-6.0])
    )
    assert empty.item() == pytest.approx(math.log(1e-12), rel=1e-5)


def test_discretized_gaussian_float32_vs_float64_formula():
    x = image_batch(n=8)
    g = torch.Generator().manual_seed(4)
    means = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1.2, 1.2)
    log_scales = -2 + 0.5 * torch.randn(x.shape, generator=g)
    got = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert got.dtype == torch.float32
    want = ref_decoder_logp(x.double(), means.double(), log_scales.double())
    # Far in the tails float32 CDF differences cancel (as in the original);
    # compare where the bin holds a non-negligible mass.
    ok = want > math.log(1e-3)
    assert ok.float().mean() > 0.9
    torch.testing.assert_close(got.double()[ok], want[ok], rtol=2e-4, atol=2e-4)


# ---------------------------------------------------------------- training

ALL_LOSSES = list(LossType)
ALL_VARS = list(ModelVarType)
ALL_MEANS = list(ModelMeanType)


@pytest.mark.parametrize("loss_type", ALL_LOSSES, ids=lambda e: e.name)
@pytest.mark.parametrize("var_type", ALL_VARS, ids=lambda e: e.name)
@pytest.mark.parametrize("mean_type", ALL_MEANS, ids=lambda e: e.name)
def test_training_losses_match_float64_reference(loss_type, var_type, mean_type):
    T = 50
    diff = make_diffusion(T=T, schedule="cosine", mean=mean_type, var=var_type, loss=loss_type)
    ref = Ref(ref_betas("cosine", T))
    learned = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    model = TinyModel(out_channels=6 if learned else 3)
    x0 = image_batch(n=6)
    t = torch.tensor([0, 1, 7, 25, 48, 49])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))

    got = diff.training_losses(model, x0, t, noise=noise)
    want = ref_training_losses(ref, mean_type, var_type, loss_type, model, x0, t, noise)
    if loss_type.is_vb():
        assert set(got) == {"loss"}
    else:
        assert set(got) == ({"loss", "mse", "vb"} if learned else {"loss", "mse"})
    for key in want:
        assert got[key].shape == (6,) and got[key].dtype == torch.float32
        torch.testing.assert_close(
            got[key].double(), want[key].detach(), rtol=1e-4, atol=1e-5, msg=key
        )


def test_hybrid_loss_vb_gives_no_gradient_to_the_mean():
    diff = make_diffusion(var=ModelVarType.LEARNED_RANGE, loss=LossType.RESCALED_MSE)
    x0 = image_batch(n=4)
    t = torch.tensor([0, 3, 20, 49])
    out = torch.nn.Parameter(0.5 * torch.randn(4, 6, 4, 4))
    model = lambda x, ts: out  # noqa: E731
    terms = diff.training_losses(model, x0, t)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert torch.all(grad_vb[:, :3] == 0)
    assert grad_vb[:, 3:].abs().sum() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.all(grad_mse[:, 3:] == 0) and grad_mse[:, :3].abs().sum() > 0


def test_training_losses_float32_under_bf16_output():
    diff = make_diffusion(var=ModelVarType.LEARNED_RANGE, loss=LossType.RESCALED_MSE)
    model32 = TinyModel(out_channels=6)
    model16 = lambda x, ts: model32(x, ts).to(torch.bfloat16)  # noqa: E731
    x0, t = image_batch(n=4), torch.tensor([0, 3, 20, 49])
    noise = torch.randn_like(x0)
    got = diff.training_losses(model16, x0, t, noise=noise)
    cast = lambda x, ts: model16(x, ts).float()  # noqa: E731
    want = diff.training_losses(cast, x0, t, noise=noise)
    for k in ("loss", "mse", "vb"):
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_rescale_timesteps_feeds_scaled_t():
    T = 40
    x0, t = image_batch(n=3), torch.tensor([0, 10, 39])
    for rescale, expect in [(False, t), (True, t.float() * 1000 / T)]:
        model = TinyModel()
        diff = make_diffusion(T=T, rescale_timesteps=rescale)
        diff.training_losses(model, x0, t)
        diff.p_mean_variance(model, x0, t)
        for seen in model.seen_t:
            torch.testing.assert_close(seen, expect)


def test_model_kwargs_reach_the_model():
    diff = make_diffusion()
    x0, t = image_batch(n=3), torch.tensor([1, 2, 3])
    noise = torch.randn_like(x0)
    a, b = (
        diff.training_losses(TinyModel(), x0, t, noise=noise, model_kwargs={"y": torch.tensor(y)})
        for y in ([0, 1, 2], [5, 6, 7])
    )
    assert not torch.allclose(a["loss"], b["loss"])


# ------------------------------------------------------------- Min-SNR

SNR_MEANS = [ModelMeanType.EPSILON, ModelMeanType.START_X]


@pytest.mark.parametrize("schedule,T", [("cosine", 4000), ("linear", 1000)])
@pytest.mark.parametrize("mean_type", SNR_MEANS, ids=lambda e: e.name)
def test_min_snr_weights_closed_form(schedule, T, mean_type):
    gamma = 5.0
    diff = make_diffusion(T=T, schedule=schedule, mean=mean_type, min_snr_gamma=gamma)
    abar = np.cumprod(1 - ref_betas(schedule, T))
    snr = abar / (1 - abar)
    want = np.minimum(snr, gamma)
    if mean_type == ModelMeanType.EPSILON:
        want = want / snr
    t = torch.arange(T)
    got = diff.min_snr_weights(t)
    assert got.shape == (T,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6)
    if mean_type == ModelMeanType.EPSILON:
        assert got.max() <= 1.0 and got[-1] == 1.0 and got[0] < 1e-3


@pytest.mark.parametrize(
    "var_type", [ModelVarType.FIXED_SMALL, ModelVarType.LEARNED_RANGE], ids=lambda e: e.name
)
@pytest.mark.parametrize("mean_type", SNR_MEANS, ids=lambda e: e.name)
def test_min_snr_losses(var_type, mean_type):
    T, gamma = 50, 2.0
    learned = var_type == ModelVarType.LEARNED_RANGE
    model = TinyModel(out_channels=6 if learned else 3)
    x0, t = image_batch(n=6), torch.tensor([0, 1, 7, 25, 48, 49])
    noise = torch.randn_like(x0)
    kw = dict(T=T, mean=mean_type, var=var_type, loss=LossType.RESCALED_MSE)
    plain = make_diffusion(**kw).training_losses(model, x0, t, noise=noise)
    off = make_diffusion(min_snr_gamma=0.0, **kw).training_losses(model, x0, t, noise=noise)
    on = make_diffusion(min_snr_gamma=gamma, **kw).training_losses(model, x0, t, noise=noise)
    for k in plain:  # gamma = 0 changes nothing
        torch.testing.assert_close(off[k], plain[k], rtol=0, atol=0)
    ref = Ref(ref_betas("cosine", T))
    want = ref_training_losses(
        ref, mean_type, var_type, LossType.RESCALED_MSE, model, x0, t, noise, gamma=gamma
    )
    torch.testing.assert_close(on["mse"].double(), want["mse"].detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(on["loss"].double(), want["loss"].detach(), rtol=1e-4, atol=1e-5)
    if learned:  # vb is added unweighted
        torch.testing.assert_close(on["vb"], plain["vb"], rtol=0, atol=0)


def test_min_snr_validation():
    with pytest.raises(ValueError, match="PREVIOUS_X"):
        make_diffusion(mean=ModelMeanType.PREVIOUS_X, min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        make_diffusion(min_snr_gamma=-1.0)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        make_diffusion(loss=LossType.RESCALED_KL, min_snr_gamma=5.0)
    # off: ones for any mean type
    d = make_diffusion(mean=ModelMeanType.PREVIOUS_X)
    assert torch.all(d.min_snr_weights(torch.tensor([0, 5])) == 1)


# ------------------------------------------------------------- sampling


def _counting_randn(seed):
    """A seeded noise source that counts its draws."""
    gen = torch.Generator().manual_seed(seed)
    calls = []

    def randn_like(x):
        calls.append(tuple(x.shape))
        return torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)

    return randn_like, calls


def test_p_sample_step_formula():
    """sample = mean + exp(logvar / 2) * noise, and no noise at t == 0."""
    diff = make_diffusion(var=ModelVarType.FIXED_LARGE)
    x = torch.randn(2, 3, 4, 4)
    model = TinyModel()
    fixed = torch.randn_like(x)
    for tval in (0, 10):
        t = torch.full((2,), tval)
        pmv = diff.p_mean_variance(model, x, t)
        out = diff.p_sample(model, x, t, randn_like=lambda a: fixed)
        scale = 0.0 if tval == 0 else 1.0
        std = torch.exp(0.5 * pmv["log_variance"])
        torch.testing.assert_close(out["sample"], pmv["mean"] + scale * std * fixed)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_sampling_loops_shape_finite_and_randn_like(loop):
    T = 20
    diff = make_diffusion(T=T, var=ModelVarType.LEARNED_RANGE)
    model = TinyModel(out_channels=6)
    shape = (2, 3, 4, 4)
    kwargs = {"eta": 0.5} if loop == "ddim_sample_loop" else {}
    run = getattr(diff, loop)

    rl, calls = _counting_randn(7)
    a = run(model, shape, randn_like=rl, **kwargs)
    assert a.shape == shape and torch.isfinite(a).all()
    assert len(calls) == T + 1 and all(c == shape for c in calls)  # x_T, then each step
    rl2, _ = _counting_randn(7)
    torch.testing.assert_close(run(model, shape, randn_like=rl2, **kwargs), a, rtol=0, atol=0)
    rl3, _ = _counting_randn(8)
    assert not torch.allclose(run(model, shape, randn_like=rl3, **kwargs), a)
    # the global RNG is not touched when a noise source is given
    torch.manual_seed(0)
    state = torch.get_rng_state()
    run(model, shape, randn_like=_counting_randn(7)[0], **kwargs)
    assert torch.equal(state, torch.get_rng_state())
    # default path uses the global RNG and is reproducible from its seed
    torch.manual_seed(11)
    b1 = run(model, shape, **kwargs)
    torch.manual_seed(11)
    torch.testing.assert_close(run(model, shape, **kwargs), b1, rtol=0, atol=0)


def test_ddim_eta0_is_deterministic():
    T = 20
    diff = make_diffusion(T=T)
    model = TinyModel()
    noise = torch.randn(2, 3, 4, 4)
    rl, calls = _counting_randn(0)
    a = diff.ddim_sample_loop(model, noise.shape, noise=noise, randn_like=rl)
    assert calls == []  # no randomness after x_T
    torch.manual_seed(123)
    b = diff.ddim_sample_loop(model, noise.shape, noise=noise)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # progressive yields every step, ending with the same sample
    steps = list(diff.ddim_sample_loop_progressive(model, noise.shape, noise=noise))
    assert len(steps) == T
    torch.testing.assert_close(steps[-1]["sample"], a, rtol=0, atol=0)


def test_ddim_step_matches_formula_and_reverse_inverts():
    T = 30
    diff = make_diffusion(T=T, schedule="linear")
    ref = Ref(ref_betas("linear", T))
    model = TinyModel()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([10, 10])
    out = diff.ddim_sample(model, x, t, clip_denoised=False)
    ab, abp = ref.abar[10], ref.abar_prev[10]
    eps = model(x, t).double()
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    want = math.sqrt(abp) * x0 + math.sqrt(1 - abp) * eps
    torch.testing.assert_close(out["sample"], want, rtol=1e-5, atol=1e-6)
    # the reverse ODE step goes to t + 1 with the same eps
    rev = diff.ddim_reverse_sample(model, x, t, clip_denoised=False)
    abn = ref.abar[11]
    want = math.sqrt(abn) * x0 + math.sqrt(1 - abn) * eps
    torch.testing.assert_close(rev["sample"], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        diff.ddim_reverse_sample(model, x, t, eta=0.5)


def test_cond_fn_shifts_mean_by_variance_times_gradient():
    diff = make_diffusion(var=ModelVarType.FIXED_LARGE)
    model = TinyModel()
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([5, 5])
    grad = torch.randn_like(x)
    fixed = torch.randn_like(x)
    base = diff.p_sample(model, x, t, randn_like=lambda a: fixed)
    guided = diff.p_sample(model, x, t, cond_fn=lambda a, ts: grad, randn_like=lambda a: fixed)
    var = diff.p_mean_variance(model, x, t)["variance"]
    torch.testing.assert_close(guided["sample"] - base["sample"], var * grad, rtol=1e-5, atol=1e-6)


class StepRecorder(TinyModel):
    """TinyModel that also records its input and whether autograd was on."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen_x, self.grad_on = [], []

    def forward(self, x, t, y=None):
        self.seen_x.append(x.clone())
        self.grad_on.append(torch.is_grad_enabled())
        return super().forward(x, t, y)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_progressive_loop_feeds_each_sample_to_the_next_step(loop):
    """x_T first, then every step's 'sample' is the next step's input, for t = T-1 .. 0;
    the plain loop returns the last sample; autograd is off in the step and in the caller."""
    T = 12
    diff = make_diffusion(T=T, var=ModelVarType.LEARNED_RANGE)
    model = StepRecorder(out_channels=6)
    noise = torch.randn(2, 3, 4, 4)
    kwargs = {"eta": 0.5} if loop == "ddim_sample_loop" else {}
    rl, _ = _counting_randn(3)
    steps = []
    for out in getattr(diff, loop + "_progressive")(model, noise.shape, noise=noise, randn_like=rl, **kwargs):
        assert not torch.is_grad_enabled()
        steps.append(out)
    assert torch.is_grad_enabled()
    assert len(steps) == T and not any(model.grad_on)
    assert [int(t[0]) for t in model.seen_t] == list(range(T - 1, -1, -1))
    assert torch.equal(model.seen_x[0], noise)
    for k in range(T - 1):
        assert torch.equal(model.seen_x[k + 1], steps[k]["sample"])
    rl, _ = _counting_randn(3)
    final = getattr(diff, loop)(model, noise.shape, noise=noise, randn_like=rl, **kwargs)
    assert torch.equal(final, steps[-1]["sample"])
    with pytest.raises(TypeError, match="shape must be a tuple"):
        getattr(diff, loop)(model, 4)


@pytest.mark.parametrize("mean_type", ALL_MEANS, ids=lambda e: e.name)
def test_heldout_loss_terms_match_float64_reference(mean_type):
    """Noise MSE of the implied noise, L_t and the prior, unweighted even when the run is."""
    T = 50
    kw = {"min_snr_gamma": 5.0} if mean_type != ModelMeanType.PREVIOUS_X else {}
    diff = make_diffusion(T=T, mean=mean_type, var=ModelVarType.LEARNED_RANGE, **kw)
    ref = Ref(ref_betas("cosine", T))
    model = TinyModel(out_channels=6)
    x0 = image_batch(n=6)
    t = torch.tensor([0, 1, 7, 25, 48, 49])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    got = diff.heldout_loss_terms(model, x0, t, noise)
    assert got["eps_mse"].dtype == torch.float64

    want = ref_training_losses(ref, mean_type, ModelVarType.LEARNED_RANGE, LossType.MSE, model, x0, t, noise)
    torch.testing.assert_close(got["vb"].double(), want["vb"].detach(), rtol=1e-4, atol=1e-5)
    ab = ref.col(ref.abar, t, 4)
    x_t = torch.sqrt(ab) * x0.double() + torch.sqrt(1 - ab) * noise.double()
    out = model(x_t.float(), t).double()[:, :3]
    if mean_type == ModelMeanType.EPSILON:
        eps = out
    else:
        x0_pred = out if mean_type == ModelMeanType.START_X else (
            (out - ref.col(ref.c2, t, 4) * x_t) / ref.col(ref.c1, t, 4))
        eps = (x_t - torch.sqrt(ab) * x0_pred) / torch.sqrt(1 - ab)
    torch.testing.assert_close(got["eps_mse"], flat_mean((eps - noise.double()) ** 2), rtol=1e-4, atol=1e-5)
    prior = diff.calc_bpd_loop(model, x0)["prior_bpd"]
    torch.testing.assert_close(got["prior_bpd"], prior, rtol=0, atol=0)


def test_calc_bpd_loop_total_is_prior_plus_terms():
    T = 10
    diff = make_diffusion(T=T, var=ModelVarType.LEARNED_RANGE)
    x0 = image_batch(n=3)
    torch.manual_seed(0)
    out = diff.calc_bpd_loop(TinyModel(out_channels=6), x0)
    for k in ("vb", "xstart_mse", "mse"):
        assert out[k].shape == (3, T) and torch.isfinite(out[k]).all()
    assert torch.all(out["vb"] >= 0)
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb"].sum(1))
    # prior term: KL(N(sqrt(abar) x0, 1 - abar) || N(0, 1)) in bits
    ab = Ref(ref_betas("cosine", T)).abar[-1]
    prior = ref_kl(math.sqrt(ab) * x0.double(), torch.tensor(math.log(1 - ab)).double(),
                   torch.zeros(()).double(), torch.zeros(()).double())
    torch.testing.assert_close(
        out["prior_bpd"].double(), flat_mean(prior) / LN2, rtol=1e-4, atol=1e-7
    )
