"""
improved_diffusion/evaluation/evaluator.py: the one evaluator of the training loop, scripts/fid.py and
the study gives the numbers of a direct computation (sampling, features, metrics), bit for bit.
"""

import os

import numpy as np
import pytest
import torch

from improved_diffusion.options import config
from improved_diffusion.evaluation import fid, metrics, sampling
from improved_diffusion.evaluation.evaluator import Evaluator, Sampling, for_training
from improved_diffusion.script_util import create_diffusion_from_options, create_model_and_diffusion
from test_metrics import PooledAndSpatial

TINY = dict(config.defaults(*config.MODEL_GROUPS), image_size=8, num_channels=32, num_res_blocks=1,
            channel_mult="1,2", attention_resolutions="", diffusion_steps=20)


def tiny_model():
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**TINY)
    return model.eval()


def reference_file(tmp_path, network):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    pool, spatial = fid.compute_features(images, network, 16, "cpu", spatial=True)
    path = str(tmp_path / "ref.npz")
    metrics.save_reference(path, pool, spatial)
    return path


def test_metrics_of_a_tiny_model_equal_a_direct_computation(tmp_path):
    network = fid.FeatureExtractor(PooledAndSpatial().eval(), input_size=5).eval()
    ref = reference_file(tmp_path, network)
    wanted = ("fid", "sfid", "precision", "recall", "kid")
    spec = Sampling(TINY, "ddim4", num_samples=10, batch_size=4, seed=3)
    evaluator = Evaluator(ref, wanted, sampling=spec, device="cpu", networks={"inception": network},
                          kid_subsets=5, kid_subset_size=5, log_dir=str(tmp_path / "run"))
    model = tiny_model()
    result = evaluator(model, step=7)

    # The same by hand: DDIM samples seeded per index, features, then metrics.evaluate.
    diffusion = create_diffusion_from_options(TINY, timestep_respacing="ddim4")
    images, _ = sampling.sample_images(model, diffusion, num_samples=10, batch_size=4, image_size=8, device="cpu",
                                       seed=3, use_ddim=True, progress=False)
    pool, spatial = fid.compute_features(images, network, 64, "cpu", spatial=True)
    direct = metrics.evaluate(pool, metrics.load_reference(ref), wanted, spatial=spatial, kid_subsets=5,
                              kid_subset_size=5, device="cpu")
    direct.pop("kid_std")
    assert result == direct  # bitwise: the same computation
    assert os.path.isfile(tmp_path / "run" / "samples" / "step_000007.png")
    assert np.array_equal(evaluator.sample(model), images)  # a sample depends only on (seed, index)
    assert not np.array_equal(evaluator.sample(model, seed=4), images)
    # FID equals the study's former path, fid_of_samples against the statistics file
    assert result["fid"] == fid.fid_of_samples(images, ref, network, device="cpu")


def test_scoring_given_images_and_errors(tmp_path):
    network = fid.FeatureExtractor(PooledAndSpatial().eval(), input_size=5).eval()
    ref = reference_file(tmp_path, network)
    images = np.random.default_rng(1).integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    evaluator = Evaluator(metrics.load_reference(ref), ("fid", "kid"), networks={"inception": network},
                          kid_subsets=3, kid_subset_size=6)
    result = evaluator.score(images)
    assert set(result) == {"fid", "kid", "kid_std"} and result["fid"] > 0
    with pytest.raises(ValueError, match="no Sampling"):
        evaluator.sample(tiny_model())
    with pytest.raises(ValueError, match="no reference"):
        Evaluator().score(images)


def test_for_training_checks_its_flags_before_any_training(tmp_path):
    network = fid.FeatureExtractor(PooledAndSpatial().eval(), input_size=5).eval()
    ref = reference_file(tmp_path, network)
    opts = dict(config.defaults(), eval_ref_stats=ref, eval_metrics="fid,precision", eval_num_samples=3)
    with pytest.raises(ValueError, match="--eval_num_samples of at least 4"):
        for_training(opts, TINY, "fp32", "cpu", None, str(tmp_path))
    with pytest.raises(ValueError, match="--eval_metrics"):
        for_training(dict(opts, eval_metrics="fid,is"), TINY, "fp32", "cpu", None, str(tmp_path))
    with pytest.raises(ValueError, match="--eval_ref_stats"):
        for_training(dict(opts, eval_ref_stats="", eval_num_samples=8), TINY, "fp32", "cpu", None, str(tmp_path))
    old = tmp_path / "old.npz"
    fid.save_statistics(str(old), np.zeros(6), np.eye(6), 10)
    with pytest.raises(ValueError, match="old.npz"):
        for_training(dict(opts, eval_ref_stats=str(old), eval_num_samples=8), TINY, "fp32", "cpu", None, str(tmp_path))
    ev = for_training(dict(opts, eval_num_samples=8, seed=5, precision="bf16"), TINY, "bf16", "cpu", 10, str(tmp_path))
    assert ev.sampling.seed == 5 and ev.sampling.num_classes == 10 and ev.sampling.autocast_dtype == torch.bfloat16
    assert ev.wanted == ("fid", "precision") and ev.sampling.respacing == opts["eval_respacing"]


def test_tool_option_defaults_match_the_package():
    assert config.TOOLS["fid"]["keep_features"].default == metrics.DEFAULT_KEEP_FEATURES
