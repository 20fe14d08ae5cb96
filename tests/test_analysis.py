"""
Tests of the consistency-phenomenon analysis tools (improved_diffusion/analysis.py) and of
the three scripts that use them (scripts/consistency.py, interpolate.py, hessian.py).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch as th

from improved_diffusion import analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A UNet small enough for CPU tests.
TINY_FLAGS = {
    "image_size": 8,
    "num_channels": 16,
    "num_res_blocks": 1,
    "attention_resolutions": "",
    "diffusion_steps": 20,
    "noise_schedule": "linear",
}


def _flag_list(flags):
    out = []
    for k, v in flags.items():
        out += [f"--{k}", str(v)]
    return out


def _tiny_model_and_diffusion(**overrides):
    script_util = pytest.importorskip("improved_diffusion.script_util")
    args = script_util.model_and_diffusion_defaults()
    args.update(TINY_FLAGS)
    args.update(overrides)
    return script_util.create_model_and_diffusion(**args)


# ----------------------------------------------------------------------------------------
# PSNR and consistency
# ----------------------------------------------------------------------------------------


def test_psnr_matches_numpy_float64():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int64) + rng.integers(-20, 21, size=a.shape), 0, 255).astype(np.uint8)
    got = analysis.psnr(a, b)
    for m in range(5):
        diff = a[m].astype(np.float64) - b[m].astype(np.float64)
        mse = np.sum(diff * diff) / diff.size
        assert got[m] == pytest.approx(10 * math.log10(255.0**2 / mse), rel=1e-12)
    # torch tensors and float images in 0..255 give the same numbers
    np.testing.assert_allclose(analysis.psnr(th.from_numpy(a).float(), th.from_numpy(b)), got)
    # uint8 subtraction must not wrap around
    assert analysis.psnr(np.zeros((1, 2, 2, 3), np.uint8), np.full((1, 2, 2, 3), 255, np.uint8))[
        0
    ] == pytest.approx(0.0)


def test_identical_sets_give_inf_and_capped_summary():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    assert np.all(np.isinf(analysis.psnr(a, a.copy())))
    b = a.copy()
    b[0, 0, 0, 0] ^= 1  # one image differs by one pixel level
    res = analysis.consistency([a, a.copy(), b])
    pair01 = res["pairs"][0]
    assert (pair01["i"], pair01["j"]) == (0, 1)
    assert pair01["psnr"] == analysis.PSNR_CAP_DB and pair01["capped"] == 4
    assert res["capped"] == 4 + 3 + 3
    assert math.isfinite(res["C"])
    json.dumps(res)  # serialisable (no inf/nan)


def test_consistency_averages_the_three_pairs():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, size=(6, 8, 8, 3)).astype(np.float64)
    sets = [np.clip(base + rng.normal(0, s, base.shape), 0, 255) for s in (5, 10, 20)]
    res = analysis.consistency(sets, names=["a", "b", "c"])
    assert res["num_models"] == 3 and res["num_images"] == 6
    assert [(p["i"], p["j"]) for p in res["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    expected = []
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        expected.append(np.mean(analysis.psnr(sets[i], sets[j])))
        assert res["pairs"][len(expected) - 1]["psnr"] == pytest.approx(expected[-1])
    assert res["C"] == pytest.approx(np.mean(expected))
    # noisier pairs are less consistent
    assert res["pairs"][0]["psnr"] > res["pairs"][2]["psnr"]
    with pytest.raises(ValueError):
        analysis.consistency([sets[0]])
    with pytest.raises(ValueError):
        analysis.consistency([sets[0], sets[1][:3]])


# ----------------------------------------------------------------------------------------
# Hessian tools on a quadratic with a known spectrum
# ----------------------------------------------------------------------------------------

TOP = [10.0, 7.0, 5.0, 3.0, 2.0]


def _quadratic(dim=50, seed=0):
    gen = th.Generator().manual_seed(seed)
    q, _ = th.linalg.qr(th.randn(dim, dim, generator=gen, dtype=th.float64))
    eig = th.cat([th.tensor(TOP, dtype=th.float64), th.linspace(-1.5, 1.5, dim - len(TOP), dtype=th.float64)])
    a = q @ th.diag(eig) @ q.T
    a = 0.5 * (a + a.T)
    # the loss closure works on a float32 parameter, as a model would
    x = th.randn(dim, generator=gen).requires_grad_(True)
    a32 = a.float()
    return a, (lambda: 0.5 * x @ a32 @ x), [x]


def test_hvp_equals_matrix_vector_product():
    a, loss_fn, params = _quadratic()
    v = th.randn(50, dtype=th.float64, generator=th.Generator().manual_seed(3))
    hv = analysis.hvp(loss_fn, params, v)
    assert hv.dtype == th.float64
    th.testing.assert_close(hv, a @ v, rtol=1e-5, atol=1e-5)
    fn = analysis.make_hvp_fn(loss_fn, params)
    th.testing.assert_close(fn(v), hv)  # graph reused across products
    th.testing.assert_close(fn(2 * v), 2 * hv)
    with pytest.raises(ValueError):
        fn(th.zeros(49))


def test_lanczos_top_k_match_known_eigenvalues():
    a, _, _ = _quadratic()
    op = lambda v: a @ v  # noqa: E731
    res = analysis.lanczos(op, 50, k=5, num_iters=30, seed=0)
    np.testing.assert_allclose(res.eigenvalues, TOP, rtol=1e-4)
    assert res.num_iters == 30 and res.alphas.shape == (30,) and res.betas.shape == (29,)
    assert res.ritz_weights.sum() == pytest.approx(1.0)
    # through double backprop on the float32 closure, too
    _, loss_fn, params = _quadratic()
    top = analysis.lanczos_top_eigenvalues(analysis.make_hvp_fn(loss_fn, params), 50, k=5, num_iters=30)
    np.testing.assert_allclose(top, TOP, rtol=1e-4)
    # Ritz vectors are eigenvectors
    res = analysis.lanczos(op, 50, k=2, num_iters=50, return_vectors=True)
    for lam, vec in zip(res.eigenvalues, res.eigenvectors):
        th.testing.assert_close(a @ vec, lam * vec, rtol=0, atol=1e-8)
    # the full space: Lanczos stops at dim and recovers everything
    res = analysis.lanczos(op, 50, k=50, num_iters=80)
    np.testing.assert_allclose(np.sort(res.ritz_values), np.sort(th.linalg.eigvalsh(a).numpy()), atol=1e-8)


def test_power_iteration_finds_top_eigenvalue():
    a, _, _ = _quadratic()
    lam, vec, iters = analysis.power_iteration(lambda v: a @ v, 50, iters=1000, tol=1e-12)
    assert lam == pytest.approx(10.0, rel=1e-4)
    assert iters < 1000
    th.testing.assert_close((a @ vec).norm(), th.tensor(lam, dtype=th.float64), rtol=1e-4, atol=0)
    # the dominant eigenvalue in magnitude, with its sign
    lam, _, _ = analysis.power_iteration(lambda v: -(a @ v), 50, iters=1000, tol=1e-12)
    assert lam == pytest.approx(-10.0, rel=1e-4)


def test_spectral_density_is_normalised_and_peaks_at_eigenvalues():
    dim = 40
    eig = th.tensor([1.0] * 20 + [5.0] * 20, dtype=th.float64)
    op = lambda v: eig * v  # noqa: E731
    out = analysis.spectral_density(op, dim, num_iters=10, num_runs=4, sigma=0.1)
    assert np.trapezoid(out["density"], out["grid"]) == pytest.approx(1.0, abs=1e-3)
    mass_low = out["density"][out["grid"] < 3].sum() / out["density"].sum()
    assert 0.2 < mass_low < 0.8  # two atoms of equal mass, estimated from 4 probes
    peaks = out["grid"][np.argsort(out["density"])[-1]]
    assert min(abs(peaks - 1.0), abs(peaks - 5.0)) < 0.05


# ----------------------------------------------------------------------------------------
# Interpolation of state dicts
# ----------------------------------------------------------------------------------------


def test_interpolate_state_dicts_lerps_floats_and_keeps_int_buffers():
    sd_a = {"w": th.tensor([0.0, 1.0]), "n": th.tensor(3), "h": th.tensor([1.0], dtype=th.float16)}
    sd_b = {"w": th.tensor([2.0, 5.0]), "n": th.tensor(7), "h": th.tensor([3.0], dtype=th.float16)}
    mid = analysis.interpolate_state_dicts(sd_a, sd_b, 0.25)
    th.testing.assert_close(mid["w"], th.tensor([0.5, 2.0]))
    assert mid["n"].item() == 3
    assert mid["h"].dtype == th.float16 and mid["h"].item() == 1.5
    ext = analysis.interpolate_state_dicts(sd_a, sd_b, -0.5)
    th.testing.assert_close(ext["w"], th.tensor([-1.0, -1.0]))
    rng = th.Generator().manual_seed(0)
    x, y = th.randn(100, generator=rng), th.randn(100, generator=rng)
    assert th.equal(analysis.interpolate_state_dicts({"x": x}, {"x": y}, 0.0)["x"], x)
    assert th.equal(analysis.interpolate_state_dicts({"x": x}, {"x": y}, 1.0)["x"], y)


def test_interpolate_state_dicts_refuses_other_architecture():
    sd_a = {"conv.weight": th.zeros(4, 3), "a.bias": th.zeros(4), "only_a": th.zeros(1)}
    sd_b = {"conv.weight": th.zeros(8, 3), "a.bias": th.zeros(4), "only_b": th.zeros(1)}
    with pytest.raises(ValueError) as err:
        analysis.interpolate_state_dicts(sd_a, sd_b, 0.5)
    msg = str(err.value)
    assert "conv.weight" in msg and "[4, 3]" in msg and "[8, 3]" in msg
    assert "only_a" in msg and "only_b" in msg and "a.bias" not in msg
