"""
The Laplace timestep sampler (Hang et al. 2024) against float64 references: the Laplace mass of
each timestep's log-SNR cell (scipy), and draws of the paper's continuous schedule
lambda(u) = mu - b sgn(0.5 - u) ln(1 - 2 |u - 0.5|), u ~ U(0, 1), rounded to the nearest
timestep's log SNR.
"""

import numpy as np
import pytest
import torch
from scipy import stats

from improved_diffusion.options import config
from improved_diffusion.run import training
from improved_diffusion.gaussian_diffusion import get_named_beta_schedule
from improved_diffusion.methods.laplace import LaplaceSampler
from improved_diffusion.script_util import create_gaussian_diffusion


def log_snr(schedule, T):
    abar = np.cumprod(1 - get_named_beta_schedule(schedule, T))
    return np.log(abar / (1 - abar))


@pytest.mark.parametrize("schedule,T", [("cosine", 1000), ("linear", 1000), ("cosine", 50)])
@pytest.mark.parametrize("mu,b", [(0.0, 0.5), (1.0, 1.0), (-2.0, 0.3)])
def test_masses_match_scipy(schedule, T, mu, b):
    sampler = LaplaceSampler(create_gaussian_diffusion(steps=T, noise_schedule=schedule), mu=mu, b=b)
    lam = log_snr(schedule, T)
    edges = np.concatenate([[np.inf], (lam[:-1] + lam[1:]) / 2, [-np.inf]])  # cell of t: (edges[t+1], edges[t]]
    law = stats.laplace(loc=mu, scale=b)
    ref = np.array([law.cdf(edges[t]) - law.cdf(edges[t + 1]) for t in range(T)])
    got = sampler.weights()
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-15)
    # far in the upper tail scipy's cdf differences cancel; the sampler's own tail is exact there
    tail = edges[1:] > mu + 20 * b
    np.testing.assert_allclose(got[tail], (law.sf(edges[1:]) - law.sf(edges[:-1]))[tail], rtol=1e-9, atol=0)


def test_draws_follow_the_papers_schedule():
    T, mu, b = 200, 0.0, 0.5
    sampler = LaplaceSampler(create_gaussian_diffusion(steps=T, noise_schedule="cosine"), mu=mu, b=b)
    lam = log_snr("cosine", T)
    u = np.random.RandomState(0).uniform(size=400_000)
    drawn_lambda = mu - b * np.sign(0.5 - u) * np.log(1 - 2 * np.abs(u - 0.5))
    t_ref = np.abs(drawn_lambda[:, None] - lam[None, :]).argmin(1)  # the timestep of the nearest log SNR
    hist_ref = np.bincount(t_ref, minlength=T) / len(u)
    torch.manual_seed(0)
    t, w = sampler.sample(400_000, "cpu")
    assert torch.all(w == 1) and t.dtype == torch.int64
    hist = np.bincount(t.numpy(), minlength=T) / len(t)
    assert np.abs(np.cumsum(hist) - np.cumsum(sampler.weights())).max() < 0.005
    assert np.abs(np.cumsum(hist_ref) - np.cumsum(sampler.weights())).max() < 0.005


def test_bad_values_and_options():
    diffusion = create_gaussian_diffusion(steps=10, noise_schedule="cosine")
    with pytest.raises(ValueError, match="laplace_b"):
        LaplaceSampler(diffusion, b=0.0)
    assert {"laplace_mu", "laplace_b"} <= set(config.names("methods"))
    assert "laplace" in config.BY_NAME["schedule_sampler"].choices
    o = {opt.name: opt.default for opt in config.OPTIONS}
    o.update(schedule_sampler="laplace", laplace_mu=0.5, laplace_b=0.8, diffusion_steps=20)
    sampler = training.schedule_sampler(o, create_gaussian_diffusion(steps=20, noise_schedule="cosine"))
    assert isinstance(sampler, LaplaceSampler) and (sampler.mu, sampler.b) == (0.5, 0.8)
