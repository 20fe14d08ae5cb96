"""
Grey (1), RGB (3) and RGBA (4) images end to end: the loader, the model's input and output,
sampling, the FID feature extractor, and the errors when data, flags and checkpoint disagree.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from improved_diffusion.evaluation import fid
from improved_diffusion.image_datasets import center_crop_arr, load_image_dataset
from improved_diffusion.evaluation.sampling import image_channels_of, sample_images
from improved_diffusion.script_util import create_model_and_diffusion
from tiny import TINY_MODEL, flags, run_script


def channel_images(n, size, channels, seed=0):
    """Smooth random uint8 NHWC images with `channels` channels."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(n, 1, 1, channels))
    ramp = np.linspace(0, 50, size)[None, :, None, None]
    noise = rng.normal(0, 8, size=(n, size, size, channels))
    return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Loader


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_image_files_are_converted_to_the_channel_count(tmp_path, channels, mode):
    rng = np.random.default_rng(1)
    sources = {
        "a_rgb.png": Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), "RGB"),
        "b_grey.png": Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8), "L"),
        "c_rgba.png": Image.fromarray(rng.integers(0, 256, (10, 10, 4), dtype=np.uint8), "RGBA"),
    }
    for name, image in sources.items():
        image.save(tmp_path / name)
    ds = load_image_dataset(str(tmp_path), 8, image_channels=channels)
    assert ds.images.shape == (3, 8, 8, channels) and ds.channels == channels
    for i, name in enumerate(sorted(sources)):
        expected = center_crop_arr(Image.open(tmp_path / name).convert(mode), 8).reshape(8, 8, channels)
        assert np.array_equal(ds.images[i], expected), name


# ---------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_model_takes_and_gives_image_channels(channels, learn_sigma):
    opts = dict(TINY_MODEL, learn_sigma=learn_sigma, image_channels=channels)
    model, _ = create_model_and_diffusion(**opts)
    x = torch.randn(2, channels, 8, 8)
    out = model(x, torch.tensor([1, 5]))
    assert out.shape == (2, channels * (2 if learn_sigma else 1), 8, 8)
    assert image_channels_of(model) == channels
    assert image_channels_of(torch.nn.Sequential(model)) == channels  # found inside a wrapper


def test_rgb_model_is_the_default_one():
    """Leaving --image_channels out builds exactly the model it builds with 3 (the original)."""
    torch.manual_seed(0)
    default, _ = create_model_and_diffusion(**TINY_MODEL)
    torch.manual_seed(0)
    explicit, _ = create_model_and_diffusion(**TINY_MODEL, image_channels=3)
    a, b = default.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["input_blocks.0.0.weight"].shape[1] == 3 and a["out.2.weight"].shape[0] == 6


@pytest.mark.parametrize("channels", [1, 4])
def test_samples_have_the_models_channels(channels):
    model, diffusion = create_model_and_diffusion(
        **dict(TINY_MODEL, image_channels=channels, timestep_respacing="4"))
    images, _ = sample_images(model, diffusion, num_samples=3, batch_size=2, image_size=8, device="cpu",
                              progress=False, rank=0, world_size=1)
    assert images.shape == (3, 8, 8, channels) and images.dtype == np.uint8


# ---------------------------------------------------------------------------------------
# FID's input


class MeanColourFeatures(nn.Module):
    """A stand-in for Inception that sees each input channel separately."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), (x ** 2).mean(dim=(2, 3))], dim=1)


def test_grey_reaches_inception_as_three_equal_channels_and_rgba_without_alpha():
    extractor = fid.FeatureExtractor(MeanColourFeatures(), input_size=16)
    grey = channel_images(5, 8, 1)
    rgba = channel_images(5, 8, 4, seed=2)
    assert torch.equal(extractor(grey), extractor(np.repeat(grey, 3, axis=-1)))
    assert torch.equal(extractor(rgba), extractor(np.ascontiguousarray(rgba[..., :3])))
    features = extractor(grey)
    assert torch.equal(features[:, 0], features[:, 1]) and torch.equal(features[:, 1], features[:, 2])
    with pytest.raises(ValueError, match="C 1, 3 or 4"):
        extractor(channel_images(2, 8, 2))


# ---------------------------------------------------------------------------------------
# End to end: train, resume, sample, score


class ScriptedFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 23, stride=23)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def _train(data, log_dir, channels, total_steps, extra=()):
    opts = dict(TINY_MODEL, data_dir=data, log_dir=log_dir, batch_size=4, log_interval=2, save_interval=2,
                total_steps=total_steps, seed=3)
    if channels is not None:
        opts["image_channels"] = channels
    return run_script("image_train.py", flags(opts) + list(extra))


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("channels", [1, 4])
def test_grey_and_rgba_runs_train_resume_sample_and_score(tmp_path, channels):
    data = str(tmp_path / "data.npz")
    np.savez(data, arr_0=channel_images(16, 8, channels))
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train(data, whole, channels, 4)
    _train(data, split, channels, 4, ["--stop_at", "2"])  # leaves at step 2 ...
    assert not (split / "model000004.pt").exists()
    _train(data, split, channels, 4)  # ... and resumes to 4
    for name in ("model000004.pt", "ema_0.9999_000004.pt"):
        a, b = _weights(whole / name), _weights(split / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((whole / "config.json").read_text())["image_channels"] == channels

    # Sampling reads the channel count from the run's config.json.
    out = tmp_path / "samples.npz"
    run_script("image_sample.py", ["--model_path", whole / "ema_0.9999_000004.pt", "--num_samples", 5,
                                   "--batch_size", 5, "--timestep_respacing", "4", "--out", out])
    samples = np.load(out)["arr_0"]
    assert samples.shape == (5, 8, 8, channels) and samples.dtype == np.uint8
    grid = Image.open(str(out)[: -len(".npz")] + "_grid.png")
    assert grid.mode == ("RGBA" if channels == 4 else "RGB")

    torch.manual_seed(0)
    net = str(tmp_path / "features.pt")
    torch.jit.script(ScriptedFeatures().eval()).save(net)
    ref = tmp_path / "ref.npz"
    run_script("fid.py", ["ref", "--source", data, "--out", ref, "--inception", net, "--device", "cpu"])
    proc = run_script("fid.py", ["fid", "--samples", out, "--ref", ref, "--inception", net, "--device", "cpu",
                                 "--metrics", "fid"])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_samples"] == 5 and np.isfinite(result["fid"]) and result["fid"] >= 0


@pytest.mark.slow
def test_rgb_run_is_the_same_with_and_without_the_flag(tmp_path):
    data = str(tmp_path / "data.npz")
    np.savez(data, arr_0=channel_images(16, 8, 3))
    _train(data, tmp_path / "default", None, 2)
    _train(data, tmp_path / "explicit", 3, 2)
    a, b = _weights(tmp_path / "default" / "model000002.pt"), _weights(tmp_path / "explicit" / "model000002.pt")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------
# Disagreements are refused, naming both counts


def test_data_and_flag_disagree(tmp_path):
    data = str(tmp_path / "grey.npz")
    np.savez(data, arr_0=channel_images(8, 8, 1)[..., 0])  # (N, H, W): grey
    proc = _train_unchecked(data, tmp_path / "run", 3)
    assert proc.returncode != 0
    assert "1 channel(s) but --image_channels is 3" in proc.stderr and "--image_channels 1" in proc.stderr


def _train_unchecked(data, log_dir, channels):
    opts = dict(TINY_MODEL, data_dir=data, log_dir=log_dir, batch_size=4, total_steps=1, image_channels=channels)
    return run_script("image_train.py", flags(opts), check=False)


def test_checkpoint_and_flag_disagree(tmp_path):
    model, _ = create_model_and_diffusion(**dict(TINY_MODEL, image_channels=1))
    ckpt = tmp_path / "grey_model.pt"  # no config.json beside it: the flags say what it is
    torch.save(model.state_dict(), ckpt)
    proc = run_script("image_sample.py", flags(TINY_MODEL) + ["--model_path", ckpt, "--num_samples", 1,
                                                               "--batch_size", 1], check=False)
    assert proc.returncode == 2
    assert "the checkpoint is for 1-channel images, the model for 3 (--image_channels 3)" in proc.stderr


def test_resume_with_other_channels_is_refused(tmp_path):
    grey = str(tmp_path / "grey.npz")
    np.savez(grey, arr_0=channel_images(8, 8, 1))
    rgb = str(tmp_path / "rgb.npz")
    np.savez(rgb, arr_0=channel_images(8, 8, 3))
    _train(grey, tmp_path / "run", 1, 1)
    proc = _train_unchecked(rgb, tmp_path / "run", 3)
    assert proc.returncode != 0
    assert "the checkpoint is for 1-channel images, the model for 3 (--image_channels 3)" in proc.stderr
    # Nothing lost: the checkpoint is there and the run's config.json still describes it.
    assert os.path.exists(tmp_path / "run" / "model000001.pt")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_channels"] == 1


@pytest.mark.slow
def test_analysis_tools_on_grey_diffusion_and_gan_runs(tmp_path):
    """consistency, interpolate and hessian on grey models: diffusion (channels from the run's
    config.json) beside a DCGAN (channels from its data)."""
    data = str(tmp_path / "grey.npz")
    np.savez(data, arr_0=channel_images(16, 8, 1))
    _train(data, tmp_path / "a", 1, 2)
    _train(data, tmp_path / "b", 1, 2, ["--seed", "4"])
    run_script("gan_train.py", ["--data_dir", data, "--log_dir", tmp_path / "gan", "--total_steps", 2,
                                "--save_interval", 1, "--batch_size", 8, "--latent_dim", 4, "--g_width", 4,
                                "--d_width", 4])
    assert json.loads((tmp_path / "gan" / "gan_config.json").read_text())["channels"] == 1
    a, b = tmp_path / "a" / "ema_0.9999_000002.pt", tmp_path / "b" / "ema_0.9999_000002.pt"
    gan_ckpt = tmp_path / "gan" / "gan000002.pt"
    run_script("consistency.py", ["--model_paths", f"{a},{b},{gan_ckpt}", "--names", "a,b,gan", "--num_samples", 3,
                                  "--batch_size", 3, "--timestep_respacing", "4", "--out", tmp_path / "cons"])
    pairs = json.loads((tmp_path / "cons" / "consistency.json").read_text())["pairs"]
    assert {(p["name_i"], p["name_j"]) for p in pairs} >= {("a", "b"), ("a", "gan")}
    run_script("interpolate.py", ["--model_a", a, "--model_b", b, "--data_dir", data, "--batch_size", 4,
                                  "--num_alphas", 3, "--out", tmp_path / "interp"])
    assert json.loads((tmp_path / "interp" / "interpolation.json").read_text())["curves"]
    run_script("interpolate.py", ["--model_a", tmp_path / "gan" / "gan000001.pt", "--model_b", gan_ckpt,
                                  "--data_dir", data, "--batch_size", 4, "--num_alphas", 3, "--out", tmp_path / "gi"])
    for model in (["--model_path", a], ["--model_path", gan_ckpt, "--gan_loss", "generator"]):
        out = tmp_path / f"hess_{len(model)}"
        run_script("hessian.py", model + ["--data_dir", data, "--batch_size", 4, "--top_k", 2, "--iters", 6,
                                          "--out", out])
        assert len(json.loads((out / "hessian.json").read_text())["eigenvalues"]) == 2
