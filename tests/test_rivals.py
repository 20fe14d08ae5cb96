"""
The rival methods of the study (P2 weighting, SpeeD, log-normal timestep sampling) against
independent float64 computations, and their options end to end (--help, config, sampler).
"""

import math

import numpy as np
import pytest
import torch

from improved_diffusion.options import config
from improved_diffusion.run import training
from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.methods.lognormal import LogitNormalSampler
from improved_diffusion.methods.speed import SpeeDSampler
from improved_diffusion.resample import create_named_schedule_sampler
from improved_diffusion.script_util import create_gaussian_diffusion


def cosine_alpha_bar(T):
    """alpha_bar_t of the cosine schedule from its definition (betas clipped at 0.999)."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    out, prod = [], 1.0
    for i in range(T):
        beta = min(1 - f((i + 1) / T) / f(i / T), 0.999)
        prod *= 1 - beta
        out.append(prod)
    return np.array(out, dtype=np.float64)


def gradient(f):
    """numpy.gradient with unit spacing, written out: central inside, one-sided at the ends."""
    g = [f[1] - f[0]]
    g += [(f[i + 1] - f[i - 1]) / 2 for i in range(1, len(f) - 1)]
    g.append(f[-1] - f[-2])
    return np.array(g)


def fixed_model(x, t):
    """A deterministic 'model' that depends on x and t."""
    return torch.tanh(x * 0.7 + t.float().view(-1, 1, 1, 1) * 0.01)


# ------------------------------------------------------------------------------ P2


@pytest.mark.parametrize("gamma,k", [(1.0, 1.0), (0.5, 1.0), (1.0, 5.0)])
@pytest.mark.parametrize("predict_xstart", [False, True])
def test_p2_weights_multiply_the_mse_term(gamma, k, predict_xstart):
    T = 100
    plain = create_gaussian_diffusion(steps=T, noise_schedule="cosine", predict_xstart=predict_xstart)
    p2 = create_gaussian_diffusion(steps=T, noise_schedule="cosine", predict_xstart=predict_xstart,
                                   p2_gamma=gamma, p2_k=k)
    abar = cosine_alpha_bar(T)
    ref = 1.0 / (k + abar / (1 - abar)) ** gamma  # Choi et al.: 1 / (k + SNR)^gamma, no normalisation
    t = torch.tensor([0, 1, 10, 50, 99, 75])
    np.testing.assert_allclose(p2.p2_weights(t).numpy(), ref[t.numpy()], rtol=1e-6)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=gen)
    a = plain.training_losses(fixed_model, x, t, noise=noise)
    b = p2.training_losses(fixed_model, x, t, noise=noise)
    expected = a["mse"].double().numpy() * ref[t.numpy()]
    np.testing.assert_allclose(b["mse"].double().numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(b["loss"].numpy(), b["mse"].numpy())


def test_p2_off_is_identical_and_composes_with_min_snr():
    T = 50
    t = torch.arange(0, T, 7)
    x = torch.linspace(-1, 1, len(t) * 3 * 16).view(len(t), 3, 4, 4)
    noise = torch.cos(torch.arange(x.numel()).float()).view_as(x)
    plain = create_gaussian_diffusion(steps=T, noise_schedule="cosine")
    off = create_gaussian_diffusion(steps=T, noise_schedule="cosine", p2_gamma=0.0, p2_k=3.0)
    assert torch.equal(plain.training_losses(fixed_model, x, t, noise=noise)["loss"],
                       off.training_losses(fixed_model, x, t, noise=noise)["loss"])
    both = create_gaussian_diffusion(steps=T, noise_schedule="cosine", p2_gamma=1.0, min_snr_gamma=5.0)
    abar = cosine_alpha_bar(T)
    snr = abar / (1 - abar)
    ref = (np.minimum(snr, 5.0) / snr) / (1.0 + snr)
    base = plain.training_losses(fixed_model, x, t, noise=noise)["mse"].double().numpy()
    got = both.training_losses(fixed_model, x, t, noise=noise)["mse"].double().numpy()
    np.testing.assert_allclose(got, base * ref[t.numpy()], rtol=1e-5)


def test_p2_learned_sigma_weights_only_the_mse_term():
    T = 40
    plain = create_gaussian_diffusion(steps=T, learn_sigma=True, rescale_learned_sigmas=True)
    p2 = create_gaussian_diffusion(steps=T, learn_sigma=True, rescale_learned_sigmas=True, p2_gamma=1.0)
    model = lambda x, t: torch.cat([fixed_model(x, t), 0.1 * x], dim=1)  # noqa: E731
    t = torch.tensor([0, 5, 20, 39])
    x = torch.linspace(-1, 1, 4 * 3 * 4).view(4, 3, 2, 2)
    noise = torch.sin(torch.arange(x.numel()).float()).view_as(x)
    a, b = plain.training_losses(model, x, t, noise=noise), p2.training_losses(model, x, t, noise=noise)
    torch.testing.assert_close(a["vb"], b["vb"])
    torch.testing.assert_close(b["mse"], a["mse"] * p2.p2_weights(t))


def test_p2_bad_values():
    with pytest.raises(ValueError, match="p2_gamma"):
        create_gaussian_diffusion(steps=10, noise_schedule="cosine", p2_gamma=-1.0)
    with pytest.raises(ValueError, match="p2_k"):
        create_gaussian_diffusion(steps=10, noise_schedule="cosine", p2_gamma=1.0, p2_k=0.0)
    with pytest.raises(ValueError, match="use_kl"):
        create_gaussian_diffusion(steps=10, noise_schedule="cosine", p2_gamma=1.0, use_kl=True)


# ------------------------------------------------------------------------------ SpeeD


def speed_reference(abar, tau, k, lam):
    """SpeeD's 'ours' sampling distribution, dual centre and loss weights, in float64."""
    T = len(abar)
    tau_steps = int(round(tau * T))
    p = np.array([k if i < tau_steps else 1.0 for i in range(T)])
    p = p / p.sum()
    g = gradient(np.sqrt(1 - abar))
    m = T
    for i in range(T):
        if g[i] < 1e-4:
            m = i + 1
            break
    d = gradient(1 - abar)
    d = (d - d.min()) / (d.max() - d.min())
    w = np.array([(1 - lam) + (2 * lam - 1) * d[i] if i < tau_steps else 1.0 for i in range(T)])
    return p, m, w


@pytest.mark.parametrize("schedule,T", [("cosine", 1000), ("linear", 1000), ("cosine", 200)])
@pytest.mark.parametrize("tau,k,lam", [(0.7, 5.0, 0.6), (0.5, 2.0, 0.8)])
def test_speed_matches_reference(schedule, T, tau, k, lam):
    diffusion = create_gaussian_diffusion(steps=T, noise_schedule=schedule)
    sampler = SpeeDSampler(diffusion, tau=tau, k=k, lam=lam)
    abar = np.cumprod(1 - gd.get_named_beta_schedule(schedule, T))
    p, m, w = speed_reference(abar, tau, k, lam)
    np.testing.assert_allclose(sampler.weights(), p, rtol=1e-12)
    assert sampler.meaningful_steps == m
    np.testing.assert_allclose(sampler.loss_weights(), w, rtol=1e-10, atol=1e-12)

    torch.manual_seed(0)
    n = 9
    t, weights = sampler.sample(n, "cpu")
    assert t.shape == (n,) and t.dtype == torch.int64
    first, duals = t[: n // 2 + 1].numpy(), t[n // 2 + 1:].numpy()
    ref_dual = np.where(first < m, m - first, first - m)[: len(duals)]
    np.testing.assert_array_equal(duals, np.minimum(ref_dual, T - 1))
    np.testing.assert_allclose(weights.numpy(), w[t.numpy()].astype(np.float32), rtol=1e-6)


def test_speed_draws_follow_p():
    T = 100
    diffusion = create_gaussian_diffusion(steps=T, noise_schedule="linear")
    sampler = SpeeDSampler(diffusion, tau=0.7, k=5.0, lam=0.6)
    torch.manual_seed(1)
    n = 200_000
    t, _ = sampler.sample(n, "cpu")
    first = t[: n // 2 + 1].numpy()
    below = (first < 70).mean()
    assert below == pytest.approx(5 * 70 / (5 * 70 + 30), abs=0.005)


# ------------------------------------------------------------------------------ log-normal


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_lognormal_matches_reference(mean, std):
    from scipy import stats

    T = 400
    diffusion = create_gaussian_diffusion(steps=T)
    sampler = LogitNormalSampler(diffusion, mean=mean, std=std)
    u = (np.arange(T) + 0.5) / T
    dens = stats.norm.pdf(np.log(u / (1 - u)), loc=mean, scale=std) / (u * (1 - u))
    ref = dens / dens.sum()
    np.testing.assert_allclose(sampler.weights(), ref, rtol=1e-10)
    torch.manual_seed(2)
    t, w = sampler.sample(200_000, "cpu")
    assert torch.all(w == 1)
    hist = np.bincount(t.numpy(), minlength=T) / len(t)
    cdf_err = np.abs(np.cumsum(hist) - np.cumsum(ref)).max()
    assert cdf_err < 0.005


def test_bad_sampler_values():
    diffusion = create_gaussian_diffusion(steps=10, noise_schedule="cosine")
    with pytest.raises(ValueError, match="speed_tau"):
        SpeeDSampler(diffusion, tau=0.0)
    with pytest.raises(ValueError, match="speed_k"):
        SpeeDSampler(diffusion, k=-1)
    with pytest.raises(ValueError, match="lognormal_std"):
        LogitNormalSampler(diffusion, std=0)
    with pytest.raises(TypeError, match="unknown"):
        create_named_schedule_sampler("speed", diffusion, tauu=0.5)


# ------------------------------------------------------------------------------ options


def opts(**over):
    o = {opt.name: opt.default for opt in config.OPTIONS}
    o.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
             diffusion_steps=50, batch_size=4, total_steps=10)
    o.update(over)
    return o


def test_options_in_help_and_table(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    config.add_options(parser, config.names())
    help_text = parser.format_help()
    for name in ("p2_gamma", "p2_k", "speed_tau", "speed_k", "speed_lambda", "lognormal_mean", "lognormal_std"):
        assert f"--{name}" in help_text
        assert config.BY_NAME[name].group == "methods"
    assert {"speed", "lognormal"} <= set(config.BY_NAME["schedule_sampler"].choices)


@pytest.mark.parametrize("name,cls", [("speed", SpeeDSampler), ("lognormal", LogitNormalSampler)])
def test_samplers_from_options_compose_with_md_lrc_and_p2(name, cls):
    o = opts(schedule_sampler=name, momentum_decay=True, lr_compensation=True, p2_gamma=1.0,
             speed_tau=0.5, speed_k=3.0, speed_lambda=0.7, lognormal_mean=0.2, lognormal_std=0.9)
    training.check(o, "cpu")
    _, diffusion = training.build_model(o, "cpu")
    assert diffusion.p2_gamma == 1.0
    sampler = training.schedule_sampler(o, diffusion)
    assert isinstance(sampler, cls)
    if name == "speed":
        assert (sampler.tau, sampler.k, sampler.lam) == (0.5, 3.0, 0.7)
    else:
        assert (sampler.mean, sampler.std) == (0.2, 0.9)


def test_p2_composes_with_clts():
    o = opts(schedule_sampler="clts", p2_gamma=0.5, p2_k=2.0, clts_target_steps=5)
    _, diffusion = training.build_model(o, "cpu")
    assert (diffusion.p2_gamma, diffusion.p2_k) == (0.5, 2.0)
    assert type(training.schedule_sampler(o, diffusion)).__name__ == "CLTSSampler"
