"""
The evaluation scripts as a user runs them: bad flags end in one `error:` line and exit
status 2 before any expensive work, surprising settings get a warning or a note, and
image_sample.py takes what it cannot read from the weights (the number of classes) from the
training run's config.json (tests/test_run_config.py: the model flags too).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion.evaluation import fid
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from tiny import TINY_MODEL, flags, make_npz, run_script

MODEL = {**TINY_MODEL, "class_cond": True}
SAMPLE = ["--timestep_respacing", "2", "--num_samples", "8", "--batch_size", "8", "--grid", "none"]


def write_checkpoint(folder, config=None):
    """A tiny class-conditional checkpoint, with the run's config.json beside it if given."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**MODEL)
    path = folder / "ema_0.9999_000010.pt"
    torch.save(model.state_dict(), path)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return path


def run_config(**extra):
    """config.json as image_train.py writes it: every model/diffusion option, JSON-typed."""
    values = {**model_and_diffusion_defaults(), **MODEL, "lr": 1e-4, "batch_size": 4}
    return {**values, **extra}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 'training run' of a 3-class data set: checkpoint plus config.json."""
    folder = tmp_path_factory.mktemp("run")
    write_checkpoint(folder, run_config(data_num_classes=3))
    return folder


@pytest.fixture(scope="module")
def checkpoint(run_dir):
    return run_dir / "ema_0.9999_000010.pt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("data") / "data.npz", n=6, classes=3)


def assert_user_error(proc, *needles):
    """Exit 2 with an `error:` line naming each needle, and no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def warnings_of(proc):
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("warning:")]


# ----------------------------------------------------------------------------------------
# image_sample.py


def test_sample_labels_come_from_run_config(run_dir, checkpoint, tmp_path):
    out = tmp_path / "s.npz"
    proc = run_script("image_sample.py", flags(MODEL) + SAMPLE + ["--model_path", checkpoint,
                                                                  "--out", out])
    labels = np.load(out)["arr_1"]
    assert len(labels) == 8 and labels.max() < 3
    assert "from 3 classes" in proc.stdout and not warnings_of(proc)

    # An explicit --num_classes wins over the config.
    proc = run_script("image_sample.py", flags(MODEL) + SAMPLE + [
        "--model_path", checkpoint, "--out", out, "--num_classes", "7"])
    assert np.load(out)["arr_1"].max() < 7 and "from 3 classes" not in proc.stdout


def test_sample_without_run_config_warns_and_uses_1000_classes(tmp_path):
    ckpt = write_checkpoint(tmp_path / "bare")
    out = tmp_path / "s.npz"
    proc = run_script("image_sample.py", flags(MODEL) + SAMPLE + ["--model_path", ckpt,
                                                                  "--out", out])
    [warning] = warnings_of(proc)
    assert "1000" in warning and "--num_classes" in warning
    assert np.load(out)["arr_1"].max() >= 3  # 8 draws out of 1000 classes


def test_sample_notes_flags_that_override_the_run(checkpoint, tmp_path):
    # Same architecture, other diffusion: the command line wins over the run's config.json,
    # with one note per flag.
    other = {**MODEL, "noise_schedule": "linear", "diffusion_steps": 100, "dropout": 0.0}
    proc = run_script("image_sample.py", flags(other) + [
        "--model_path", checkpoint, "--timestep_respacing", "ddim4", "--num_samples", "2",
        "--out", tmp_path / "s.npz", "--grid", "none"])
    lines = (proc.stdout + proc.stderr).splitlines()
    noted = sorted(line.split()[1] for line in lines if "overrides the training run's" in line)
    # dropout does nothing when sampling, and values equal to the run's (JSON true vs
    # "True", 40 vs "40") are not noted.
    assert noted == ["--diffusion_steps", "--noise_schedule"], lines
    assert "note: --noise_schedule linear overrides the training run's cosine" in proc.stdout
    assert any("ddim4" in w and "--use_ddim True" in w for w in warnings_of(proc))


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"image_size": 16, "channel_mult": ""}, ["--channel_mult", "image_size=16"]),
        ({"attention_resolutions": "32"}, ["--attention_resolutions", "never reached"]),
        ({"diffusion_steps": 100, "timestep_respacing": 500},
         ["--timestep_respacing '500'", "--diffusion_steps 100"]),
        ({"num_samples": 0}, ["--num_samples", "got 0"]),
        ({"num_classes": 5000}, ["--num_classes", "5000"]),
    ],
)
def test_sample_flag_errors(checkpoint, tmp_path, overrides, needles):
    proc = run_script("image_sample.py", flags({**MODEL, **overrides}) + [
        "--model_path", checkpoint, "--out", tmp_path / "s.npz"], check=False)
    assert_user_error(proc, *needles)
    assert not (tmp_path / "s.npz").exists()


# ----------------------------------------------------------------------------------------
# image_nll.py, consistency.py, interpolate.py, hessian.py


def test_nll_refuses_respacing(checkpoint, data):
    proc = run_script("image_nll.py", flags({**MODEL, "timestep_respacing": "10"}) + [
        "--model_path", checkpoint, "--data_dir", data], check=False)
    assert_user_error(proc, "--timestep_respacing '10'", "leave --timestep_respacing empty")


def test_consistency_missing_checkpoint(checkpoint, tmp_path):
    missing = tmp_path / "gone.pt"
    proc = run_script("consistency.py", flags(MODEL) + [
        "--model_paths", f"{checkpoint},{missing}", "--out", tmp_path / "c"], check=False)
    assert_user_error(proc, "--model_paths", "gone.pt")


def test_interpolate_without_data_dir(checkpoint):
    proc = run_script("interpolate.py", flags(MODEL) + [
        "--model_a", checkpoint, "--model_b", checkpoint], check=False)
    assert_user_error(proc, "--data_dir is required")


@pytest.mark.parametrize("script", ["interpolate.py", "hessian.py"])
def test_timestep_out_of_range(script, checkpoint, data):
    models = (["--model_a", checkpoint, "--model_b", checkpoint] if script == "interpolate.py"
              else ["--model_path", checkpoint])
    proc = run_script(script, flags(MODEL) + models + ["--data_dir", data, "--timestep", "40"],
                      check=False)
    assert_user_error(proc, "--timestep 40", "0..39")
    # With respacing the range is that of the respaced process.
    proc = run_script(script, flags({**MODEL, "timestep_respacing": "10"}) + models + [
        "--data_dir", data, "--timestep", "10"], check=False)
    assert_user_error(proc, "--timestep 10", "0..9")


def test_hessian_iters_below_top_k(checkpoint, data):
    proc = run_script("hessian.py", flags(MODEL) + [
        "--model_path", checkpoint, "--data_dir", data, "--top_k", "5", "--iters", "3"],
        check=False)
    assert_user_error(proc, "--iters 3", "--top_k")


def test_interpolate_notes_batch_larger_than_data(checkpoint, data, tmp_path):
    out = tmp_path / "interp"
    proc = run_script("interpolate.py", flags(MODEL) + [
        "--model_a", checkpoint, "--model_b", checkpoint, "--data_dir", data,
        "--batch_size", "64", "--alphas", "0,1", "--out", out])
    assert "note: --batch_size 64" in proc.stderr and "6 images" in proc.stderr
    assert json.loads((out / "interpolation.json").read_text())["settings"]["batch_size"] == 6


# ----------------------------------------------------------------------------------------
# fid.py: inputs are checked before the Inception network is loaded. The --inception file
# given here does not exist, so an error about any other flag shows the order.


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    samples = make_npz(root / "samples.npz", n=6)
    stats = root / "stats.npz"
    fid.save_statistics(str(stats), np.zeros(4), np.eye(4), 10)
    folder = root / "images"
    folder.mkdir()
    for i, image in enumerate(np.load(samples)["arr_0"]):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return {"samples": samples, "stats": stats, "folder": folder, "net": root / "no_net.pt"}


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing_ref", ["--ref", "nope.npz", "fid.py ref"]),
        ("ref_source_folder", ["--ref_source", "--image_size"]),
        ("samples_folder", ["--samples", "is a folder", "--image_size"]),
    ],
)
def test_fid_checks_inputs_before_features(fid_files, case, needles):
    f = fid_files
    args = {"--samples": f["samples"], "--ref": f["stats"], "--inception": f["net"]}
    if case == "missing_ref":
        args["--ref"] = f["stats"].parent / "nope.npz"
    elif case == "ref_source_folder":
        args["--ref_source"] = f["folder"]
    else:
        args["--samples"] = f["folder"]
    proc = run_script("fid.py", ["fid"] + [x for kv in args.items() for x in kv], check=False)
    assert_user_error(proc, *needles)
    assert "Inception" not in proc.stderr


class Features(torch.nn.Module):
    """A TorchScript stand-in for Inception: [N, 3, 299, 299] -> [N, 4]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 13, stride=13)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_fid_accepts_a_samples_folder_with_image_size(fid_files, tmp_path):
    torch.manual_seed(0)
    net = tmp_path / "net.pt"
    torch.jit.script(Features().eval()).save(str(net))
    common = ["--ref", fid_files["stats"], "--inception", net, "--device", "cpu"]
    from_npz = run_script("fid.py", ["fid", "--samples", fid_files["samples"]] + common)
    from_folder = run_script("fid.py", ["fid", "--samples", fid_files["folder"],
                                        "--image_size", "8"] + common)
    a, b = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (from_npz, from_folder))
    assert b["num_samples"] == 6 and b["fid"] == a["fid"]
