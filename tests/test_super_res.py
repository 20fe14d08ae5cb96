"""
Super-resolution: the factories build guided-diffusion's SR models, the low-resolution
condition comes from the data pipeline, and super_res_train.py / super_res_sample.py run end
to end, resume exactly and reject bad input.
"""

import json

import numpy as np
import pytest
import torch

from improved_diffusion import script_util as su
from improved_diffusion.image_datasets import BatchStream, ImageDataset, LowResStream, low_res_of
from improved_diffusion.unet import SuperResModel

from tiny import make_npz, run_script

# guided-diffusion's README flags of its 64 -> 256 ImageNet upsampler.
GUIDED_SR_FLAGS = dict(
    attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, large_size=256, small_size=64,
    learn_sigma=True, noise_schedule="linear", num_channels=192, num_head_channels=64, num_res_blocks=2,
    resblock_updown=True, use_fp16=True, use_scale_shift_norm=True,
)


def test_sr_defaults_are_guided_diffusions_key_set():
    assert set(su.sr_model_and_diffusion_defaults()) == {
        "large_size", "small_size", "class_cond", "learn_sigma", "num_channels", "num_res_blocks", "num_heads",
        "num_head_channels", "num_heads_upsample", "attention_resolutions", "dropout", "diffusion_steps",
        "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps",
        "rescale_learned_sigmas", "use_checkpoint", "use_scale_shift_norm", "resblock_updown", "use_fp16",
    }


def test_guided_sr_model_is_the_256px_unet_with_six_input_channels():
    with torch.device("meta"):
        sr, diffusion = su.sr_create_model_and_diffusion(**GUIDED_SR_FLAGS)
        flags = {k: v for k, v in GUIDED_SR_FLAGS.items() if k not in ("large_size", "small_size", "diffusion_steps",
                                                                          "noise_schedule", "use_fp16")}
        plain = su.create_model(256, flags.pop("num_channels"), flags.pop("num_res_blocks"), **flags)
    assert isinstance(sr, SuperResModel) and sr.channel_mult == (1, 1, 2, 2, 4, 4)
    a = {k: tuple(v.shape) for k, v in sr.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    assert a.keys() == b.keys()
    assert a.pop("input_blocks.0.0.weight") == (192, 6, 3, 3) and b.pop("input_blocks.0.0.weight") == (192, 3, 3, 3)
    assert a == b
    assert a["label_emb.weight"] == (1000, 768)
    assert diffusion.num_timesteps == 1000
    # The other tables: 512 and 64 pixels.
    with torch.device("meta"):
        m512, _ = su.sr_create_model_and_diffusion(large_size=512, small_size=128, num_channels=64,
                                                   num_res_blocks=1, attention_resolutions="32")
        m64, _ = su.sr_create_model_and_diffusion(large_size=64, small_size=16, num_channels=64,
                                                  num_res_blocks=1, attention_resolutions="16")
    assert m512.channel_mult == (1, 1, 2, 2, 4, 4) and m64.channel_mult == (1, 2, 3, 4)


def test_sr_sizes_are_checked():
    with pytest.raises(ValueError, match="large_size"):
        su.sr_create_model_and_diffusion(large_size=32, small_size=8)  # no table entry for 32
    model, _ = su.sr_create_model_and_diffusion(large_size=32, small_size=8, channel_mult="1,2", num_channels=32,
                                                num_res_blocks=1, attention_resolutions="16")
    assert model.channel_mult == (1, 2)
    with pytest.raises(ValueError, match="small_size"):
        su.sr_create_model(16, 32, 32, 1, channel_mult="1,2", attention_resolutions="8")


def test_low_res_is_the_area_average_of_the_batch():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 8, 8), dtype=np.uint8))
    low = low_res_of(images, 4)
    x = images.double() / 127.5 - 1
    blocks = x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(low.double(), blocks, rtol=0, atol=1e-6)
    torch.testing.assert_close(low_res_of(x.float(), 4), low)


def test_low_res_stream_follows_the_flipped_batch_and_resumes():
    rng = np.random.default_rng(1)
    data = ImageDataset(rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8), labels=np.arange(10) % 2)
    stream = LowResStream(BatchStream(data, 4, seed=3, random_flip=True), 2)
    images, cond = next(stream)
    assert set(cond) == {"y", "low_res"}
    torch.testing.assert_close(cond["low_res"], low_res_of(images, 2))
    state = stream.state_dict()
    after = [next(stream) for _ in range(3)]
    again = LowResStream(BatchStream(data, 4, seed=3, random_flip=True), 2)
    again.load_state_dict(state)
    for (a, ca), (b, cb) in zip(after, [next(again) for _ in range(3)]):
        assert torch.equal(a, b) and torch.equal(ca["low_res"], cb["low_res"]) and torch.equal(ca["y"], cb["y"])


SR = ["--large_size", "8", "--small_size", "4", "--channel_mult", "1,2", "--num_channels", "32",
      "--num_res_blocks", "1", "--attention_resolutions", "4", "--num_heads", "2", "--diffusion_steps", "40",
      "--noise_schedule", "cosine", "--learn_sigma", "True", "--batch_size", "4", "--lr", "1e-3",
      "--log_interval", "1", "--save_interval", "2", "--ema_rate", "0.9", "--total_steps", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    data = make_npz(root / "data.npz", n=16, classes=2)
    run_script("super_res_train.py", [*SR, "--data_dir", data, "--log_dir", root / "full"])
    return root, data


def test_super_res_train_writes_sizes_and_resumes_exactly(trained):
    root, data = trained
    saved = json.loads((root / "full" / "config.json").read_text())
    assert saved["large_size"] == 8 and saved["small_size"] == 4 and "image_size" not in saved
    run_script("super_res_train.py", [*SR, "--data_dir", data, "--log_dir", root / "half", "--stop_at", "2"])
    proc = run_script("super_res_train.py", [*SR, "--data_dir", data, "--log_dir", root / "half"])
    assert "resumed from step 2" in proc.stdout
    for name in ("model000004.pt", "ema_0.9_000004.pt"):
        a = torch.load(root / "full" / name, weights_only=True)
        b = torch.load(root / "half" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(root / "full" / "model000004.pt", weights_only=True)
    assert state["input_blocks.0.0.weight"].shape == (32, 6, 3, 3)


def test_super_res_sample_end_to_end(trained):
    root, _ = trained
    rng = np.random.default_rng(2)
    base = root / "base.npz"
    np.savez(base, rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8))
    outs = []
    for batch in ("2", "5"):
        out = root / f"up{batch}.npz"
        run_script("super_res_sample.py", ["--model_path", root / "full" / "ema_0.9_000004.pt", "--base_samples", base,
                                           "--num_samples", "5", "--batch_size", batch, "--timestep_respacing",
                                           "ddim4", "--use_ddim", "True", "--out", out])
        outs.append(np.load(out)["arr_0"])
    assert outs[0].shape == (5, 8, 8, 3)
    assert np.array_equal(outs[0], outs[1])  # image i depends on its seed only
    assert (root / "up5_grid.png").exists()


def _one_error(proc, fragment):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_super_res_scripts_reject_bad_input(trained, tmp_path):
    root, data = trained
    model = root / "full" / "ema_0.9_000004.pt"
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, np.zeros((2, 8, 8, 3), np.uint8))
    sample = ["--num_samples", "2", "--timestep_respacing", "ddim2", "--use_ddim", "True", "--out", tmp_path / "o.npz"]
    _one_error(run_script("super_res_sample.py", ["--model_path", model, "--base_samples", wrong, *sample],
                          check=False), "wrong sizes")
    _one_error(run_script("super_res_sample.py", ["--model_path", tmp_path / "none.pt", "--base_samples", wrong,
                                                  *sample], check=False), "--model_path")
    _one_error(run_script("super_res_train.py", [*SR, "--small_size", "16", "--data_dir", data, "--log_dir",
                                                 tmp_path / "r"], check=False), "wrong sizes")
    _one_error(run_script("super_res_train.py", [*SR, "--class_dropout_prob", "0.1", "--data_dir", data,
                                                 "--log_dir", tmp_path / "r"], check=False), "class_dropout_prob")
