"""
The metrics of the ADM papers beside FID and KID (improved_diffusion/evaluation/fid.py): sFID, improved
precision and recall, and the Inception Score; the reference file that holds what each of
them needs; and one function that scores samples against it.

    fid        Frechet distance of the pooled Inception features (2048 per image)
    sfid       Frechet distance of the spatial features (mixed_6/conv, 7 x 17 x 17 = 2023)
    precision  the fraction of samples inside the reference set's manifold
    recall     the fraction of reference images inside the samples' manifold
    kid        Kernel Inception Distance of the pooled features (unbiased)

A set's manifold (Kynkaanniemi et al., 2019) is the union of balls around its points, each
ball's radius the distance from its centre to its k-th nearest other point of the set
(k = 3). Precision and recall are computed on the pooled features in blocks of pairwise
distances, so two sets of 50,000 take memory for the features plus a few blocks, never the
50,000 x 50,000 matrix (docs/benchmarks.md). Two ways (``pr_mode``): "exact", float32
distances of centred features, and "adm", the float16 arithmetic of guided-diffusion's
evaluator, which the published numbers come from and whose rounding moved the values by
up to about 0.8 points where measured (:func:`precision_recall`).

The Inception Score needs classifier logits, which the bundled feature network lacks (it
ends at pool_3; the evaluator's softmax weights are not in the file): it is computed only
with a separate logits network (:func:`load_logits_network`), and is then not comparable
with published Inception Scores.

Reference file (.npz), written by :func:`save_reference` (``scripts/fid.py ref``):

    mu, sigma          float64 (2048,), (2048, 2048)  pooled features          -> fid
    mu_s, sigma_s      float64 (2023,), (2023, 2023)  spatial features         -> sfid
    pool_features      float16 (M, 2048)  a fixed random sample of the pooled
                       features, M <= 10,000 by default                       -> precision, recall, kid
    num_images         int64              images the statistics come from
    arr_0              uint8 (N, H, W, 3)  the images, only with --adm_compatible

A file with ``mu`` and ``sigma`` only (written before these metrics existed) still gives FID;
guided-diffusion's reference batches (``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and the
images in ``arr_0``) give FID and sFID, and precision, recall and KID from their images.
``save_reference(..., images=...)`` adds ``arr_0``, which makes the file one of those
reference batches for the evaluator's command line too (``scripts/fid.py ref --adm_compatible``).
"""

import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import fid

METRICS = ("fid", "sfid", "precision", "recall", "kid")
NEAREST_NEIGHBOURS = 3
DEFAULT_KEEP_FEATURES = 10000
DEFAULT_BLOCK_SIZE = 4096
IS_SPLIT_SIZE = 5000  # images per Inception Score split, as guided-diffusion's evaluator
PR_MODES = ("adm", "exact")  # see precision_recall
DEFAULT_PR_MODE = "adm"  # of evaluate and the --pr_mode flags: the numbers papers report
ADM_BATCH_SIZE = 10000  # the evaluator's row and column batch: where it picks float16 or float32
REMAKE = "make it again with `scripts/fid.py ref`"


def parse_metrics(text, flag="--metrics"):
    """
    Metric names from a comma-separated list, in the order of METRICS.

    :raises ValueError: naming `flag`, for an unknown name or an empty list.
    """
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(
            f"{flag} {text!r}: " + (f"unknown metric(s) {', '.join(unknown)}" if unknown else "no metric")
            + f" (known: {', '.join(METRICS)})"
        )
    return tuple(name for name in METRICS if name in names)


# ----------------------------------------------------------------------------------------
# Improved precision and recall.


def knn_radii(features, k=NEAREST_NEIGHBOURS, block_size=DEFAULT_BLOCK_SIZE, device=None, dtype=torch.float32):
    """
    Squared distance from each point to its k-th nearest other point of the same set.

    Computed in blocks of ``block_size`` x ``block_size`` pairwise distances, keeping the
    k + 1 smallest of each row so far (the point itself, at distance 0, is one of them).

    :param features: [N x D] array, N > k.
    :param dtype: the dtype of the distance computation (float64 for exact comparisons).
    :return: float64 numpy array [N].
    """
    x, norms = _prepare(features, _center(features), device, dtype)
    _check_count(len(x), k)
    return _radii(x, norms, k, block_size).double().cpu().numpy()


def precision_recall(
    ref_features, sample_features, k=NEAREST_NEIGHBOURS, block_size=DEFAULT_BLOCK_SIZE, device=None,
    dtype=torch.float32, mode="exact",
):
    """
    Improved precision and recall (Kynkaanniemi et al., 2019) of samples against reference
    images.

    precision: the fraction of samples within distance r_i of some reference point i (ties
    count as inside), where r_i is the distance from i to its k-th nearest other reference
    point; recall: the same with the roles swapped. Every distance matrix is handled in
    blocks of ``block_size`` x ``block_size``, so the memory used is the features plus a few
    blocks (64 MiB per block at the default 4096 and float32).

    mode "exact": both sets are shifted by the reference mean first (distances do not
    change; float32 keeps more of them) and the distances are computed in ``dtype``.

    mode "adm": the distances are rounded as guided-diffusion's evaluator rounds them
    (``evaluations/evaluator.py``, ``ManifoldEstimator`` and ``DistanceBlock``), which is
    how the ADM papers' numbers, and those of later papers that used the evaluator, were
    computed: the features as they are (not centred), cast to float16, each step of
    ``max(|u|^2 - 2 u.v + |v|^2, 0)`` in float16, unless some value of the evaluator's
    10,000 x 10,000 block is not finite, when that whole block is computed in float32; a
    radius is entry k of the k + 1 smallest distances of the point's row, its own distance
    among them as rounded (not always 0). Rounding makes many distances equal, and ties
    count as inside: on the features measured (issue 30's Inception features, random ones
    in docs/evaluation.md) the values came out higher than exact ones, by up to about 0.8
    points. The one thing not reproduced is the order in which the evaluator's device
    sums the 2048 terms of a norm or a product: here each such sum is taken in float64
    and rounded once, the same on every device. ``dtype`` is not used. On a CPU this takes
    about 2.4 times the exact mode's time (float64 products) and a 10,000 x 10,000 float32
    block (400 MB) more memory.

    :param ref_features: [N1 x D] pooled features of reference images, N1 > k.
    :param sample_features: [N2 x D] pooled features of samples, N2 > k.
    :param k: the neighbour whose distance is a ball's radius.
    :param block_size: rows and columns of each block of distances.
    :param device: where to compute (default: the CPU).
    :param dtype: of the exact distance computation; float64 to compare exactly with a reference.
    :param mode: "exact" or "adm" (PR_MODES).
    :return: (precision, recall) as floats.
    """
    ref_features, sample_features = np.asarray(ref_features), np.asarray(sample_features)
    if ref_features.ndim != 2 or sample_features.ndim != 2 or ref_features.shape[1] != sample_features.shape[1]:
        raise ValueError(
            f"precision/recall needs [N, D] features of equal D, got {ref_features.shape} and {sample_features.shape}"
        )
    if mode not in PR_MODES:
        raise ValueError(f"precision/recall mode must be one of {', '.join(PR_MODES)}, got {mode!r}")
    if mode == "adm":
        return _adm_precision_recall(ref_features, sample_features, k, block_size, device)
    center = _center(ref_features)
    x, x_norms = _prepare(ref_features, center, device, dtype)
    y, y_norms = _prepare(sample_features, center, device, dtype)
    _check_count(len(x), k)
    _check_count(len(y), k)
    x_radii = _radii(x, x_norms, k, block_size)
    y_radii = _radii(y, y_norms, k, block_size)
    sample_inside = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    ref_inside = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for i0 in range(0, len(x), block_size):
        i1 = min(i0 + block_size, len(x))
        for j0 in range(0, len(y), block_size):
            j1 = min(j0 + block_size, len(y))
            d = _squared_distances(x[i0:i1], x_norms[i0:i1], y[j0:j1], y_norms[j0:j1])
            sample_inside[j0:j1] |= (d <= x_radii[i0:i1, None]).any(dim=0)
            ref_inside[i0:i1] |= (d <= y_radii[None, j0:j1]).any(dim=1)
    return sample_inside.double().mean().item(), ref_inside.double().mean().item()


def _center(features):
    """Mean of an [N x D] array in float64, summed in blocks of rows (no float64 copy of it all)."""
    features = np.asarray(features)
    total = np.zeros(features.shape[-1], np.float64)
    for start in range(0, len(features), DEFAULT_BLOCK_SIZE):
        total += features[start : start + DEFAULT_BLOCK_SIZE].sum(axis=0, dtype=np.float64)
    return total / max(len(features), 1)


def _prepare(features, center, device, dtype):
    """Features minus `center` as a `dtype` tensor on `device`, and their squared norms."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"precision/recall needs [N, D] features, got shape {features.shape}")
    x = torch.empty(features.shape, dtype=dtype, device=device or "cpu")
    shift = torch.from_numpy(center)
    for start in range(0, len(features), DEFAULT_BLOCK_SIZE):
        part = torch.from_numpy(np.ascontiguousarray(features[start : start + DEFAULT_BLOCK_SIZE]))
        x[start : start + len(part)] = (part.double() - shift).to(dtype)
    return x, (x * x).sum(dim=1)


def _check_count(n, k):
    if n <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} feature vectors per set, got {n}")


def _squared_distances(x, x_norms, y, y_norms):
    """|x_i - y_j|^2 for a block, as |x|^2 + |y|^2 - 2 x.y clamped at 0."""
    d = x_norms[:, None] + y_norms[None, :] - 2.0 * (x @ y.T)
    return d.clamp_(min=0)


def _radii(x, norms, k, block_size):
    """Squared k-th nearest neighbour distances within one set, as a tensor like `x`."""
    n = len(x)
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for i0 in range(0, n, block_size):
        i1 = min(i0 + block_size, n)
        smallest = None  # the k + 1 smallest distances of each row so far, the point's own included
        for j0 in range(0, n, block_size):
            j1 = min(j0 + block_size, n)
            d = _squared_distances(x[i0:i1], norms[i0:i1], x[j0:j1], norms[j0:j1])
            if i0 == j0:
                torch.diagonal(d).zero_()  # a point's distance to itself, free of rounding
            candidates = d if smallest is None else torch.cat([smallest, d], dim=1)
            keep = min(k + 1, candidates.shape[1])
            smallest = candidates.topk(keep, dim=1, largest=False, sorted=True).values
        radii[i0:i1] = smallest[:, k]
    return radii


# ----------------------------------------------------------------------------------------
# Precision and recall in the evaluator's arithmetic (mode "adm").
#
# What guided-diffusion's evaluations/evaluator.py does, read for its semantics:
# ManifoldEstimator(row_batch_size=col_batch_size=10000, nhood_sizes=(3,), no clamping)
# fills blocks of distances with DistanceBlock, whose graph casts both feature blocks to
# float16, computes max(|u|^2 - 2 u.v + |v|^2, 0) there (norms as sums of float16
# squares; the subtraction first), and keeps that block, cast to float32, when all of it is
# finite, else recomputes the block from the float32 features. A radius is entry k of the
# row's k + 1 smallest distances within the set, the point's own distance included as it was
# computed; a point is inside a ball when its distance is <= the radius (evaluate_pr with
# the reference features as rows and the samples as columns). The features are not centred.
#
# Here the two sums (a norm, a product) are accumulated in float64 and rounded once to
# float16 (by hand, round_to_half: torch's CPU cast from float64 to float16 goes through
# float32 and rounds twice). Squares, differences and sums of two float16 values are float16
# tensor arithmetic, correctly rounded on GPUs (native) and CPUs alike (there computed in
# float32, where such a result is exact or close enough that rounding it to float16 gives
# the correctly rounded value).


def round_to_half(x):
    """
    The float16 value nearest to each element of a float64 tensor (ties to even), as
    float64; beyond float16's range (|x| >= 65520) +-inf, as a cast to float16 gives.
    """
    y = x.clamp(-65536.0, 65536.0)  # 65536 already rounds to inf; keeps the exponents small
    # float16 keeps 11 significant bits: |y| in [2^e, 2^(e+1)) is rounded to a multiple of
    # 2^(e-10), and below 2^-14 (subnormals) of 2^-24. That step, as float64 bits, from y's
    # biased exponent (bits 52-62).
    exponent = (y.view(torch.int64) >> 52) & 0x7FF
    step = ((exponent - 10).clamp_(min=1023 - 24) << 52).view(torch.float64)
    y.div_(step).round_().mul_(step)  # exact scalings by powers of two; round() ties to even
    return y.masked_fill_(y > 65504.0, math.inf).masked_fill_(y < -65504.0, -math.inf)


@dataclass
class _AdmFeatures:
    """One set of features as the evaluator holds it: float32, and its float16 cast."""

    x32: torch.Tensor  # [N, D] float32: the evaluator's input
    norms32: torch.Tensor  # |x|^2 in float32, for the blocks that fall back
    x16: torch.Tensor  # [N, D] float16
    norms16: torch.Tensor  # |x|^2 in float16: the squares rounded, their sum rounded once

    @classmethod
    def of(cls, features, device):
        x32 = torch.empty(features.shape, dtype=torch.float32, device=device or "cpu")
        x16 = torch.empty(features.shape, dtype=torch.float16, device=x32.device)
        norms16 = torch.empty(len(features), dtype=torch.float16, device=x32.device)
        for start in range(0, len(features), DEFAULT_BLOCK_SIZE):
            part = torch.from_numpy(np.ascontiguousarray(features[start : start + DEFAULT_BLOCK_SIZE]))
            part = part.to(x32.device, torch.float32)
            half = round_to_half(part.double()).to(torch.float16)  # float16 values: this cast is exact
            x32[start : start + len(part)] = part
            x16[start : start + len(part)] = half
            norms16[start : start + len(part)] = round_to_half((half * half).double().sum(dim=1)).to(torch.float16)
        return cls(x32, (x32 * x32).sum(dim=1), x16, norms16)

    def __len__(self):
        return len(self.x32)

    def rows(self, start, stop):
        return _AdmFeatures(self.x32[start:stop], self.norms32[start:stop], self.x16[start:stop],
                            self.norms16[start:stop])


def _adm_distances(a, b, block_size):
    """
    One of the evaluator's blocks of squared distances, rows of `a` to rows of `b`
    (_AdmFeatures), as float32: in float16 arithmetic if all of it is finite, else in
    float32. Computed in pieces of `block_size`, so the float64 temporaries stay small.
    """
    out = torch.empty(len(a), len(b), dtype=torch.float32, device=a.x32.device)
    pieces = [(i, min(i + block_size, len(a)), j, min(j + block_size, len(b)))
              for i in range(0, len(a), block_size) for j in range(0, len(b), block_size)]
    for i0, i1, j0, j1 in pieces:
        product = round_to_half(a.x16[i0:i1].double() @ b.x16[j0:j1].double().T).to(torch.float16)
        # float16 tensors: each operation rounds its result to float16 (2 u.v may overflow to inf)
        d = (a.norms16[i0:i1, None] - 2 * product + b.norms16[None, j0:j1]).clamp_(min=0)
        # (as max(d, 0): -inf, from an overflowed 2 u.v, becomes 0; NaN stays NaN)
        if not torch.isfinite(d).all():
            break
        out[i0:i1, j0:j1] = d
    else:  # every piece finite
        return out
    for i0, i1, j0, j1 in pieces:  # the evaluator's float32 graph for the whole block
        product = a.x32[i0:i1] @ b.x32[j0:j1].T
        out[i0:i1, j0:j1] = (a.norms32[i0:i1, None] - 2 * product + b.norms32[None, j0:j1]).clamp_(min=0)
    return out


def _adm_radii(x, k, block_size):
    """Radii (squared, float32) of one set in the evaluator's arithmetic: entry k of each row's k + 1 smallest."""
    radii = torch.empty(len(x), dtype=torch.float32, device=x.x32.device)
    for i0 in range(0, len(x), ADM_BATCH_SIZE):
        i1 = min(i0 + ADM_BATCH_SIZE, len(x))
        smallest = None
        for j0 in range(0, len(x), ADM_BATCH_SIZE):
            d = _adm_distances(x.rows(i0, i1), x.rows(j0, j0 + ADM_BATCH_SIZE), block_size)
            candidates = d if smallest is None else torch.cat([smallest, d], dim=1)
            smallest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False, sorted=True).values
        radii[i0:i1] = smallest[:, k]
    return radii


def _adm_precision_recall(ref_features, sample_features, k, block_size, device):
    _check_count(len(ref_features), k)
    _check_count(len(sample_features), k)
    ref, samples = _AdmFeatures.of(ref_features, device), _AdmFeatures.of(sample_features, device)
    ref_radii, sample_radii = _adm_radii(ref, k, block_size), _adm_radii(samples, k, block_size)
    sample_inside = torch.zeros(len(samples), dtype=torch.bool, device=ref.x32.device)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=ref.x32.device)
    for i0 in range(0, len(ref), ADM_BATCH_SIZE):
        i1 = min(i0 + ADM_BATCH_SIZE, len(ref))
        for j0 in range(0, len(samples), ADM_BATCH_SIZE):
            j1 = min(j0 + ADM_BATCH_SIZE, len(samples))
            d = _adm_distances(ref.rows(i0, i1), samples.rows(j0, j1), block_size)
            sample_inside[j0:j1] |= (d <= ref_radii[i0:i1, None]).any(dim=0)
            ref_inside[i0:i1] |= (d <= sample_radii[None, j0:j1]).any(dim=1)
    return sample_inside.double().mean().item(), ref_inside.double().mean().item()


# ----------------------------------------------------------------------------------------
# Inception Score.


def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """
    Inception Score exp(E_x KL(p(y|x) || p(y))) of classifier logits, over consecutive splits
    of ``split_size`` images (guided-diffusion's evaluator: 5,000, so 10 splits of 50,000).

    :param logits: [N x C] classifier logits of the samples.
    :return: (mean, std) over the splits.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"the Inception Score needs [N, classes] logits, got shape {logits.shape}")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for start in range(0, len(log_p), split_size):
        part_log = log_p[start : start + split_size]
        part = np.exp(part_log)
        log_marginal = np.log(np.maximum(part.mean(axis=0), np.finfo(np.float64).tiny))
        kl = np.where(part > 0, part * (part_log - log_marginal), 0.0).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def load_logits_network(path, device="cpu"):
    """
    A classifier for the Inception Score, wrapped like the feature network so that it sees
    the same input: [N x 3 x 299 x 299] in [-1, 1], returning [N x classes] logits.

    :param path: a TorchScript file, or a state dict (``torch.load``, weights only) of
                 torchvision's ``inception_v3`` (the classes from ``fc.weight``; auxiliary
                 classifier weights are ignored). torchvision's ImageNet Inception-v3
                 weights, ported from TensorFlow, expect exactly this input, but their
                 1000-class logits (with a bias) are not the evaluator's (pool_3 times the
                 TF graph's 1008-class softmax weights, no bias): the score is not
                 comparable with published Inception Scores.
    :return: a :class:`fid.FeatureExtractor` whose "features" are the logits.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--logits_network {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 flags TorchScript as deprecated
            network = torch.jit.load(path, map_location=torch.device(device))
    except Exception:  # not TorchScript: a state dict, then
        network = _torchvision_inception(path, device)
    network.eval()
    return fid.FeatureExtractor(network, input_size=fid.INCEPTION_INPUT_SIZE).eval()


def _torchvision_inception(path, device):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--logits_network {path} is neither TorchScript nor a state dict: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(
            f"--logits_network {path}: a state dict must be torchvision's inception_v3 (with fc.weight); "
            "any other classifier can be given as TorchScript"
        )
    try:
        from torchvision.models import inception_v3
    except ImportError:
        raise ValueError(f"--logits_network {path} is a state dict, which needs torchvision") from None
    state = {key.removeprefix("module."): value for key, value in state.items() if "AuxLogits." not in key}
    network = inception_v3(
        weights=None, aux_logits=False, init_weights=False, transform_input=False,
        num_classes=state["fc.weight"].shape[0],
    )
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"--logits_network {path} does not fit torchvision's inception_v3: {exc}") from exc
    return network.to(device)


# ----------------------------------------------------------------------------------------
# The reference file.


@dataclass
class Reference:
    """What a reference file holds; see the module docstring for the arrays."""

    path: str
    mu: np.ndarray
    sigma: np.ndarray
    num_images: Optional[int] = None
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    pool_features: Optional[np.ndarray] = None
    has_images: bool = False  # arr_0, as in guided-diffusion's reference batches

    def lacking(self, metrics, ref_images=False):
        """
        {metric: why this file cannot give it} for those of `metrics` it cannot give.

        :param ref_images: whether reference images will be given (their features then
                           stand in for pool_features).
        """
        out = {}
        for metric in metrics:
            if metric == "sfid" and self.mu_s is None:
                out[metric] = f"{self.path} has no spatial statistics (mu_s, sigma_s): {REMAKE}"
            elif metric in ("precision", "recall", "kid") and self.pool_features is None and not ref_images:
                out[metric] = f"{self.path} has no reference features (pool_features): {REMAKE}"
        return out


def save_reference(path, pool, spatial=None, keep_features=DEFAULT_KEEP_FEATURES, seed=0, images=None):
    """
    Write a reference file (see the module docstring), atomically.

    :param pool: [N x 2048] pooled features of the reference images.
    :param spatial: [N x 2023] spatial features, or None (then no sFID statistics).
    :param keep_features: rows of pooled features kept for precision, recall and KID, a
                          fixed random subset when N is larger (seeded by `seed`); 0: all.
                          Stored as float16 (float32 if float16 would overflow).
    :param images: the N uint8 [N x H x W x C] images the features come from, or None.
                   Stored as ``arr_0`` (RGB: grey repeated, alpha dropped, as the feature
                   network saw them), so that guided-diffusion's evaluator can read the file
                   as a reference batch: it takes its own features of ``arr_0`` for
                   precision and recall, and ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` as
                   they are (all four whenever ``mu`` is there, so `spatial` is required).
    :return: the number of feature rows kept.
    """
    pool = np.asarray(pool)
    arrays = {}
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or len(images) != len(pool):
            raise ValueError(f"images must be {len(pool)} uint8 [N, H, W, C] images (C 1, 3 or 4), got "
                             f"{images.dtype} {images.shape}")
        if spatial is None:
            raise ValueError("a reference file with images for guided-diffusion's evaluator needs the spatial "
                             "statistics (the evaluator reads mu_s and sigma_s whenever the file has mu)")
        arrays["arr_0"] = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]
    arrays["mu"], arrays["sigma"] = fid.compute_statistics(pool)
    if spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = fid.compute_statistics(spatial)
    rows = pool
    if keep_features and len(pool) > keep_features:
        rows = pool[np.sort(np.random.default_rng(seed).permutation(len(pool))[:keep_features])]
    stored = rows.astype(np.float16)
    arrays["pool_features"] = stored if np.isfinite(stored).all() else rows.astype(np.float32)
    arrays["num_images"] = np.int64(len(pool))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return len(rows)


def load_reference(path, metrics=None):
    """
    Read a reference file: ours, an older one with mu and sigma only, or a guided-diffusion
    reference batch.

    :param metrics: if given, the metrics it must be able to give (ValueError naming the
                    missing arrays and how to make them otherwise).
    :return: a :class:`Reference`.
    """
    mu, sigma, num_images = fid.load_statistics(path)
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        extra = {key: data[key] for key in ("mu_s", "sigma_s", "pool_features") if key in keys}
    reference = Reference(path, mu, sigma, num_images, has_images="arr_0" in keys)
    if ("mu_s" in extra) != ("sigma_s" in extra):
        raise ValueError(f"{path} holds only one of mu_s and sigma_s: {REMAKE}")
    if "mu_s" in extra:
        reference.mu_s = extra["mu_s"].astype(np.float64)
        reference.sigma_s = extra["sigma_s"].astype(np.float64)
        fid._check_statistics(reference.mu_s, reference.sigma_s, path)
    if "pool_features" in extra:
        rows = extra["pool_features"]
        if rows.ndim != 2 or rows.shape[1] != mu.shape[0]:
            raise ValueError(f"pool_features in {path} must be (M, {mu.shape[0]}), got {rows.shape}")
        reference.pool_features = rows
    if metrics:
        lacking = reference.lacking(metrics)
        if lacking:
            raise ValueError("; ".join(f"{metric}: {why}" for metric, why in lacking.items()))
    return reference


# ----------------------------------------------------------------------------------------
# Scoring samples.


def evaluate(
    features, reference, metrics=METRICS, spatial=None, ref_features=None, kid_subsets=100,
    kid_subset_size=1000, device=None, block_size=DEFAULT_BLOCK_SIZE, pr_mode=DEFAULT_PR_MODE,
):
    """
    Score samples' features against a reference.

    :param features: [N x 2048] pooled features of the samples.
    :param reference: a :class:`Reference`.
    :param metrics: names from METRICS.
    :param spatial: [N x 2023] spatial features of the samples (needed for sfid).
    :param ref_features: pooled features of reference images for precision, recall and KID
                         (default: the reference's pool_features).
    :param device: where precision and recall compute their distances.
    :param pr_mode: how precision and recall round their distances (:func:`precision_recall`);
                    "adm" by default, as the published numbers were computed.
    :return: {metric: value}, plus kid_std with kid.
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != reference.mu.shape[0]:
        raise ValueError(
            f"statistics in {reference.path} have dimension {reference.mu.shape[0]} but the samples' "
            f"features are {features.shape}: they were made with another network"
        )
    lacking = reference.lacking(metrics, ref_images=ref_features is not None)
    if lacking:
        raise ValueError("; ".join(f"{metric}: {why}" for metric, why in lacking.items()))
    if ref_features is None:
        ref_features = reference.pool_features
    results = {}
    if "fid" in metrics:
        results["fid"] = fid.frechet_distance(*fid.compute_statistics(features), reference.mu, reference.sigma)
    if "sfid" in metrics:
        if spatial is None:
            raise ValueError(
                "sFID needs the samples' spatial features (Inception's mixed_6/conv), which this feature "
                "network does not give; the bundled Inception network does"
            )
        spatial = np.asarray(spatial)
        if spatial.shape[1:] != reference.mu_s.shape:
            raise ValueError(
                f"spatial statistics in {reference.path} have dimension {reference.mu_s.shape[0]} but the "
                f"samples' spatial features are {spatial.shape}: they were made with another network"
            )
        results["sfid"] = fid.frechet_distance(*fid.compute_statistics(spatial), reference.mu_s, reference.sigma_s)
    if "precision" in metrics or "recall" in metrics:
        precision, recall = precision_recall(ref_features, features, block_size=block_size, device=device,
                                             mode=pr_mode)
        if "precision" in metrics:
            results["precision"] = precision
        if "recall" in metrics:
            results["recall"] = recall
    if "kid" in metrics:
        results["kid"], results["kid_std"] = fid.kid(
            features, np.asarray(ref_features, dtype=np.float64), num_subsets=kid_subsets, subset_size=kid_subset_size
        )
    return results
