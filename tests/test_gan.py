"""
Tests of the DCGAN contrast (improved_diffusion/experiments/gan.py, scripts/gan_train.py) and of the
analysis tools on GANs (scripts/consistency.py, interpolate.py, hessian.py).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch as th

from improved_diffusion.experiments import analysis, gan
from tiny import assert_identical

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

TINY = ["--latent_dim", "8", "--g_width", "8", "--d_width", "8", "--batch_size", "8", "--log_interval", "2"]


@pytest.fixture(autouse=True)
def one_thread():
    saved = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(saved)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """48 random 8x8 RGB images as an .npz."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, arr_1=np.zeros(48, np.int64))
    return str(path)


def _train(data, log_dir, steps, *extra):
    import gan_train

    gan_train.main(["--data_dir", data, "--log_dir", str(log_dir), "--total_steps", str(steps),
                    "--save_interval", "3", *TINY, *extra])


def test_networks_shapes_and_levels():
    for size in (8, 16, 32):
        g, d = gan.create_gan({"latent_dim": 5, "g_width": 4, "d_width": 4, "image_size": size})
        x = g(th.randn(3, 5))
        assert x.shape == (3, 3, size, size) and x.abs().max() <= 1
        assert d(x).shape == (3,)
    with pytest.raises(ValueError, match="power-of-two"):
        gan.num_levels(12)


def test_batch_statistics_leaves_running_averages():
    g, d = gan.create_gan({"latent_dim": 4, "g_width": 4, "d_width": 4, "image_size": 8})
    g.eval()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    losses = gan.gan_losses(g, d, th.rand(6, 3, 8, 8) * 2 - 1, th.randn(6, 4))
    assert set(losses) == {"generator", "discriminator"}
    assert_identical(before, g.state_dict())
    assert not g.training and d.training  # each module's mode is restored


def test_train_resumes_bitwise(data, tmp_path):
    """N steps, then N more from the checkpoint, equal 2N steps in one go, bit for bit."""
    _train(data, tmp_path / "once", 6)
    _train(data, tmp_path / "twice", 3)
    assert sorted(os.listdir(tmp_path / "twice")).count("gan000003.pt") == 1
    _train(data, tmp_path / "twice", 6)
    for name in ("gan000006.pt", "gan_opt000006.pt"):
        a = th.load(tmp_path / "once" / name, weights_only=True)
        b = th.load(tmp_path / "twice" / name, weights_only=True)
        assert_identical(a, b, name)
    sa = th.load(tmp_path / "once" / "state000006.pt", weights_only=True)
    sb = th.load(tmp_path / "twice" / "state000006.pt", weights_only=True)
    assert_identical(sa["rank"], sb["rank"], "rank state")
    assert os.path.isfile(tmp_path / "twice" / "samples.png")
    with open(tmp_path / "twice" / gan.GAN_CONFIG) as f:
        assert json.load(f)["image_size"] == 8


def test_train_rejects_other_networks_in_run(data, tmp_path):
    _train(data, tmp_path / "run", 3)
    with pytest.raises(ValueError, match="other networks"):
        _train(data, tmp_path / "run", 6, "--g_width", "16")


def test_train_error_lines(tmp_path):
    out = subprocess.run([sys.executable, "scripts/gan_train.py", "--data_dir", str(tmp_path / "none.npz"),
                          "--log_dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("error: --data_dir") and "Traceback" not in out.stderr


def test_consistency_same_seed_is_capped(data, tmp_path, capsys):
    """Two runs of the same seed make identical images: C is the cap, and says so."""
    import consistency

    _train(data, tmp_path / "a", 3)
    _train(data, tmp_path / "b", 3)
    _train(data, tmp_path / "c", 3, "--seed", "1")
    capsys.readouterr()
    out = tmp_path / "cons"
    consistency.main(["--model_paths", f"{tmp_path}/a/gan000003.pt,gan:{tmp_path}/b/gan000003.pt,"
                      f"{tmp_path}/c/gan000003.pt", "--names", "a,b,c", "--num_samples", "5",
                      "--batch_size", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    with open(out / "consistency.json") as f:
        result = json.load(f)
    ab = result["pairs"][0]
    assert (ab["name_i"], ab["name_j"]) == ("a", "b")
    assert ab["psnr"] == analysis.PSNR_CAP_DB and ab["capped"] == 5
    assert result["capped"] == 5 and result["kinds"] == ["gan"] * 3
    assert result["pairs"][1]["psnr"] < 60 and result["pairs"][1]["capped"] == 0
    assert "a vs b: 100.00 dB (capped)" in printed and "(5 identical image pairs capped" in printed
    assert os.path.isfile(out / "consistency.png") and os.path.isfile(out / "samples_2.npz")


def test_same_latents_any_batch_size():
    z1 = gan.sample_latents(5, 7, seed=3)
    assert th.equal(z1[:2], gan.sample_latents(2, 7, seed=3))
    g, _ = gan.create_gan({"latent_dim": 7, "g_width": 4, "d_width": 4, "image_size": 8})
    np.testing.assert_array_equal(gan.generate(g, z1, batch_size=2), gan.generate(g, z1, batch_size=5))


@pytest.mark.parametrize("player", ["generator", "discriminator"])
def test_gan_hessian_lanczos_agrees_with_power_iteration(player):
    th.manual_seed(0)
    g, d = gan.create_gan({"latent_dim": 4, "g_width": 4, "d_width": 4, "image_size": 8})
    images = np.random.default_rng(1).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    real, z = analysis.fixed_gan_inputs(images, 16, 4, seed=2)
    net = g if player == "generator" else d
    params = list(net.parameters())
    hvp_fn = analysis.make_hvp_fn(analysis.gan_loss_fn(g, d, real, z, player), params)
    res = analysis.lanczos(hvp_fn, hvp_fn.dim, k=3, num_iters=60, which="LM")
    lam, _, _ = analysis.power_iteration(hvp_fn, hvp_fn.dim, iters=2000, tol=1e-10)
    assert lam == pytest.approx(res.eigenvalues[0], rel=1e-4)
    # and both agree with the dense Hessian's eigenvalue of largest magnitude
    flat = analysis.flat_params(params)
    dense = th.stack([hvp_fn(e) for e in th.eye(hvp_fn.dim, dtype=th.float64)])
    evals = np.linalg.eigvalsh(((dense + dense.T) / 2).numpy())
    assert lam == pytest.approx(evals[np.argmax(np.abs(evals))], rel=1e-4)
    assert flat.numel() == hvp_fn.dim


def test_gan_interpolation_endpoints_exact():
    th.manual_seed(0)
    arch = {"latent_dim": 4, "g_width": 4, "d_width": 4, "image_size": 8}
    g, d = gan.create_gan(arch)
    a = {"generator": g.state_dict(), "discriminator": d.state_dict()}
    a = {k: {n: v.clone() for n, v in sd.items()} for k, sd in a.items()}
    g2, d2 = gan.create_gan(arch)
    b = {"generator": g2.state_dict(), "discriminator": d2.state_dict()}
    real, z = analysis.fixed_gan_inputs(np.zeros((8, 8, 8, 3), np.uint8), 8, 4)
    curves = analysis.gan_interpolation_losses(g, d, a, b, [0.0, 0.5, 1.0], real, z)
    at_a = gan.gan_losses(g, d, real, z)
    at_b = gan.gan_losses(g2, d2, real, z)
    for player in ("generator", "discriminator"):
        assert curves[player][0] == at_a[player].item()
        assert curves[player][2] == at_b[player].item()
    r = analysis.curve_roughness([-1, 0, 0.5, 1, 2], [3, 1, 2, 1, 3])
    assert r["barrier"] == 1.0 and r["direction_changes"] == 3


def test_scripts_on_gan_checkpoints(data, tmp_path):
    _train(data, tmp_path / "run", 6)
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "scripts/interpolate.py", "--model_a", f"{run}/gan000003.pt", "--model_b",
         f"{run}/gan000006.pt", "--data_dir", data, "--batch_size", "8", "--num_alphas", "5",
         "--out", str(tmp_path / "interp")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "interp" / "interpolation.json") as f:
        result = json.load(f)
    assert result["kind"] == "gan" and set(result["curves"]) == {"generator", "discriminator"}
    assert result["curves"]["generator"][1] == result["endpoints"]["generator"][0]  # alpha = 0
    out = subprocess.run(
        [sys.executable, "scripts/hessian.py", "--model_path", f"{run}/gan000006.pt", "--gan_loss",
         "discriminator", "--data_dir", data, "--batch_size", "8", "--top_k", "2", "--iters", "6",
         "--out", str(tmp_path / "hess")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "hess" / "hessian.json") as f:
        result = json.load(f)
    assert result["kind"] == "gan" and result["gan_loss"] == "discriminator"
    assert result["num_params"] == gan.count_params(gan.load_gan(f"{run}/gan000006.pt")[1])
    out = subprocess.run(
        [sys.executable, "scripts/hessian.py", "--compare", f"{tmp_path}/hess/hessian.json,"
         f"{tmp_path}/hess/hessian.json", "--names", "x,y", "--out", str(tmp_path / "cmp")],
        cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.path.isfile(tmp_path / "cmp" / "hessian_compare.png")
