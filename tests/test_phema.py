"""
Power-function EMA (EDM2, --phema_stds) and post-hoc reconstruction (scripts/posthoc_ema.py),
against float64 references written from the definitions in docs/methods.md:

- the per-step update against the closed form of the power-function average;
- sigma_rel -> gamma -> sigma_rel, and sigma_rel against the profile's moments by quadrature;
- the profiles' inner products against quadrature;
- a tracked std rebuilt from the snapshots to float32 round-off, an untracked one within the
  Cauchy-Schwarz bound of its profile error;
- end to end (slow): N steps + resume + N steps == 2N bitwise with the averages and snapshots,
  then posthoc_ema.py for an untracked std, and image_sample.py from its output alone.
"""

import json
import os

import numpy as np
import pytest
import torch
from scipy import integrate

from improved_diffusion.options import config
from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.run import posthoc_ema
from improved_diffusion.run.ema import MAX_RELATIVE_STD, PowerEMA, exponent_to_std, std_to_exponent
from improved_diffusion.run.run_dir import Found, RunDir, load_run
from tiny import TINY_MODEL, assert_identical, flags, make_npz, run_script


def walk(model, steps, seed=0, skip=()):
    """Move `model`'s weights along a random walk with drift, one move per step (none at the
    steps in `skip`); yields (step, applied) after each move."""
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        applied = k not in skip
        if applied:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.002)
        yield k, applied


def closed_form(weights, std):
    """sum_i w_i theta_i, w_i = (i^(g+1) - (i-1)^(g+1)) / t^(g+1) over the t applied updates
    (float64 numpy): the profile (g + 1) tau^g / t^(g+1) integrated over each update."""
    g, t = std_to_exponent(std), len(weights)
    i = np.arange(1, t + 1, dtype=np.float64)
    w = (i ** (g + 1) - (i - 1) ** (g + 1)) / np.float64(t) ** (g + 1)
    return np.tensordot(w, np.stack(weights), axes=1)


def test_update_equals_the_closed_form_and_skips_do_not_count():
    """float64 weights, three stds (one with gamma < 0); after each step the average equals the
    closed form over the applied updates; a skipped step leaves every average bitwise as it was."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).double()
    stds = (0.05, 0.2, 0.295)
    assert std_to_exponent(0.295) < 0
    averages = PowerEMA(model, stds)
    applied_weights, skip = [], {3, 4, 17}
    for k, applied in walk(model, 40, skip=skip):
        before = [[p.clone() for p in avg] for avg in averages.params]
        averages.update(torch.tensor(applied))
        if not applied:
            assert all(torch.equal(a, b) for avg, old in zip(averages.params, before) for a, b in zip(avg, old))
            continue
        applied_weights.append(model.weight.detach().numpy().copy())
        for std, avg in zip(stds, averages.params):
            np.testing.assert_allclose(avg[0].numpy(), closed_form(applied_weights, std), rtol=1e-12, atol=1e-13)
    assert int(averages.updates) == 40 - len(skip)


def test_first_update_makes_the_average_the_weights():
    """t = 1: beta = 0, so the initial weights never count (EDM2's first step)."""
    model = torch.nn.Linear(3, 2)
    averages = PowerEMA(model, (0.1,))
    with torch.no_grad():
        model.weight.add_(1.0)
    averages.update(torch.tensor(True))
    assert torch.equal(averages.params[0][0], model.weight)


@pytest.mark.parametrize("std", [1e-4, 0.01, 0.05, 0.1, 0.2, 1 / 12 ** 0.5, 0.29, MAX_RELATIVE_STD])
def test_std_exponent_round_trip_and_moments(std):
    """sigma_rel -> gamma -> sigma_rel to 1e-12; and sigma_rel is the std of the profile
    tau^gamma on [0, 1] computed by quadrature (float64), independently of the closed form."""
    gamma = std_to_exponent(std)
    assert gamma > -1
    assert exponent_to_std(gamma) == pytest.approx(std, rel=1e-12)
    if gamma < 1000:  # quadrature of a spike at 1 is not a reference
        mass = integrate.quad(lambda u: u ** gamma, 0, 1)[0]
        mean = integrate.quad(lambda u: u ** (gamma + 1), 0, 1)[0] / mass
        second = integrate.quad(lambda u: u ** (gamma + 2), 0, 1)[0] / mass
        assert np.sqrt(second - mean ** 2) == pytest.approx(std, rel=1e-7)
    assert std_to_exponent(1 / 12 ** 0.5) == pytest.approx(0.0, abs=1e-12)  # the plain average


def test_profile_inner_products_by_quadrature():
    for (ta, sa), (tb, sb) in [((100, 0.05), (300, 0.1)), ((300, 0.2), (100, 0.05)), ((50, 0.3), (50, 0.3))]:
        ga, gb = std_to_exponent(sa), std_to_exponent(sb)
        pa = lambda u: (ga + 1) * u ** ga / ta ** (ga + 1)  # noqa: E731
        pb = lambda u: (gb + 1) * u ** gb / tb ** (gb + 1)  # noqa: E731
        numeric = integrate.quad(lambda u: pa(u) * pb(u), 0, min(ta, tb), limit=200)[0]
        assert posthoc_ema.profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-8)


def snapshot_run(folder, stds, steps=200, interval=10, extra=()):
    """A synthetic run: a float32 Linear moved by `walk`, PowerEMAs of `stds` (snapshots every
    `interval` steps into `folder`) and of `extra` (kept in memory, for comparison); returns the
    weights after every step, and the final in-memory averages."""
    torch.manual_seed(1)
    model = torch.nn.Linear(40, 25)
    tracked, compared = PowerEMA(model, stds), PowerEMA(model, extra) if extra else None
    run, history = RunDir(folder), []
    for k, _ in walk(model, steps, seed=2):
        for averages in filter(None, (tracked, compared)):
            averages.update(torch.tensor(True))
        history.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        if (k + 1) % interval == 0:
            run.save_snapshot(k + 1, tracked.state_dict)
    return history, tracked, compared


def test_tracked_std_rebuilt_to_float32_roundoff(tmp_path):
    """A std that the run tracked, rebuilt at a snapshot step, is that snapshot's average: its
    coefficient is 1 and the others about 1e-14 (solve round-off), the sum is taken in float64
    and rounded once to float32, so each weight is off by at most one float32 ulp (2^-23 relative)."""
    _, tracked, _ = snapshot_run(tmp_path, (0.05, 0.1))
    for step in (100, 200):
        state, info = posthoc_ema.reconstruct(str(tmp_path), 0.1, step, log=lambda *_: None)
        expected = ckpt.read_snapshot(tmp_path / ckpt.snapshot_name(step))["averages"][1]
        assert info["error"] < 1e-6 and info["sources"] == 2 * step // 10
        for name, value in expected.items():
            assert state[name].dtype == torch.float32
            ulp = 2.0 ** -23 * value.abs().clamp(min=1e-30)
            assert ((state[name] - value).abs() <= ulp).all(), name
    final, _ = posthoc_ema.reconstruct(str(tmp_path), 0.1, log=lambda *_: None)  # default: the newest step
    assert torch.equal(final["weight"], tracked.params[1][0])


def test_untracked_std_within_the_profile_bound(tmp_path):
    """0.15 rebuilt from snapshots of 0.05 and 0.10 (tracked beside them in memory, for the
    comparison): |error| <= ||p_target - p_rebuilt||_L2 * ||theta - theta_T||_L2 per weight
    (Cauchy-Schwarz; the coefficients sum to 1) plus 1e-6 of float32 accumulation. Measured
    with 20 snapshots of each: profile error 0.58 %, weights off by at most 9.4e-5 (4.4 % of
    the bound) where they moved by up to 0.72. With 10 snapshots the profile error is 2.2 %."""
    history, _, compared = snapshot_run(tmp_path, (0.05, 0.1), extra=(0.15,))
    state, info = posthoc_ema.reconstruct(str(tmp_path), 0.15, log=lambda *_: None)
    t = info["updates"]
    g = std_to_exponent(0.15)
    profile_norm = np.sqrt(posthoc_ema.profile_inner(t, g, t, g))
    assert 0 < info["error"] < 0.01
    for (name, _), value in zip(compared.model.named_parameters(), compared.params[0]):
        spread = torch.stack([h[name] - history[-1][name] for h in history])
        bound = info["error"] * profile_norm * spread.pow(2).sum(0).sqrt() + 1e-6
        err = (state[name].double() - value.double()).abs()
        assert (err <= bound).all(), (name, err.max().item(), bound.min().item())
        assert err.max() < 1e-3 * (value.double() - history[0][name]).abs().max()


def test_bounds_agree_between_table_and_code():
    """The table's check and PowerEMA accept the same relative stds."""
    assert config.BY_NAME["phema_stds"].check(str(MAX_RELATIVE_STD)) is None
    assert config.BY_NAME["phema_stds"].check(str(MAX_RELATIVE_STD + 1e-6)) is not None
    with pytest.raises(ValueError):
        std_to_exponent(MAX_RELATIVE_STD + 1e-6)


@pytest.mark.parametrize("flag, value, message", [
    ("phema_stds", "0.5", "--phema_stds values must be in (0, 0.3]"),
    ("phema_stds", "0.05,x", "--phema_stds must be a comma-separated list"),
    ("phema_stds", "0.1,0.1", "--phema_stds lists a value twice"),
    ("phema_snapshot_interval", "-1", "--phema_snapshot_interval must be >= 0"),
])
def test_bad_training_flags_fail_naming_the_flag(tmp_path, flag, value, message):
    proc = run_script("image_train.py", ["--data_dir", tmp_path / "missing.npz", "--log_dir", tmp_path / "x",
                                         f"--{flag}", value], check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--std", "0.1"], "--run is required"),
    (["--run", "R"], "--std is required"),
    (["--run", "R", "--std", "0.4"], "--std must be in (0, 0.3]"),
    (["--run", "R", "--std", "0.1", "--step", "0"], "--step must be positive"),
])
def test_bad_posthoc_flags_fail_naming_the_flag(argv, message):
    proc = run_script("posthoc_ema.py", argv, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def load_files(log_dir, step):
    names = [ckpt.model_name(step), ckpt.ema_name(0.9, step), ckpt.opt_name(step), ckpt.phema_name(step)]
    return {n: torch.load(os.path.join(log_dir, n), weights_only=True) for n in names}


@pytest.mark.slow
def test_exact_resume_posthoc_and_sampling(tmp_path):
    """2N steps == N + resume + N, bitwise, averages and snapshots included, with input
    perturbation and immiscible noise on too (issue 27's three together); --keep_checkpoints 1
    prunes no snapshot; posthoc_ema.py writes an untracked std, which image_sample.py samples
    from with only --num_samples and --batch_size, also from another folder (config.json copied)."""
    data = make_npz(tmp_path / "train.npz", n=16)
    n = 4

    def train(log_dir, **extra):
        opts = dict(TINY_MODEL, data_dir=data, log_dir=log_dir, batch_size=4, log_interval=2, save_interval=4,
                    ema_rate="0.9", phema_stds="0.05,0.1", phema_snapshot_interval=2, keep_checkpoints=1,
                    input_perturbation=0.1, immiscible=True, total_steps=2 * n, **extra)
        return run_script("image_train.py", flags(opts))

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight)
    train(resumed, stop_at=n)
    assert f"resumed from step {n}" in train(resumed).stdout
    assert_identical(load_files(straight, 2 * n), load_files(resumed, 2 * n))
    assert RunDir(resumed).snapshots() == [8, 6, 4, 2] and RunDir(resumed).steps() == [8]
    for step in (2, 4, 6, 8):
        a, b = (ckpt.read_snapshot(d / ckpt.snapshot_name(step)) for d in (straight, resumed))
        assert_identical(a, b, f"snapshot {step}")
    assert ckpt.read_snapshot(resumed / ckpt.snapshot_name(8))["updates"] == 8

    proc = run_script("posthoc_ema.py", ["--run", resumed, "--std", 0.08])
    out = resumed / "ema_std0.08_000008.pt"
    assert out.is_file() and "profile error" in proc.stdout and "(1/" in proc.stdout
    assert load_run(str(resumed)).path.endswith(ckpt.ema_name(0.9, 8))  # the run's own EMA is still the default
    other = tmp_path / "elsewhere" / "posthoc.pt"
    run_script("posthoc_ema.py", ["--run", resumed, "--std", 0.08, "--step", 6, "--out", other])
    assert json.loads((other.parent / "config.json").read_text()) == json.loads((resumed / "config.json").read_text())
    for model_path in (out, other):
        run_script("image_sample.py", ["--model_path", model_path, "--num_samples", 2, "--batch_size", 2])
        assert np.load(model_path.parent / "samples_2x8x8x3.npz")["arr_0"].shape == (2, 8, 8, 3)


def test_continuing_from_an_older_checkpoint_sets_newer_snapshots_aside(tmp_path):
    """Snapshots after the step a run continues from belong to the part that is redone: they
    move to superseded/ with the newer checkpoints; older ones stay."""
    run = RunDir(tmp_path)
    averages = PowerEMA(torch.nn.Linear(2, 2), (0.1,))
    for step in (2, 4):
        ckpt.write_checkpoint(str(tmp_path), step, {ckpt.phema_name(step): averages.state_dict()}, {})
    for step in (1, 2, 3, 4, 5):
        run.save_snapshot(step, averages.state_dict)
    run.resumed(Found(str(tmp_path), 2, ckpt.load_state_file(str(tmp_path / ckpt.state_name(2)))))
    assert run.snapshots() == [2, 1] and run.steps() == [2]
    assert sorted(os.listdir(tmp_path / "superseded")) == sorted(
        [ckpt.state_name(4), ckpt.phema_name(4)] + [ckpt.snapshot_name(s) for s in (3, 4, 5)])
