"""
Tests of the consistency-phenomenon analysis tools (improved_diffusion/experiments/analysis.py) and of
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

from improved_diffusion.experiments import analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A UNet small enough for CPU tests (GroupNorm32 needs channels divisible by 32; 20 steps of
# the linear schedule would reach beta = 1, so cosine).
TINY_FLAGS = {
    "image_size": 8,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1",
    "attention_resolutions": "",
    "diffusion_steps": 20,
    "noise_schedule": "cosine",
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these small ops are faster so, and robust to a busy machine."""
    saved = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(saved)


def _flag_list(flags):
    out = []
    for k, v in flags.items():
        out += [f"--{k}", str(v)]
    return out


def _tiny_model_and_diffusion(seed=0, scale=0.2, **overrides):
    """A tiny UNet with its weights moved off the initialisation (whose zeroed output layer
    makes every model predict 0), in eval mode."""
    script_util = pytest.importorskip("improved_diffusion.script_util")
    args = script_util.model_and_diffusion_defaults()
    args.update(TINY_FLAGS)
    args.update(overrides)
    th.manual_seed(seed)
    model, diffusion = script_util.create_model_and_diffusion(**args)
    gen = th.Generator().manual_seed(seed + 1000)
    with th.no_grad():
        for p in model.parameters():
            p.add_(scale * th.randn(p.shape, generator=gen))
    return model.eval(), diffusion


def _images(n=8, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


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
    rest = th.linspace(-1.5, 1.5, dim - len(TOP), dtype=th.float64)
    eig = th.cat([th.tensor(TOP, dtype=th.float64), rest])
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
    hvp_fn = analysis.make_hvp_fn(loss_fn, params)
    top = analysis.lanczos_top_eigenvalues(hvp_fn, 50, k=5, num_iters=30)
    np.testing.assert_allclose(top, TOP, rtol=1e-4)
    # Ritz vectors are eigenvectors
    res = analysis.lanczos(op, 50, k=2, num_iters=50, return_vectors=True)
    for lam, vec in zip(res.eigenvalues, res.eigenvectors):
        th.testing.assert_close(a @ vec, lam * vec, rtol=0, atol=1e-8)
    # the full space: Lanczos stops at dim and recovers everything
    res = analysis.lanczos(op, 50, k=50, num_iters=80)
    exact = np.sort(th.linalg.eigvalsh(a).numpy())
    np.testing.assert_allclose(np.sort(res.ritz_values), exact, atol=1e-8)


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


def test_fixed_loss_inputs_are_reproducible():
    _, diffusion = _tiny_model_and_diffusion()
    images = _images()
    x, t, noise = analysis.fixed_loss_inputs(diffusion, images, 4, seed=3)
    x2, t2, noise2 = analysis.fixed_loss_inputs(diffusion, images, 4, seed=3)
    assert th.equal(t, t2) and th.equal(noise, noise2) and th.equal(x, x2)
    assert x.shape == (4, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    th.testing.assert_close(x[1, :, 2, 5], th.from_numpy(images[1, 2, 5]).float() / 127.5 - 1)
    assert t.min() >= 0 and t.max() < diffusion.num_timesteps
    _, t3, _ = analysis.fixed_loss_inputs(diffusion, images, 4, seed=3, timestep=7)
    assert t3.tolist() == [7] * 4


def test_interpolation_endpoints_reproduce_checkpoint_losses():
    model_a, diffusion = _tiny_model_and_diffusion(seed=0, dropout=0.3)
    model_b, _ = _tiny_model_and_diffusion(seed=1, dropout=0.3)
    sd_a = {k: v.clone() for k, v in model_a.state_dict().items()}
    sd_b = {k: v.clone() for k, v in model_b.state_dict().items()}
    x, t, noise = analysis.fixed_loss_inputs(diffusion, _images(), 4, seed=0)

    def endpoint_loss(model):
        with th.no_grad():
            return analysis.diffusion_loss_fn(model, diffusion, x, t, noise)().item()

    loss_a, loss_b = endpoint_loss(model_a), endpoint_loss(model_b)
    assert loss_a != loss_b
    model_b.train()  # dropout on: the helper must switch it off, then restore the mode
    losses = analysis.interpolation_losses(
        model_b, diffusion, sd_a, sd_b, [0.0, 0.5, 1.0], x, t, noise, {}
    )
    assert losses[0] == loss_a and losses[2] == loss_b
    assert math.isfinite(losses[1]) and losses[1] not in (loss_a, loss_b)
    assert model_b.training
    for k, v in model_b.state_dict().items():  # the model's own weights are back
        assert th.equal(v, sd_b[k])
    assert analysis.interpolate_losses is analysis.interpolation_losses


def test_interpolation_refuses_other_architecture():
    model_a, diffusion = _tiny_model_and_diffusion()
    model_c, _ = _tiny_model_and_diffusion(num_res_blocks=2)
    x, t, noise = analysis.fixed_loss_inputs(diffusion, _images(), 2, seed=0)
    with pytest.raises(ValueError, match=r"keys only in model b: input_blocks\.2\."):
        analysis.interpolation_losses(
            model_a, diffusion, model_a.state_dict(), model_c.state_dict(), [0.5], x, t, noise
        )


def test_lanczos_and_power_iteration_agree_on_tiny_unet():
    model, diffusion = _tiny_model_and_diffusion()
    x, t, noise = analysis.fixed_loss_inputs(diffusion, _images(), 4, seed=0)
    params = list(model.parameters())
    hvp_fn = analysis.make_hvp_fn(analysis.diffusion_loss_fn(model, diffusion, x, t, noise), params)
    assert hvp_fn.dim == sum(p.numel() for p in params)
    # symmetric operator: <u, H v> = <H u, v>
    gen = th.Generator().manual_seed(5)
    u = th.randn(hvp_fn.dim, generator=gen, dtype=th.float64)
    v = th.randn(hvp_fn.dim, generator=gen, dtype=th.float64)
    assert th.dot(u, hvp_fn(v)).item() == pytest.approx(th.dot(hvp_fn(u), v).item(), rel=1e-4)
    top = analysis.lanczos(hvp_fn, hvp_fn.dim, k=3, num_iters=20, which="LM").eigenvalues
    lam, _, iters = analysis.power_iteration(hvp_fn, hvp_fn.dim, iters=300, tol=1e-7)
    assert iters < 300
    assert lam == pytest.approx(top[0], rel=1e-3)


# ----------------------------------------------------------------------------------------
# The scripts, end to end on tiny checkpoints
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Three tiny checkpoints (a and b of one architecture, c with 2 res blocks) and data."""
    pytest.importorskip("improved_diffusion.script_util")
    pytest.importorskip("improved_diffusion.evaluation.sampling")
    root = tmp_path_factory.mktemp("analysis")
    saved = th.get_num_threads()
    th.set_num_threads(1)
    for name, seed, over in [("a", 0, {}), ("b", 1, {}), ("c", 2, {"num_res_blocks": 2})]:
        model, _ = _tiny_model_and_diffusion(seed=seed, scale=0.05, **over)
        th.save(model.state_dict(), root / f"{name}.pt")
    th.set_num_threads(saved)
    np.savez(root / "data.npz", arr_0=_images(8))
    return root


def _run_script(name, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", name), *map(str, args)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    return proc


def test_consistency_script(tiny_run):
    out = tiny_run / "cons"
    proc = _run_script(
        "consistency.py", "--model_paths", f"{tiny_run}/a.pt,{tiny_run}/b.pt,{tiny_run}/c.pt",
        *_flag_list(TINY_FLAGS), "--model_flags", "--num_res_blocks 1", "--num_res_blocks 1",
        "--num_res_blocks 2", "--names", "a,b,c", "--num_samples", 3, "--batch_size", 2,
        "--use_ddim", True, "--timestep_respacing", "ddim10", "--out", out,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "consistency.json").read_text())
    assert res["num_models"] == 3 and res["num_images"] == 3 and len(res["pairs"]) == 3
    assert res["C"] == pytest.approx(np.mean([p["psnr"] for p in res["pairs"]]))
    assert [m["flags"]["num_res_blocks"] for m in res["models"]] == [1, 1, 2]
    assert (out / "consistency.png").stat().st_size > 0
    # the saved samples are what was measured
    sets = [np.load(out / f"samples_{n}.npz")["arr_0"] for n in range(3)]
    assert sets[0].shape == (3, 8, 8, 3) and sets[0].dtype == np.uint8
    assert res["pairs"][1]["psnr"] == pytest.approx(float(np.mean(analysis.psnr(sets[0], sets[2]))))


def test_interpolate_script(tiny_run):
    out = tiny_run / "interp"
    common = [*_flag_list(TINY_FLAGS), "--data_dir", tiny_run / "data.npz", "--batch_size", 4]
    proc = _run_script(
        "interpolate.py", "--model_a", tiny_run / "a.pt", "--model_b", tiny_run / "b.pt",
        *common, "--alphas=-0.5,0,0.5,1,1.5", "--out", out,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "interpolation.json").read_text())
    assert res["alphas"] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert res["losses"][1] == res["loss_a"] and res["losses"][3] == res["loss_b"]
    assert (out / "interpolation.png").stat().st_size > 0
    proc = _run_script(
        "interpolate.py", "--model_a", tiny_run / "a.pt", "--model_b", tiny_run / "c.pt",
        *common, "--alpha_min", -1, "--alpha_max", 2, "--num_alphas", 4,
        "--out", tiny_run / "interp_bad",
    )
    assert proc.returncode != 0
    assert "different architectures" in proc.stderr and "input_blocks.2." in proc.stderr


def test_interpolate_default_alpha_grid():
    import importlib.util

    path = os.path.join(REPO, "scripts", "interpolate.py")
    spec = importlib.util.spec_from_file_location("interpolate_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    grid = script.parse_alphas("")
    assert len(grid) == 21 and grid[0] == -0.5 and grid[-1] == 1.5
    assert 0.0 in grid and 1.0 in grid
    assert script.parse_alphas("0, 0.25,1") == [0.0, 0.25, 1.0]


def test_hessian_script(tiny_run):
    out = tiny_run / "hess"
    proc = _run_script(
        "hessian.py", "--model_path", tiny_run / "a.pt", *_flag_list(TINY_FLAGS),
        "--data_dir", tiny_run / "data.npz", "--batch_size", 2, "--top_k", 3, "--iters", 12,
        "--method", "both", "--power_iters", 5, "--density", True, "--density_iters", 8,
        "--out", out,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "hessian.json").read_text())
    top = res["eigenvalues"]
    assert len(top) == 3 and top[0] >= top[1] >= top[2]
    assert res["ratio_1_k"] == pytest.approx(top[0] / top[2])
    assert res["power"]["iters"] <= 5 and res["num_params"] > 0
    assert len(res["density"]["grid"]) == len(res["density"]["density"])
    assert (out / "hessian.png").stat().st_size > 0
