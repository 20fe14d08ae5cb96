"""
The noise methods (input perturbation, Ning et al. 2023; immiscible diffusion, Li et al. 2024)
and SpeeD's weight on the MSE term alone (Wang et al. 2024), against independent float64
references: x_t and the target of input perturbation, the assignment of immiscible diffusion
against all permutations, SpeeD's learned-sigma loss; then the training loop with them
(microbatches, exact resume).
"""

import itertools
import math
import sys

import numpy as np
import pytest
import torch

from improved_diffusion import methods
from improved_diffusion.image_datasets import BatchStream, ImageDataset, to_model_input
from improved_diffusion.logger import Logger
from improved_diffusion.methods import immiscible
from improved_diffusion.methods.speed import SpeeDSampler
from improved_diffusion.options import config
from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.run import training
from improved_diffusion.script_util import create_gaussian_diffusion, create_model_and_diffusion, \
    model_and_diffusion_defaults
from improved_diffusion.train_util import TrainConfig, TrainLoop
from tiny import TINY_MODEL, assert_identical, assert_microbatches_agree, flags, make_npz, run_script

GAMMA = 0.1


def cosine_alpha_bar(T):
    """alpha_bar_t of the cosine schedule from its definition (betas clipped at 0.999), float64."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    out, prod = [], 1.0
    for i in range(T):
        prod *= 1 - min(1 - f((i + 1) / T) / f(i / T), 0.999)
        out.append(prod)
    return np.array(out)


def f64(x):
    return x.detach().double().numpy()


def model_fn(x, t):
    """A deterministic network stand-in: a smooth function of x_t and t (float32 in, float32 out)."""
    return torch.tanh(x * 0.7 + t.float().view(-1, 1, 1, 1) * 0.01)


def model_fn_f64(x_t, t):
    return np.tanh(x_t * 0.7 + t.reshape(-1, 1, 1, 1) * 0.01)


def learned_fn(x, t):
    return torch.cat([model_fn(x, t), 0.1 * x], dim=1)


def batch(seed, n=6, shape=(3, 4, 4)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=gen) * 2 - 1
    return x, torch.randn(n, *shape, generator=gen)


# ------------------------------------------------------------------------------ input perturbation


def perturb_with_replayed_xi(transform, x, noise):
    """Runs `transform` and returns its outputs with the xi it drew (replayed from the RNG state)."""
    state = torch.get_rng_state()
    out = transform(x, noise)
    torch.set_rng_state(state)
    xi = torch.randn(noise.shape, dtype=noise.dtype)
    return out, xi


def test_input_perturbation_perturbs_only_the_noise_that_makes_x_t():
    transform = methods.noise_transform({"input_perturbation": GAMMA})
    x, noise = batch(0)
    (target, input_noise), xi = perturb_with_replayed_xi(transform, x, noise)
    assert torch.equal(target, noise)
    np.testing.assert_allclose(f64(input_noise), f64(noise) + GAMMA * f64(xi), rtol=0, atol=1e-6)
    assert abs(f64(xi).std() - 1) < 0.2  # a fresh standard normal, not the noise again
    assert not np.allclose(f64(xi), f64(noise))


@pytest.mark.parametrize("mean_type", ["epsilon", "start_x", "previous_x"])
def test_input_perturbation_x_t_and_target_match_float64(mean_type):
    """x_t = sqrt(abar) x_0 + sqrt(1 - abar) (eps + gamma xi); the target is eps (not the
    perturbed noise), x_0, or the posterior mean at the perturbed x_t, as DDPM-IP's code."""
    T = 50
    diffusion = create_gaussian_diffusion(steps=T, noise_schedule="cosine", predict_xstart=mean_type == "start_x")
    if mean_type == "previous_x":
        diffusion.model_mean_type = type(diffusion.model_mean_type).PREVIOUS_X
    transform = methods.noise_transform({"input_perturbation": GAMMA})
    x, noise = batch(1)
    t = torch.tensor([0, 1, 10, 25, 48, 49])
    (target_noise, input_noise), xi = perturb_with_replayed_xi(transform, x, noise)
    losses = diffusion.training_losses(model_fn, x, t, noise=target_noise, input_noise=input_noise)

    abar = cosine_alpha_bar(T)
    tt = t.numpy()
    a = abar[tt].reshape(-1, 1, 1, 1)
    x0, eps, xi64 = f64(x), f64(noise), f64(xi)
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * (eps + GAMMA * xi64)
    out = model_fn_f64(x_t, tt.astype(np.float64))
    if mean_type == "epsilon":
        target = eps
    elif mean_type == "start_x":
        target = x0
    else:
        a_prev = np.append(1.0, abar[:-1])[tt].reshape(-1, 1, 1, 1)
        beta = 1 - a / a_prev
        target = (beta * np.sqrt(a_prev) / (1 - a)) * x0 + ((1 - a_prev) * np.sqrt(1 - beta) / (1 - a)) * x_t
    ref = ((target - out) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(f64(losses["mse"]), ref, rtol=2e-5, atol=1e-7)
    # without the perturbation the loss differs (the test can tell)
    plain = diffusion.training_losses(model_fn, x, t, noise=noise)
    assert not np.allclose(f64(plain["mse"]), ref, rtol=1e-3)


def test_input_perturbation_learned_sigma_vb_uses_the_perturbed_x_t():
    T = 40
    diffusion = create_gaussian_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True,
                                          rescale_learned_sigmas=True)
    x, noise = batch(2)
    t = torch.tensor([0, 3, 12, 20, 30, 39])
    (target_noise, input_noise), xi = perturb_with_replayed_xi(
        methods.noise_transform({"input_perturbation": GAMMA}), x, noise)
    ip = diffusion.training_losses(learned_fn, x, t, noise=target_noise, input_noise=input_noise)
    at_perturbed = diffusion.training_losses(learned_fn, x, t, noise=input_noise)  # same x_t, target moved
    assert torch.equal(ip["vb"], at_perturbed["vb"])
    abar = cosine_alpha_bar(T)[t.numpy()].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(abar) * f64(x) + np.sqrt(1 - abar) * (f64(noise) + GAMMA * f64(xi))
    ref = ((f64(noise) - model_fn_f64(x_t, t.numpy().astype(np.float64))) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(f64(ip["mse"]), ref, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(ip["loss"], ip["mse"] + ip["vb"])


def test_noise_methods_off_by_default_leave_the_loop_path():
    defaults = config.defaults()
    assert defaults["input_perturbation"] == 0.0 and defaults["immiscible"] is False
    assert methods.noise_transform(defaults) is None  # the loop then draws and uses its noise as before
    assert methods.noise_transform({"input_perturbation": 0.0, "immiscible": False}) is None
    with pytest.raises(ValueError, match="input_perturbation"):
        config.BY_NAME["input_perturbation"].validate(-0.1)


# ------------------------------------------------------------------------------ immiscible


def brute_force_assignment(x, noise):
    """The permutation minimising the total plain L2 distance, over all n! of them, float64."""
    xs, ns = f64(x).reshape(len(x), -1), f64(noise).reshape(len(noise), -1)
    d = np.sqrt(((xs[:, None, :] - ns[None, :, :]) ** 2).sum(-1))
    best = min(itertools.permutations(range(len(x))), key=lambda p: d[np.arange(len(x)), list(p)].sum())
    return np.array(best), d


@pytest.mark.parametrize("seed", range(6))
def test_immiscible_assignment_equals_brute_force(seed):
    x, noise = batch(10 + seed, n=5, shape=(3, 4, 4) if seed % 2 else (1, 8, 8))
    x = x * (1 + seed)  # images farther from the noise on some seeds: assignments that move more
    perm = immiscible.assignment(x, noise)
    best, d = brute_force_assignment(x, noise)
    assert perm.tolist() == best.tolist()
    assert d[np.arange(5), best].sum() <= d.trace() + 1e-12


def test_immiscible_noise_is_a_permutation_of_the_drawn_noise():
    x, noise = batch(3, n=16, shape=(3, 8, 8))
    x = x + 2 * torch.linspace(-1, 1, 16).view(-1, 1, 1, 1)  # spread images, so the assignment moves noise
    state = torch.get_rng_state()
    target, input_noise = methods.noise_transform({"immiscible": True})(x, noise)
    assert torch.equal(torch.get_rng_state(), state)  # no random draw
    assert input_noise is not None and torch.equal(target, input_noise)
    perm = immiscible.assignment(x, noise)
    assert sorted(perm.tolist()) == list(range(16)) and perm.tolist() != list(range(16))
    for i, j in enumerate(perm.tolist()):
        assert torch.equal(target[i], noise[j])  # the same tensors, bit for bit, only paired differently
    before = immiscible.distances(x, noise).trace()
    after = np.diag(immiscible.distances(x, target)).sum()
    assert after < before


def test_both_compose_assignment_first():
    assert [m.name for m in methods.methods(methods.NOISE)] == ["immiscible", "input_perturbation"]
    x, noise = batch(4, n=8)
    x = x * 3
    transform = methods.noise_transform({"immiscible": True, "input_perturbation": GAMMA})
    (target, input_noise), xi = perturb_with_replayed_xi(transform, x, noise)
    perm = immiscible.assignment(x, noise)
    assert torch.equal(target, noise[perm])
    np.testing.assert_allclose(f64(input_noise), f64(noise[perm]) + GAMMA * f64(xi), rtol=0, atol=1e-6)


def test_immiscible_without_scipy_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # what an interpreter without scipy sees
    with pytest.raises(ImportError, match="--immiscible True needs scipy"):
        methods.noise_transform({"immiscible": True})


# ------------------------------------------------------------------------------ the loop


def make_loop(tmp_path, microbatch=-1, noise_options=None, sampler=None, learn_sigma=True):
    torch.manual_seed(0)
    opts = model_and_diffusion_defaults()
    opts.update(TINY_MODEL, dropout=0.0, learn_sigma=learn_sigma)
    model, diffusion = create_model_and_diffusion(**opts)
    images = np.random.default_rng(0).integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8)
    data = BatchStream(ImageDataset(images, None), 4, seed=0)
    return TrainLoop(
        model=model, diffusion=diffusion, data=data,
        config=TrainConfig(batch_size=4, microbatch=microbatch, log_interval=1, save_interval=1000, progress=False),
        schedule_sampler=sampler(diffusion) if sampler else None, log_dir=str(tmp_path), resume="none",
        logger=Logger(str(tmp_path), stdout=False, tensorboard=False),
        noise_transform=methods.noise_transform(noise_options or {}),
    )


def test_loop_feeds_the_model_the_perturbed_x_t(tmp_path):
    loop = make_loop(tmp_path, noise_options={"input_perturbation": GAMMA})
    seen = []
    loop.model.register_forward_pre_hook(lambda module, args: seen.append((args[0].detach().clone(), args[1])))
    batch_, cond = next(loop.data)
    state = torch.get_rng_state()
    loop.run_step(batch_, cond)
    torch.set_rng_state(state)  # the step's draws, in order: t, the noise, xi
    T = loop.diffusion.num_timesteps
    t = torch.randint(0, T, (4,)).numpy()
    noise = torch.randn(4, 3, 8, 8)
    xi = torch.randn(4, 3, 8, 8)
    (x_t, t_scaled), = seen
    np.testing.assert_allclose(t_scaled.double().numpy(), t * 1000.0 / T)  # rescaled timesteps
    abar = cosine_alpha_bar(T)[t].reshape(-1, 1, 1, 1)
    x0 = f64(to_model_input(batch_, "cpu"))
    ref = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * (f64(noise) + GAMMA * f64(xi))
    np.testing.assert_allclose(f64(x_t), ref, rtol=0, atol=1e-5)


def test_microbatches_change_nothing_with_both_on(tmp_path):
    both = {"input_perturbation": GAMMA, "immiscible": True}
    assert_microbatches_agree(lambda micro: make_loop(tmp_path / str(micro), micro, both))


# ------------------------------------------------------------------------------ SpeeD


def test_speed_learned_sigma_loss_is_speeds_formula():
    """SpeeD's training_losses: mse = mean_flat(w_t (target - out)^2), vb unweighted, loss = mse + vb."""
    T = 40
    diffusion = create_gaussian_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True,
                                          rescale_learned_sigmas=True)
    sampler = SpeeDSampler(diffusion, tau=0.7, k=5.0, lam=0.6)
    assert sampler.weights_mse_only and sampler.weight_terms == "mse"
    torch.manual_seed(0)
    t, w = sampler.sample(6, "cpu")
    assert not torch.all(w == 1)
    x, noise = batch(5)
    got = diffusion.training_losses(learned_fn, x, t, noise=noise, mse_weights=w)
    plain = diffusion.training_losses(learned_fn, x, t, noise=noise)
    abar = cosine_alpha_bar(T)[t.numpy()].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(abar) * f64(x) + np.sqrt(1 - abar) * f64(noise)
    eps = model_fn_f64(x_t, t.numpy().astype(np.float64))
    mse = (f64(w).reshape(-1, 1, 1, 1) * (f64(noise) - eps) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(f64(got["mse"]), mse, rtol=2e-5, atol=1e-7)
    assert torch.equal(got["vb"], plain["vb"])
    np.testing.assert_allclose(f64(got["loss"]), mse + f64(plain["vb"]), rtol=2e-5, atol=1e-7)
    # the whole-loss weighting it replaces differs on this batch
    assert not np.allclose(f64(got["loss"]), f64(w) * f64(plain["loss"]), rtol=1e-2)


@pytest.mark.parametrize("weight_terms", ["mse", "all"])
def test_speed_weight_in_the_loop(tmp_path, weight_terms):
    """The loop's gradient is that of mean(w mse + vb) (SpeeD's code) or, named, mean(w (mse + vb))."""
    loop = make_loop(tmp_path, sampler=lambda d: SpeeDSampler(d, weight_terms=weight_terms))
    batch_, cond = next(loop.data)
    reference = [p.detach().clone() for p in loop.params]
    torch.manual_seed(3)
    loop.run_step(batch_, cond)
    got = [p.grad.clone() for p in loop.params]

    # the same draws in the same order (t, then the noise), by hand
    torch.manual_seed(3)
    t, w = loop.schedule_sampler.sample(4, "cpu")
    noise = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for p, r in zip(loop.params, reference):
            p.copy_(r)
    loop.opt.zero_grad(set_to_none=True)
    x = to_model_input(batch_, "cpu")
    if weight_terms == "mse":
        loss = loop.diffusion.training_losses(loop.model, x, t, noise=noise, mse_weights=w)["loss"].mean()
    else:
        loss = (loop.diffusion.training_losses(loop.model, x, t, noise=noise)["loss"] * w).mean()
    loss.backward()
    for a, p in zip(got, loop.params):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


def test_speed_weight_terms_option():
    o = config.BY_NAME["speed_weight_terms"]
    assert o.default == "mse" and o.choices == ("mse", "all") and o.group == "methods"
    diffusion = create_gaussian_diffusion(steps=20, noise_schedule="cosine")
    assert training.schedule_sampler({**config.defaults(), "schedule_sampler": "speed"}, diffusion).weights_mse_only
    old = training.schedule_sampler({**config.defaults(), "schedule_sampler": "speed", "speed_weight_terms": "all"},
                                    diffusion)
    assert not old.weights_mse_only
    kl = create_gaussian_diffusion(steps=20, noise_schedule="cosine", use_kl=True)
    with pytest.raises(ValueError, match="speed_weight_terms all"):
        SpeeDSampler(kl)
    SpeeDSampler(kl, weight_terms="all")  # the bound, weighted by name
    with pytest.raises(ValueError, match="speed_weight_terms"):
        SpeeDSampler(diffusion, weight_terms="vb")


# ------------------------------------------------------------------------------ end to end


def train_args(data, log_dir, **extra):
    opts = dict(TINY_MODEL, data_dir=data, log_dir=log_dir, batch_size=4, log_interval=2, save_interval=2,
                ema_rate="0.9", input_perturbation=GAMMA, immiscible=True)
    opts.update(extra)
    return flags(opts)


def checkpoint_files(log_dir, step):
    names = [ckpt.model_name(step), ckpt.ema_name(0.9, step), ckpt.opt_name(step)]
    return {n: torch.load(log_dir / n, weights_only=True) for n in names}


@pytest.mark.slow
def test_exact_resume_and_microbatch_with_both_on(tmp_path):
    data = make_npz(tmp_path / "train.npz", n=16)
    n = 2
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("image_train.py", train_args(data, straight, total_steps=2 * n))
    run_script("image_train.py", train_args(data, resumed, total_steps=2 * n, stop_at=n))
    proc = run_script("image_train.py", train_args(data, resumed, total_steps=2 * n))
    assert f"resumed from step {n}" in proc.stdout
    assert_identical(checkpoint_files(straight, 2 * n), checkpoint_files(resumed, 2 * n))

    # one update with --microbatch 2 against none (the tolerance of the classifier's test: a
    # weight whose gradient is at rounding level may move differently, no other)
    micro = tmp_path / "micro"
    run_script("image_train.py", train_args(data, micro, total_steps=1, microbatch=2))
    whole = tmp_path / "whole"
    run_script("image_train.py", train_args(data, whole, total_steps=1))
    x, y = (torch.load(d / ckpt.model_name(1), weights_only=True) for d in (whole, micro))
    diff = torch.cat([(x[k] - y[k]).abs().flatten() for k in x])
    assert (diff > 1e-6).float().mean() < 1e-3 and diff.max() < 0.5e-3
    config_json = (whole / "config.json").read_text()
    assert '"input_perturbation": 0.1' in config_json and '"immiscible": true' in config_json
