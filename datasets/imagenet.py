"""
Resize an ImageNet training folder to square images (default 128x128) for training.

Usage::

    python datasets/imagenet.py --root /data/ILSVRC2012/train --out imagenet128 --workers 16
    python datasets/imagenet.py --root /data/ILSVRC2012/train --out imagenet128.npz --npz

The input is the usual layout ``ROOT/nXXXXXXXX/*.JPEG``: one folder per synset, classes
numbered in sorted folder order. Every image is shrunk and center-cropped exactly as the
data loader does (``center_crop_arr``: BOX halvings, then BICUBIC to the short side, then
the centre square).

Output: PNGs ``{synset}_{i:05d}.png`` (the class is read back from the prefix), or with
``--npz`` one uncompressed ``.npz`` (``arr_0``: uint8 (N, S, S, 3), ``arr_1``: int64
labels) that is written as it is produced, so memory use stays small, and that the loader
memory-maps. ImageNet-128 is about 63 GB either way.
"""

import argparse
import os
import sys
import zipfile

import numpy as np
from tqdm import tqdm

try:
    from improved_diffusion import image_datasets
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from improved_diffusion import image_datasets


def list_imagenet(root, max_per_class=None):
    """
    Find the class folders and their images.

    :return: (paths, labels, synsets): image paths in class-then-name order, their class
             indices, and the sorted synset names.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--root {root!r} is not a folder")
    synsets = sorted(
        e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
    )
    if not synsets:
        raise ValueError(
            f"no class folders found in --root {root!r}: expected ROOT/nXXXXXXXX/*.JPEG, "
            "one folder per synset (extract the per-class tars of ILSVRC2012_img_train.tar)"
        )
    paths, labels = [], []
    for index, synset in enumerate(synsets):
        files = image_datasets.list_image_files(os.path.join(root, synset))
        if max_per_class is not None:
            files = files[:max_per_class]
        paths.extend(files)
        labels.extend([index] * len(files))
    if not paths:
        raise ValueError(f"no images found in the {len(synsets)} class folders of {root!r}")
    return paths, np.array(labels, dtype=np.int64), synsets


def _imap(fn, tasks, workers):
    if workers > 0:
        import multiprocessing

        pool = multiprocessing.Pool(workers)
        try:
            chunk = max(1, min(64, len(tasks) // (4 * workers)))
            yield from pool.imap(fn, tasks, chunksize=chunk)
        finally:
            pool.terminate()
            pool.join()
    else:
        yield from map(fn, tasks)


def write_pngs(paths, labels, synsets, out_dir, image_size, workers):
    bad = [s for s in synsets if "_" in s]
    if bad:
        raise ValueError(
            f"class folder names {bad[:5]} contain '_', which would break the class prefix "
            "of the output file names; use --npz instead"
        )
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    tasks = []
    for path, label in zip(paths, labels):
        synset = synsets[label]
        i = counts.get(synset, 0)
        counts[synset] = i + 1
        tasks.append((path, image_size, os.path.join(out_dir, f"{synset}_{i:05d}.png")))
    done = _imap(image_datasets.decode_and_save_task, tasks, workers)
    for _ in tqdm(done, total=len(tasks), unit="img"):
        pass


def write_npz(paths, labels, out_path, image_size, workers):
    """Write an uncompressed .npz image by image, without holding the data set in memory."""
    shape = (len(paths), image_size, image_size, 3)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
              "fortran_order": False, "shape": shape}
    tmp = out_path + ".part"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                tasks = [(p, image_size) for p in paths]
                decoded = _imap(image_datasets.decode_task, tasks, workers)
                for arr in tqdm(decoded, total=len(tasks), unit="img"):
                    f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels, allow_pickle=False)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--root", required=True, help="ImageNet train folder (ROOT/nXXXXXXXX/)")
    parser.add_argument("--out", required=True, help="output folder, or .npz file with --npz")
    parser.add_argument("--image_size", type=int, default=128, help="side of the output images")
    parser.add_argument("--npz", action="store_true", help="write one .npz instead of PNGs")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0: none)")
    parser.add_argument("--max_per_class", type=int, default=None,
                        help="keep only the first N images (sorted) of each class")
    args = parser.parse_args(argv)
    if args.image_size < 1:
        parser.error("--image_size must be positive")

    try:
        paths, labels, synsets = list_imagenet(args.root, args.max_per_class)
        print(f"{len(paths)} images in {len(synsets)} classes under {args.root}")
        if args.npz:
            out = args.out if args.out.lower().endswith(".npz") else args.out + ".npz"
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            write_npz(paths, labels, out, args.image_size, args.workers)
        else:
            out = args.out
            write_pngs(paths, labels, synsets, out, args.image_size, args.workers)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {len(paths)} images to {out}")


if __name__ == "__main__":
    main()
