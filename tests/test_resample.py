"""
Timestep samplers: CLTS (SPEC section 2) against an independent float64
computation and a chi-square test of its draws; the original uniform and
loss-second-moment samplers; the factory.
"""

import io
import math
import threading

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from improved_diffusion import resample
from improved_diffusion.methods.clts import CLTSSampler
from improved_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)


class FakeDiffusion:
    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps


def ref_clts(T, mu, sigma, k, K, lam_max):
    """SPEC Eq. 7-8 in float64, written out element by element."""
    g = np.array([math.exp(-((t / (T - 1) - mu) ** 2) / (2 * sigma**2)) for t in range(T)])
    g /= g.sum()
    lam = lam_max * min(k / K, 1.0)
    return (1 - lam) * np.full(T, 1.0 / T) + lam * g


def roundtrip(obj):
    """Save and load through torch.save / weights_only=True, as checkpoints do."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------ CLTS


@pytest.mark.parametrize("T", [4000, 1000])
@pytest.mark.parametrize("mu,sigma", [(0.3, 1.0), (0.1, 0.2), (0.9, 0.1), (0.5, 0.05), (0.0, 0.5)])
def test_clts_weights_match_reference(T, mu, sigma):
    K = 100000
    sampler = CLTSSampler(FakeDiffusion(T), mu=mu, sigma=sigma, target_steps=K)
    for k in (0, K // 2, K, 2 * K):
        sampler.set_step(k)
        w = sampler.weights()
        assert isinstance(w, np.ndarray) and w.dtype == np.float64 and w.shape == (T,)
        np.testing.assert_allclose(w, ref_clts(T, mu, sigma, k, K, 1.0), rtol=1e-12, atol=0)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert sampler.lam == pytest.approx(min(k / K, 1.0)) == sampler.lambda_()
    assert sampler.step == 2 * K


def test_clts_defaults_and_spec_figures():
    T = 4000
    sampler = CLTSSampler(FakeDiffusion(T))
    config = (sampler.mu, sampler.sigma, sampler.target_steps, sampler.lambda_max)
    assert config == (0.3, 1.0, 100000, 1.0)
    assert not sampler.importance_weighting
    np.testing.assert_allclose(sampler.weights(), 1 / T, rtol=1e-12)  # k = 0: uniform
    sampler.set_step(100000)
    ratio = sampler.weights() * T
    # SPEC: ends at ~0.83x (t = T-1) and ~1.01x (t = 0), peak ~1.06x
    assert ratio[-1] == pytest.approx(0.83, abs=0.01)
    assert ratio[0] == pytest.approx(1.01, abs=0.01)
    assert ratio.max() == pytest.approx(1.06, abs=0.01)
    assert int(np.argmax(ratio)) == round(0.3 * (T - 1))


def test_clts_lambda_max_caps_the_mix():
    T, K = 1000, 1000
    sampler = CLTSSampler(FakeDiffusion(T), mu=0.2, sigma=0.1, target_steps=K, lambda_max=0.5)
    sampler.set_step(5 * K)
    assert sampler.lam == 0.5
    np.testing.assert_allclose(sampler.weights(), ref_clts(T, 0.2, 0.1, 5 * K, K, 0.5), rtol=1e-12)


@pytest.mark.parametrize(
    "T,mu,sigma,k",
    [(1000, 0.3, 0.2, 50000), (4000, 0.3, 1.0, 100000), (1000, 0.7, 0.05, 80000)],
)
def test_clts_draws_fit_distribution(T, mu, sigma, k):
    sampler = CLTSSampler(FakeDiffusion(T), mu=mu, sigma=sigma, target_steps=100000)
    sampler.set_step(k)
    torch.manual_seed(1234)
    n = 1_000_000
    t, w = sampler.sample(n, "cpu")
    assert t.dtype == torch.int64 and t.shape == (n,) and t.min() >= 0 and t.max() < T
    assert torch.all(w == 1) and w.dtype == torch.float32
    bins = 20
    observed = np.bincount(t.numpy() * bins // T, minlength=bins)
    p = ref_clts(T, mu, sigma, k, 100000, 1.0)
    expected = n * p.reshape(bins, -1).sum(1)
    assert chisquare(observed, expected).pvalue > 1e-3
    # and it is not simply uniform (the distributions here differ enough)
    assert chisquare(observed, np.full(bins, n / bins)).pvalue < 1e-6


def test_clts_draws_use_global_torch_rng():
    sampler = CLTSSampler(FakeDiffusion(1000), sigma=0.2)
    sampler.set_step(60000)
    torch.manual_seed(5)
    a, _ = sampler.sample(64, "cpu")
    state = torch.get_rng_state()
    b, _ = sampler.sample(64, "cpu")
    torch.set_rng_state(state)
    c, _ = sampler.sample(64, "cpu")
    torch.manual_seed(5)
    a2, _ = sampler.sample(64, "cpu")
    assert torch.equal(a, a2) and torch.equal(b, c) and not torch.equal(a, b)


def test_clts_importance_weights():
    T = 1000
    sampler = CLTSSampler(
        FakeDiffusion(T), mu=0.3, sigma=0.1, target_steps=10, importance_weighting=True
    )
    sampler.set_step(7)
    torch.manual_seed(0)
    t, w = sampler.sample(4096, "cpu")
    p = ref_clts(T, 0.3, 0.1, 7, 10, 1.0)
    np.testing.assert_allclose(w.double().numpy(), 1 / (T * p[t.numpy()]), rtol=1e-6)
    # importance weighting restores the uniform objective in expectation
    assert (w.double().mean().item()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(mu=-0.1), "clts_mu"),
        (dict(mu=1.5), "clts_mu"),
        (dict(sigma=0.0), "clts_sigma"),
        (dict(sigma=-1.0), "clts_sigma"),
        (dict(target_steps=0), "clts_target_steps"),
        (dict(target_steps=-5), "clts_target_steps"),
        (dict(lambda_max=1.5), "clts_lambda_max"),
        (dict(lambda_max=-0.1), "clts_lambda_max"),
        (dict(sigma=1e-6, mu=0.3051), "clts_sigma 1e-06 is too small"),  # underflows on the grid
    ],
)
def test_clts_validation(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        CLTSSampler(FakeDiffusion(100), **kwargs)


def test_clts_state_dict_roundtrip():
    a = CLTSSampler(FakeDiffusion(1000), sigma=0.2)
    a.set_step(12345)
    state = roundtrip(a.state_dict())
    b = CLTSSampler(FakeDiffusion(1000), sigma=0.2)
    b.load_state_dict(state)
    assert b.step == 12345 and b.lam == a.lam
    np.testing.assert_array_equal(a.weights(), b.weights())
    with pytest.raises(ValueError):
        b.set_step(-1)


# ------------------------------------------------- original samplers


def test_uniform_sampler():
    sampler = UniformSampler(FakeDiffusion(50))
    np.testing.assert_array_equal(sampler.weights(), np.ones(50))
    np.random.seed(0)
    t, w = sampler.sample(1000, "cpu")
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 50
    assert torch.all(w == 1.0) and w.dtype == torch.float32
    sampler.set_step(10)  # a no-op, so a training loop can always call it
    assert sampler.state_dict() == {}


def test_loss_second_moment_warmup_then_history():
    T, H = 6, 10
    sampler = LossSecondMomentResampler(FakeDiffusion(T), history_per_term=H, uniform_prob=0.001)
    rng = np.random.RandomState(0)
    all_losses = {t: [] for t in range(T)}
    for _ in range(H - 1):
        for t in range(T):
            loss = float(rng.rand() * (t + 1))
            all_losses[t].append(loss)
            sampler.update_with_local_losses(
                torch.tensor([t]), torch.tensor([loss], dtype=torch.float64)
            )
    np.testing.assert_array_equal(sampler.weights(), np.ones(T))  # not warmed up yet
    # fill the last slot, then overflow two timesteps (oldest losses drop out)
    ts = list(range(T)) + [0, 0, 3]
    losses = [float(rng.rand() * (t + 1)) for t in ts]
    for t, loss in zip(ts, losses):
        all_losses[t].append(loss)
    sampler.update_with_local_losses(torch.tensor(ts), torch.tensor(losses, dtype=torch.float64))

    rms = np.array([math.sqrt(np.mean(np.square(all_losses[t][-H:]))) for t in range(T)])
    want = 0.999 * rms / rms.sum() + 0.001 / T
    np.testing.assert_allclose(sampler.weights(), want, rtol=1e-12)

    # importance weights are 1 / (T p)
    np.random.seed(0)
    t, w = sampler.sample(500, "cpu")
    np.testing.assert_allclose(w.double().numpy(), 1 / (T * want[t.numpy()]), rtol=1e-6)

    other = LossSecondMomentResampler(FakeDiffusion(T), history_per_term=H)
    other.load_state_dict(roundtrip(sampler.state_dict()))
    np.testing.assert_array_equal(other.weights(), sampler.weights())
    with pytest.raises(ValueError):
        LossSecondMomentResampler(FakeDiffusion(T + 1)).load_state_dict(sampler.state_dict())


def test_factory():
    diff = FakeDiffusion(100)
    assert isinstance(create_named_schedule_sampler("uniform", diff), UniformSampler)
    lsm = create_named_schedule_sampler("loss-second-moment", diff)
    assert isinstance(lsm, LossSecondMomentResampler)
    clts = create_named_schedule_sampler(
        "clts", diff, mu=0.4, sigma=0.3, target_steps=500, lambda_max=0.8, importance_weighting=True
    )
    assert isinstance(clts, CLTSSampler)
    assert (clts.mu, clts.sigma, clts.target_steps, clts.lambda_max, clts.importance_weighting) == (
        0.4, 0.3, 500, 0.8, True)
    # CLTS options are ignored by the other samplers, so launchers may always pass them
    assert isinstance(create_named_schedule_sampler("uniform", diff, mu=0.4), UniformSampler)
    with pytest.raises(ValueError, match="schedule_sampler") as info:
        create_named_schedule_sampler("cosine-ish", diff)
    for name in ("uniform", "loss-second-moment", "clts"):
        assert name in str(info.value)
    with pytest.raises(TypeError):
        create_named_schedule_sampler("clts", diff, bogus=1)


# ------------------------------------------- distributed loss gathering


class ThreadDist:
    """
    Stand-in for torch.distributed with ranks as threads: all_gather has the
    real contract (equal shapes on every rank, results in rank order) without
    the cost of starting processes.
    """

    def __init__(self, world_size):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots = [None] * world_size
        self.local = threading.local()

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return self.world_size

    def get_rank(self):
        return self.local.rank

    def all_gather(self, tensor_list, tensor):
        assert len(tensor_list) == self.world_size
        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        for out, got in zip(tensor_list, self.slots):
            # the real all_gather requires equal shapes and dtypes on all ranks
            assert out.shape == got.shape and out.dtype == got.dtype
            out.copy_(got)
        self.barrier.wait()


def test_update_with_local_losses_gathers_across_ranks(monkeypatch):
    fake = ThreadDist(2)
    monkeypatch.setattr(resample, "dist", fake)
    batches = {  # ranks contribute different batch sizes
        0: (torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])),
        1: (torch.tensor([3, 0, 1, 2, 3]), torch.tensor([4.0, 5.0, 6.0, 7.0, 8.0])),
    }
    samplers = {r: LossSecondMomentResampler(FakeDiffusion(4), history_per_term=2) for r in batches}
    errors = []

    def run(rank):
        fake.local.rank = rank
        try:
            samplers[rank].update_with_local_losses(*batches[rank])
        except Exception as exc:  # surfaced below
            errors.append(exc)
            fake.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in batches]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for sampler in samplers.values():
        state = sampler.state_dict()
        torch.testing.assert_close(state["loss_counts"], torch.tensor([2, 2, 2, 2]))
        # rank 0's losses come first, then rank 1's
        torch.testing.assert_close(
            state["loss_history"],
            torch.tensor([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0], [4.0, 8.0]], dtype=torch.float64),
        )
