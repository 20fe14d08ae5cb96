"""
How many generated digits a small classifier recognises, for the demo's samples.

    python scripts/digit_score.py --data data/demo/mnist_demo_grey.npz
    python scripts/digit_score.py --data data/demo/mnist_demo_grey.npz \
        --samples runs/demo/report/samples.npz --json runs/demo/report/digits.json

The first form trains the classifier (or loads it) and prints its accuracy on held-out real
digits; the second also scores a sample file written by image_sample.py (`arr_0`: uint8
(N, H, W, C), C 1 or 3; colour is averaged to grey) and prints, and with `--json` writes:

- `recognisable`: the fraction of samples whose top class is a digit with probability
  >= `--threshold` (0.9),
- `class_counts`: how many of the recognisable samples fall in each class 0-9,
- the same two numbers for the held-out real digits, as the scale to read them against.

The classifier is a three-layer CNN with 11 outputs: the digits 0-9 and "not a digit",
which it learns from made-up negatives (noise, smoothed-noise blobs, two digits laid over
each other, mirrored 2-7s and 9s), so that a blob with strokes or a mirror-image digit is
not forced into a digit class. It trains on the data's labels (`arr_1`) with a fixed seed,
in about 15-20 s on one CPU thread, leaving out the last tenth of each class (for the 5,000
demo digits, which are sorted by class: the last 50 of each, 500 in all), and is cached
beside the data as `digit_classifier_<H>px_<C>ch.pt`; a cache made from other data (or by
an older version of this script) is retrained.
"""

import argparse
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from improved_diffusion.options import config
from improved_diffusion.script_util import run_main

NOT_A_DIGIT = 10  # the 11th output
MIRROR_IS_NO_DIGIT = (2, 3, 4, 5, 6, 7, 9)  # a left-right mirrored 0, 1 or 8 is still one
HELDOUT_FRACTION = 0.1
EPOCHS = 12
BATCH = 64
LR = 3e-3
SEED = 0
RECIPE = 3  # bump when the network or its training changes: cached classifiers are then retrained


class DigitNet(nn.Module):
    """Grey images in [-1, 1] of any size >= 8 -> 11 logits (0-9, not a digit)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, NOT_A_DIGIT + 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 4)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def load_images(path, what="images"):
    """uint8 (N, H, W, C) from `path`'s arr_0 and its labels (arr_1, or None)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} not found")
    with np.load(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{path!r} has no arr_0 (expected images as written by image_sample.py)")
        images = f["arr_0"]
        labels = f["arr_1"] if "arr_1" in f else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(
            f"{path!r}: expected uint8 images (N, H, W, C) with C 1 or 3, got {images.dtype} {images.shape}"
        )
    return images, labels


def to_grey(images):
    """uint8 (N, H, W, C) -> float32 tensor (N, 1, H, W) in [-1, 1]; colour is averaged."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().mean(dim=3, keepdim=True)
    return x.permute(0, 3, 1, 2) / 127.5 - 1


def split(labels):
    """Indices (train, held out): the last HELDOUT_FRACTION of each class is held out."""
    train, heldout = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        n_out = int(round(len(idx) * HELDOUT_FRACTION))
        train.append(idx[: len(idx) - n_out])
        heldout.append(idx[len(idx) - n_out:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def negatives(digits, labels, n, gen):
    """`n` made-up non-digits in [-1, 1] (N, 1, H, W): noise, smoothed-noise blobs, two digits
    laid over each other, and mirrored digits of the classes whose mirror image is no digit."""
    size = digits.shape[-1]
    kind = torch.randint(0, 4, (n,), generator=gen).view(-1, 1, 1, 1)
    out = torch.rand(n, 1, size, size, generator=gen) * 2 - 1  # kind 0: uniform noise
    blobs = torch.randn(n, 1, max(2, size // 4), max(2, size // 4), generator=gen)
    blobs = F.interpolate(blobs, size=(size, size), mode="bilinear", align_corners=False)
    blobs = torch.where(blobs > torch.rand(n, 1, 1, 1, generator=gen), 1.0, -1.0)
    out = torch.where(kind == 1, blobs, out)
    a = digits[torch.randint(0, len(digits), (n,), generator=gen)]
    b = digits[torch.randint(0, len(digits), (n,), generator=gen)]
    out = torch.where(kind == 2, torch.maximum(a, b), out)
    asymmetric = torch.from_numpy(np.flatnonzero(np.isin(labels, MIRROR_IS_NO_DIGIT)))
    mirrored = digits[asymmetric[torch.randint(0, len(asymmetric), (n,), generator=gen)]].flip(-1)
    return torch.where(kind == 3, mirrored, out)


def shift(x, gen):
    """The batch moved by up to one pixel in each direction (one shift for all; black, -1, fills in)."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    size = x.shape[-1]
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return pad[..., dy:dy + size, dx:dx + size]


def train_classifier(images, labels):
    """A DigitNet trained with a fixed seed on the training split; returns (model, held-out indices)."""
    train_idx, heldout_idx = split(labels)
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    x, y = to_grey(images[train_idx]), torch.from_numpy(labels[train_idx]).long()
    model = DigitNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    n_neg = len(x) // 4
    steps = EPOCHS * -(-(len(x) + n_neg) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    for _ in range(EPOCHS):
        xs = torch.cat([x, negatives(x, labels[train_idx], n_neg, gen)])
        ys = torch.cat([y, torch.full((n_neg,), NOT_A_DIGIT)])
        order = torch.randperm(len(xs), generator=gen)
        for start in range(0, len(xs), BATCH):
            i = order[start:start + BATCH]
            loss = F.cross_entropy(model(shift(xs[i], gen)), ys[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    model.eval()
    return model, heldout_idx


@torch.no_grad()
def classify(model, images):
    """(top class, its probability) per image; class 10 is "not a digit"."""
    probs = torch.cat([F.softmax(model(to_grey(images[i:i + 256])), dim=1) for i in range(0, len(images), 256)])
    p, c = probs.max(dim=1)
    return c.numpy(), p.numpy()


def summarise(classes, probs, threshold):
    ok = (classes != NOT_A_DIGIT) & (probs >= threshold)
    return {
        "num_images": int(len(classes)),
        "recognisable": float(ok.mean()),
        "class_counts": np.bincount(classes[ok], minlength=10)[:10].tolist(),
        "not_a_digit": int((classes == NOT_A_DIGIT).sum()),
    }


def data_hash(images, labels):
    h = hashlib.sha1(images.tobytes())
    h.update(labels.astype(np.int64).tobytes())
    return h.hexdigest()


def classifier_path(data_path, images):
    return os.path.join(os.path.dirname(os.path.abspath(data_path)),
                        f"digit_classifier_{images.shape[1]}px_{images.shape[3]}ch.pt")


def load_or_train(data_path, log=print):
    """(model, held-out images, held-out labels, cache path) for the data at `data_path`."""
    images, labels = load_images(data_path, "data")
    if labels is None or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{data_path!r}: needs digit labels 0-9 in arr_1 (datasets/mnist_demo.py writes them)")
    path, digest = classifier_path(data_path, images), data_hash(images, labels)
    cached = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
    if cached is not None and cached.get("data_sha1") == digest and cached.get("recipe") == RECIPE:
        model = DigitNet()
        model.load_state_dict(cached["model"])
        model.eval()
        heldout_idx = split(labels)[1]
        log(f"classifier: {path} (cached)")
    else:
        model, heldout_idx = train_classifier(images, labels)
        tmp = path + ".tmp"
        torch.save({"model": model.state_dict(), "data_sha1": digest, "recipe": RECIPE}, tmp)
        os.replace(tmp, path)
        log(f"classifier: trained on {len(labels) - len(heldout_idx)} digits, saved to {path}")
    return model, images[heldout_idx], labels[heldout_idx], path


def score(data_path, samples_path=None, threshold=0.9, log=print):
    """The held-out accuracy of the classifier and, given `samples_path`, the score of the samples."""
    model, heldout, heldout_labels, path = load_or_train(data_path, log)
    classes, probs = classify(model, heldout)
    result = {"data": data_path, "classifier": path, "threshold": threshold,
              "heldout_accuracy": float((classes == heldout_labels).mean()),
              "heldout": summarise(classes, probs, threshold)}
    if samples_path is not None:
        samples, _ = load_images(samples_path, "samples")
        if samples.shape[1:3] != heldout.shape[1:3]:
            raise ValueError(f"{samples_path!r}: images are {samples.shape[1]}x{samples.shape[2]}, "
                             f"the classifier's data {heldout.shape[1]}x{heldout.shape[2]}")
        result["samples_path"] = samples_path
        result["samples"] = summarise(*classify(model, samples), threshold)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="the labelled digits (.npz: arr_0 images, arr_1 labels)")
    config.add_options(parser, config.TOOLS["digit_score"], table=config.TOOLS["digit_score"])
    args = parser.parse_args()
    if not 0 < args.threshold <= 1:
        parser.error(f"--threshold must be in (0, 1], got {args.threshold}")
    result = score(args.data, args.samples, args.threshold)
    held = result["heldout"]
    print(f"held-out real digits: accuracy {result['heldout_accuracy']:.1%}, "
          f"recognisable {held['recognisable']:.1%} of {held['num_images']}")
    if "samples" in result:
        s = result["samples"]
        print(f"samples: recognisable {s['recognisable']:.1%} of {s['num_images']} "
              f"(top probability >= {args.threshold}); not a digit: {s['not_a_digit']}")
        print("recognisable per class 0-9: " + " ".join(str(c) for c in s["class_counts"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
