"""
One source of options for the scripts that load a checkpoint: the model and diffusion flags
come from the training run's config.json beside it, so the checkpoint alone gives the same
outputs, bit for bit, as the checkpoint with every model flag spelled out. A flag on the
command line still overrides the run (with a note), and `--config FILE` stands in for a
missing config.json.

One tiny class-conditional run is trained by scripts/image_train.py for the whole module; the
scripts run in this process (their `main(argv)`), which keeps the tests fast.
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from tiny import ROOT, TINY_MODEL, flags, make_npz, run_script

MODEL = {**TINY_MODEL, "class_cond": True}


def load_script(name):
    """Import scripts/<name> as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("script_" + name[:-3], os.path.join(ROOT, "scripts", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step training run of 3 classes: {dir, ema, model (the two checkpoints), data}."""
    root = tmp_path_factory.mktemp("run_config")
    data = make_npz(root / "data.npz", n=8, classes=3)
    run_dir = root / "run"
    run_script("image_train.py", flags(MODEL) + [
        "--data_dir", data, "--batch_size", 4, "--total_steps", 2, "--save_interval", 2,
        "--log_dir", run_dir])
    assert (run_dir / "config.json").is_file()
    return {"dir": run_dir, "ema": run_dir / "ema_0.9999_000002.pt",
            "model": run_dir / "model000002.pt", "data": data}


def without_seconds(value):
    """A JSON result without its timings (the only numbers that differ between two runs)."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def sample(run, out, *extra, model_flags=True):
    args = ["--model_path", run["ema"], "--timestep_respacing", "4", "--num_samples", "4",
            "--batch_size", "4", "--grid", "none", "--out", out, *extra]
    load_script("image_sample.py").main([str(a) for a in (flags(MODEL) if model_flags else []) + args])
    return np.load(out)


def notes(text):
    return [line for line in text.splitlines() if line.startswith("note:")]


# ----------------------------------------------------------------------------------------
# The checkpoint alone is enough


def test_image_sample_checkpoint_alone(run, tmp_path, capsys):
    spelled = sample(run, tmp_path / "flags.npz")
    assert not notes(capsys.readouterr().out)  # the flags equal the run's: nothing to note
    alone = sample(run, tmp_path / "alone.npz", model_flags=False)
    assert "from 3 classes" in capsys.readouterr().out
    np.testing.assert_array_equal(spelled["arr_0"], alone["arr_0"])
    np.testing.assert_array_equal(spelled["arr_1"], alone["arr_1"])
    assert alone["arr_1"].max() < 3


def test_image_nll_checkpoint_alone(run, tmp_path):
    script = load_script("image_nll.py")
    common = ["--model_path", run["ema"], "--data_dir", run["data"], "--num_samples", "4",
              "--batch_size", "4"]
    results = []
    for name, model_flags in (("flags", flags(MODEL)), ("alone", [])):
        script.main([str(a) for a in model_flags + common + ["--out_dir", tmp_path / name]])
        results.append(json.loads((tmp_path / name / "nll.json").read_text()))
        results[-1]["vb"] = np.load(tmp_path / name / "vb_terms.npz")["arr_0"].tolist()
    assert without_seconds(results[0]) == without_seconds(results[1])


def test_consistency_checkpoint_alone(run, tmp_path):
    script = load_script("consistency.py")
    common = ["--model_paths", f"{run['ema']},{run['model']}", "--num_samples", "2",
              "--batch_size", "2", "--timestep_respacing", "4"]
    results = []
    for name, model_flags in (("flags", flags(MODEL)), ("alone", [])):
        script.main([str(a) for a in model_flags + common + ["--out", tmp_path / name]])
        results.append(json.loads((tmp_path / name / "consistency.json").read_text()))
        for n in range(2):
            results[-1][f"samples_{n}"] = np.load(tmp_path / name / f"samples_{n}.npz")["arr_0"].tolist()
    assert results[0] == results[1]
    assert results[1]["models"][1]["flags"]["num_channels"] == MODEL["num_channels"]


def test_interpolate_checkpoint_alone(run, tmp_path):
    script = load_script("interpolate.py")
    common = ["--model_a", run["ema"], "--model_b", run["model"], "--data_dir", run["data"],
              "--batch_size", "4", "--alphas", "0,0.5,1"]
    results = []
    for name, model_flags in (("flags", flags(MODEL)), ("alone", [])):
        script.main([str(a) for a in model_flags + common + ["--out", tmp_path / name]])
        results.append(json.loads((tmp_path / name / "interpolation.json").read_text()))
    assert results[0] == results[1]


def test_hessian_checkpoint_alone(run, tmp_path):
    script = load_script("hessian.py")
    common = ["--model_path", run["ema"], "--data_dir", run["data"], "--batch_size", "2",
              "--top_k", "2", "--iters", "4", "--power_iters", "3"]
    results = []
    for name, model_flags in (("flags", flags(MODEL)), ("alone", [])):
        script.main([str(a) for a in model_flags + common + ["--out", tmp_path / name]])
        results.append(without_seconds(json.loads((tmp_path / name / "hessian.json").read_text())))
    assert results[0] == results[1]


# ----------------------------------------------------------------------------------------
# The command line overrides the run; --config stands in for a missing config.json


def test_explicit_flag_overrides_the_run_with_a_note(run, tmp_path, capsys):
    base = sample(run, tmp_path / "base.npz", model_flags=False)
    capsys.readouterr()
    linear = sample(run, tmp_path / "linear.npz", "--noise_schedule", "linear", model_flags=False)
    assert notes(capsys.readouterr().out) == [
        f"note: --noise_schedule linear overrides the training run's cosine ({run['dir'] / 'config.json'})"]
    assert not np.array_equal(base["arr_0"], linear["arr_0"])
    # A run-time flag such as the respacing differs from the run on purpose: no note.
    sample(run, tmp_path / "ddim.npz", "--timestep_respacing", "ddim2", "--use_ddim", "True",
           model_flags=False)
    assert not notes(capsys.readouterr().out)


def test_config_file_for_a_checkpoint_without_run_config(run, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run["ema"], bare / run["ema"].name)
    options = tmp_path / "model.json"
    options.write_text(json.dumps(MODEL))
    from_run = sample(run, tmp_path / "run.npz", "--num_classes", "3", model_flags=False)
    with_config = sample({**run, "ema": bare / run["ema"].name}, tmp_path / "config.npz",
                         "--num_classes", "3", "--config", options, model_flags=False)
    np.testing.assert_array_equal(from_run["arr_0"], with_config["arr_0"])
    # Without it the table's defaults do not fit the weights: one error naming the flags.
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        sample({**run, "ema": bare / run["ema"].name}, tmp_path / "none.npz", model_flags=False)
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def test_second_checkpoint_of_another_run_is_warned_about(run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run["model"], other / run["model"].name)
    values = json.loads((run["dir"] / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**values, "noise_schedule": "linear"}))
    proc = run_script("interpolate.py", [
        "--model_a", run["ema"], "--model_b", other / run["model"].name, "--data_dir", run["data"],
        "--batch_size", 2, "--alphas", "0,1", "--out", tmp_path / "interp"])
    [warning] = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert "--noise_schedule cosine" in warning and "linear" in warning and str(other) in warning
