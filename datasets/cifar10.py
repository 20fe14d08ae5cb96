"""
Convert the CIFAR-10 python archive into a training folder of PNGs (or one .npz).

Usage::

    python datasets/cifar10.py --archive ~/data/cifar-10-python.tar.gz --out cifar_train
    python datasets/cifar10.py --archive ~/data/cifar-10-python.tar.gz --out cifar_test --split test
    python datasets/cifar10.py --archive ~/data/cifar-10-python.tar.gz --out data/ --npz

PNGs are named ``{label_name}_{index:05d}.png`` (``truck_49997.png``), so the data loader
reads the class from the prefix, as in the original improved-diffusion. With ``--npz`` one
file ``cifar10_{split}.npz`` is written (``arr_0``: uint8 (N, 32, 32, 3), ``arr_1``: int64
labels); ``--out`` may also name the ``.npz`` file itself.

Without ``--archive``, ``./cifar-10-python.tar.gz`` is used; when it is absent it is
downloaded from the authors' site if the network answers, and otherwise the script stops
and says where to put the archive.
"""

import argparse
import hashlib
import io
import os
import pickle
import sys
import tarfile
import urllib.error
import urllib.request

import numpy as np
from PIL import Image
from tqdm import tqdm

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
SPLIT_BATCHES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}

# The batches are Python pickles. Only the objects a CIFAR batch is made of may be
# rebuilt, so a tampered archive cannot run code while it is read.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"unexpected object {module}.{name} in a CIFAR-10 batch; refusing to load it"
            )
        return super().find_class(module, name)


def _load_pickle(fileobj):
    return _BatchUnpickler(io.BytesIO(fileobj.read()), encoding="bytes").load()


def read_cifar10(archive, split):
    """
    Read one split of ``cifar-10-python.tar.gz``.

    :return: (images uint8 (N, 32, 32, 3), labels int64 (N,), label_names list of str).
    """
    if split not in SPLIT_BATCHES:
        raise ValueError(f"split must be one of {sorted(SPLIT_BATCHES)}, got {split!r}")
    try:
        tar = tarfile.open(archive, "r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise ValueError(f"cannot open CIFAR-10 archive {archive!r}: {exc}") from exc
    with tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        needed = ["batches.meta"] + SPLIT_BATCHES[split]
        missing = [name for name in needed if name not in members]
        if missing:
            raise ValueError(
                f"{archive!r} is not the CIFAR-10 python archive: missing {missing} "
                f"(expected {ARCHIVE_NAME} from {URL})"
            )
        meta = _load_pickle(tar.extractfile(members["batches.meta"]))
        label_names = [n.decode("utf-8") for n in meta[b"label_names"]]
        images, labels = [], []
        for name in SPLIT_BATCHES[split]:
            batch = _load_pickle(tar.extractfile(members[name]))
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(
                    f"{name} in {archive!r}: expected data of shape (N, 3072), "
                    f"got {data.shape}"
                )
            # Rows are stored channel-major: 1024 red, 1024 green, 1024 blue values.
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), label_names


def _network_reachable(url, timeout=5.0):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def download_archive(path, url=URL):
    """Download the archive to ``path`` and check its MD5."""
    tmp = path + ".part"
    with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        digest = hashlib.md5()
        with tqdm(total=total, unit="B", unit_scale=True, desc="downloading CIFAR-10") as bar:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != ARCHIVE_MD5:
        os.remove(tmp)
        raise RuntimeError(f"downloaded {url} has MD5 {digest.hexdigest()}, expected {ARCHIVE_MD5}")
    os.replace(tmp, path)


def locate_archive(archive):
    """The archive to read: ``archive`` if given, else ./cifar-10-python.tar.gz (downloaded)."""
    if archive is not None:
        if not os.path.isfile(archive):
            raise FileNotFoundError(f"--archive {archive!r} does not exist")
        return archive
    if os.path.isfile(ARCHIVE_NAME):
        return ARCHIVE_NAME
    if not _network_reachable(URL):
        raise FileNotFoundError(
            f"{ARCHIVE_NAME} was not found in {os.getcwd()!r} and {URL} cannot be reached: "
            "download it on a machine with network access, copy it here, and pass "
            "--archive PATH/cifar-10-python.tar.gz"
        )
    download_archive(ARCHIVE_NAME)
    return ARCHIVE_NAME


def write_pngs(images, labels, label_names, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for i in tqdm(range(len(images)), desc=f"writing {out_dir}", unit="img"):
        name = f"{label_names[labels[i]]}_{i:05d}.png"
        Image.fromarray(images[i]).save(os.path.join(out_dir, name))


def npz_path(out, split):
    return out if out.lower().endswith(".npz") else os.path.join(out, f"cifar10_{split}.npz")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--archive", default=None, help="path to cifar-10-python.tar.gz")
    parser.add_argument("--out", default=None, help="output folder (default: cifar_SPLIT)")
    parser.add_argument("--split", default="train", choices=sorted(SPLIT_BATCHES))
    parser.add_argument("--npz", action="store_true", help="write one .npz instead of PNGs")
    args = parser.parse_args(argv)

    try:
        archive = locate_archive(args.archive)
        images, labels, label_names = read_cifar10(archive, args.split)
    except (FileNotFoundError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        sys.exit(f"error: {exc}")
    out = args.out or f"cifar_{args.split}"
    if args.npz:
        path = npz_path(out, args.split)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.savez(path, arr_0=images, arr_1=labels)
        print(f"wrote {len(images)} images to {path}")
    else:
        write_pngs(images, labels, label_names, out)
        print(f"wrote {len(images)} images to {out}")


if __name__ == "__main__":
    main()
