"""
Analysis tools for the consistency phenomenon (section 3 of "Towards Faster Training of
Diffusion Models: An Inspiration of A Consistency Phenomenon").

Three measurements, all model-agnostic at this level (the diffusion loss and the GAN losses of
improved_diffusion/experiments/gan.py have their own helpers):

- **Consistency (Eq. 1)**: N models sample M images from the same seeds (same initial and
  per-step noise); the PSNR between every pair of image sets, and their mean C.
- **1-D interpolation (Eq. 6)**: theta(alpha) = (1 - alpha) theta_a + alpha theta_b between two
  checkpoints of one architecture; the loss on a fixed batch, fixed timesteps and fixed noise.
- **Hessian spectrum**: Hessian-vector products by double backpropagation on any scalar loss
  closure; top eigenvalues by Lanczos (full reorthogonalisation) or power iteration, and the
  spectral density by stochastic Lanczos quadrature (SLQ).

The scripts `scripts/consistency.py`, `scripts/interpolate.py` and `scripts/hessian.py` wire
these to checkpoints; `docs/analysis.md` gives the formulas and caveats.
"""

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch as th

from ..options import config
from ..respace import space_timesteps

__all__ = [
    "PSNR_CAP_DB",
    "check_timestep",
    "psnr",
    "consistency",
    "interpolate_state_dicts",
    "check_same_architecture",
    "fixed_loss_inputs",
    "diffusion_loss_fn",
    "interpolation_losses",
    "interpolate_losses",
    "flat_params",
    "hvp",
    "make_hvp_fn",
    "LanczosResult",
    "lanczos",
    "lanczos_top_eigenvalues",
    "power_iteration",
    "spectral_density",
    "math_sdpa",
    "load_model_and_diffusion",
    "consistency_by_kind",
    "fixed_gan_inputs",
    "gan_loss_fn",
    "gan_interpolation_losses",
    "curve_roughness",
]

# PSNR of identical images is infinite; summaries replace it with this value (and say so).
PSNR_CAP_DB = config.SAMPLING["cap_db"].default  # the --cap_db of consistency.py


# ----------------------------------------------------------------------------------------
# Consistency (Eq. 1)
# ----------------------------------------------------------------------------------------


def _as_float64_images(x):
    if isinstance(x, th.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(np.float64)


def psnr(a, b, max_val=255.0):
    """
    Per-image peak signal-to-noise ratio between two image sets.

    Images are compared in pixel units (0..max_val): uint8 images are used as they are, float
    images must already be scaled to 0..max_val. The MSE of an image is the mean over all its
    pixels and channels; PSNR = 10 log10(max_val^2 / MSE).

    :param a: an [M x ...] array (or a single image of rank <= 3), numpy or torch.
    :param b: an array of the same shape as a.
    :param max_val: the peak pixel value.
    :return: a float64 numpy array of M per-image PSNRs in dB; +inf where the images are
             identical (MSE = 0). A single image (rank <= 3) gives a 0-d array.
    """
    a = _as_float64_images(a)
    b = _as_float64_images(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr: image sets have different shapes {a.shape} and {b.shape}")
    single = a.ndim <= 3
    if single:
        a, b = a[None], b[None]
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(max_val**2 / mse)
    out = np.where(mse == 0, np.inf, out)
    return out[0] if single else out


def consistency(image_sets, names=None, max_val=255.0, cap_db=PSNR_CAP_DB):
    """
    The consistency C of a group of models (paper Eq. 1).

    image_sets[n][m] is image m of model n, all models sampled from the same seeds. For each
    pair (i < j) the pair's PSNR is the mean over the M images of psnr(image_i_m, image_j_m);
    C is the mean of the pair PSNRs over the N (N - 1) / 2 pairs.

    Identical images have infinite PSNR; each per-image value is capped at cap_db before the
    means are taken, and the number of capped images is reported (pair "capped" and the
    summary's "capped"), so identical models give C = cap_db, labelled as capped.

    Also reported per pair: "psnr_pooled", the PSNR of the MSE pooled over all M images
    (a second convention found in the literature; it is <= the per-image mean by Jensen).

    :param image_sets: a sequence of N >= 2 arrays of the same shape [M x H x W x C].
    :param names: optional N labels (default "0", "1", ...).
    :return: a JSON-serialisable dict with keys "C", "pairs", "num_models", "num_images",
             "capped", "cap_db", "definition".
    """
    sets = [_as_float64_images(s) for s in image_sets]
    if len(sets) < 2:
        raise ValueError("consistency needs at least two image sets")
    shape = sets[0].shape
    for n, s in enumerate(sets):
        if s.shape != shape:
            raise ValueError(f"image set {n} has shape {s.shape}, expected {shape}")
    if names is None:
        names = [str(n) for n in range(len(sets))]
    if len(names) != len(sets):
        raise ValueError("consistency: need one name per image set")

    pairs = []
    total_capped = 0
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            per_image = psnr(sets[i], sets[j], max_val=max_val)
            per_image = np.atleast_1d(per_image)
            capped = int(np.sum(per_image > cap_db))
            total_capped += capped
            per_image_c = np.minimum(per_image, cap_db)
            mse = float(((sets[i] - sets[j]) ** 2).mean())
            pooled = cap_db if mse == 0 else min(cap_db, 10.0 * math.log10(max_val**2 / mse))
            pairs.append(
                {
                    "i": i,
                    "j": j,
                    "name_i": names[i],
                    "name_j": names[j],
                    "psnr": float(per_image_c.mean()),
                    "psnr_pooled": float(pooled),
                    "psnr_per_image": [float(x) for x in per_image_c],
                    "capped": capped,
                }
            )
    return {
        "C": float(np.mean([p["psnr"] for p in pairs])),
        "pairs": pairs,
        "num_models": len(sets),
        "num_images": int(shape[0]) if len(shape) > 3 else 1,
        "names": list(names),
        "capped": total_capped,
        "cap_db": float(cap_db),
        "definition": (
            "C = mean over model pairs (i<j) of the mean over images m of "
            "10*log10(max_val^2 / MSE(x_i_m, x_j_m)); per-image PSNR capped at cap_db"
        ),
    }


# ----------------------------------------------------------------------------------------
# 1-D interpolation (Eq. 6)
# ----------------------------------------------------------------------------------------


def check_same_architecture(sd_a, sd_b):
    """
    Raise ValueError, naming the differing keys and shapes, unless two state dicts have the
    same keys with the same shapes.
    """
    keys_a, keys_b = set(sd_a.keys()), set(sd_b.keys())
    problems = []
    only_a = sorted(keys_a - keys_b)
    only_b = sorted(keys_b - keys_a)
    if only_a:
        problems.append(f"keys only in model a: {_short_list(only_a)}")
    if only_b:
        problems.append(f"keys only in model b: {_short_list(only_b)}")
    shapes = []
    for k in sorted(keys_a & keys_b):
        sa, sb = tuple(sd_a[k].shape), tuple(sd_b[k].shape)
        if sa != sb:
            shapes.append(f"{k}: {list(sa)} vs {list(sb)}")
    if shapes:
        problems.append(f"shape mismatch: {_short_list(shapes)}")
    if problems:
        raise ValueError(
            "the two checkpoints have different architectures and cannot be interpolated; "
            + "; ".join(problems)
        )


def _short_list(items, limit=10):
    s = ", ".join(items[:limit])
    if len(items) > limit:
        s += f", ... ({len(items) - limit} more)"
    return s


def interpolate_state_dicts(sd_a, sd_b, alpha):
    """
    theta(alpha) = (1 - alpha) theta_a + alpha theta_b (paper Eq. 6), key by key.

    Floating-point tensors are interpolated with torch.lerp in their own dtype, which returns
    sd_a's values bit for bit at alpha = 0 and sd_b's at alpha = 1; alpha outside [0, 1]
    extrapolates. Integer and boolean buffers (e.g. counters) are taken from sd_a.

    :raises ValueError: if the state dicts differ in keys or shapes (the message lists them).
    """
    check_same_architecture(sd_a, sd_b)
    alpha = float(alpha)
    out = {}
    for k, va in sd_a.items():
        vb = sd_b[k]
        if isinstance(va, th.Tensor) and va.is_floating_point():
            vb = vb.to(device=va.device, dtype=va.dtype)
            out[k] = th.lerp(va, vb, alpha)
        elif isinstance(va, th.Tensor):
            out[k] = va.clone()
        else:
            out[k] = va
    return out


def fixed_loss_inputs(diffusion, images, batch_size, seed=0, device="cpu", timestep=None):
    """
    A fixed batch, fixed timesteps and fixed noise for a reproducible diffusion loss.

    :param diffusion: a GaussianDiffusion (only num_timesteps is read).
    :param images: uint8 images [N x H x W x C] (numpy or torch); the first batch_size are
                   used (all of them if fewer).
    :param batch_size: the number of images.
    :param seed: seeds a CPU torch.Generator for the timesteps and the noise.
    :param timestep: if given, every sample uses this timestep instead of uniform ones.
    :return: (x_start in [-1, 1] NCHW float32, t int64, noise) on device.
    """
    if isinstance(images, th.Tensor):
        images = images.cpu().numpy()
    images = np.array(images[:batch_size], dtype=np.uint8)  # a copy: inputs may be read-only
    if images.ndim != 4:
        raise ValueError(f"expected images [N x H x W x C], got shape {images.shape}")
    x = th.from_numpy(images).permute(0, 3, 1, 2).to(th.float32)
    x = x / 127.5 - 1.0
    gen = th.Generator().manual_seed(int(seed))
    n = x.shape[0]
    if timestep is None:
        t = th.randint(0, diffusion.num_timesteps, (n,), generator=gen, dtype=th.int64)
    else:
        if not 0 <= int(timestep) < diffusion.num_timesteps:
            raise ValueError(f"timestep {timestep} outside [0, {diffusion.num_timesteps})")
        t = th.full((n,), int(timestep), dtype=th.int64)
    noise = th.randn(x.shape, generator=gen, dtype=th.float32)
    return x.to(device), t.to(device), noise.to(device)


def diffusion_loss_fn(model, diffusion, x_start, t, noise, model_kwargs=None):
    """
    A closure returning the mean diffusion training loss of model on a fixed batch.

    Every call uses the same x_start, t and noise, so the loss is a deterministic function of
    the parameters as long as the model is in eval mode (no dropout).
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs

    def loss_fn():
        terms = diffusion.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise)
        return terms["loss"].mean()

    return loss_fn


def interpolation_losses(
    model, diffusion, sd_a, sd_b, alphas, batch, t, noise, model_kwargs=None
):
    """
    The loss along the line theta(alpha) between two checkpoints (paper Eq. 6).

    For each alpha the model gets interpolate_state_dicts(sd_a, sd_b, alpha) (strict load) and
    is evaluated in eval mode, without gradients, on the same batch, timesteps and noise, so
    alpha = 0 and alpha = 1 reproduce the endpoint losses exactly. The model's own state and
    train/eval mode are restored afterwards.

    :param model: a module of the checkpoints' architecture.
    :param diffusion: a GaussianDiffusion.
    :param sd_a, sd_b: state dicts of the two endpoints.
    :param alphas: a sequence of floats.
    :param batch: x_start in [-1, 1], [N x C x H x W] (see fixed_loss_inputs).
    :param t: the timesteps, [N].
    :param noise: the noise, shaped like batch.
    :param model_kwargs: e.g. {"y": labels} for class-conditional models.
    :return: a list of float mean losses, one per alpha.
    """
    check_same_architecture(sd_a, sd_b)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.eval()
    loss_fn = diffusion_loss_fn(model, diffusion, batch, t, noise, model_kwargs)
    losses = []
    try:
        with th.no_grad():
            for alpha in alphas:
                model.load_state_dict(interpolate_state_dicts(sd_a, sd_b, alpha), strict=True)
                losses.append(float(loss_fn().item()))
    finally:
        model.load_state_dict(saved, strict=True)
        model.train(was_training)
    return losses


# The name used in docs/design.md.
interpolate_losses = interpolation_losses


# ----------------------------------------------------------------------------------------
# Hessian-vector products
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def math_sdpa():
    """
    Restrict scaled_dot_product_attention to its math kernel, which supports the double
    backward that Hessian-vector products need (the fused CUDA kernels do not).
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to restrict
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def flat_params(params):
    """Concatenate tensors into one flat vector (detached copy)."""
    return th.cat([p.detach().reshape(-1) for p in params])


def _split_like(v, params):
    out, offset = [], 0
    for p in params:
        n = p.numel()
        out.append(v[offset : offset + n].view_as(p).to(dtype=p.dtype, device=p.device))
        offset += n
    if offset != v.numel():
        raise ValueError(f"vector has {v.numel()} entries, parameters have {offset}")
    return out


def _flatten_grads(grads, params):
    return th.cat(
        [
            (g if g is not None else th.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params)
        ]
    )


def hvp(loss_fn, params, v):
    """
    One Hessian-vector product H v by double backpropagation.

    :param loss_fn: a callable with no arguments returning a scalar loss of params.
    :param params: a list of tensors with requires_grad=True.
    :param v: a flat vector with sum(p.numel()) entries (any float dtype and device).
    :return: H v as a flat vector of v's dtype and device.
    """
    return make_hvp_fn(loss_fn, params)(v)


def make_hvp_fn(loss_fn, params):
    """
    Build v -> H v for the Hessian of loss_fn() with respect to params.

    The loss and its gradient graph are computed once and reused by every product (the graph
    is retained), so each product costs one extra backward pass. Parameters that do not
    affect the loss contribute zero rows.

    :return: a callable taking and returning flat vectors (result in the input's dtype and
             device); its attribute `dim` is the number of parameters and `loss` the loss
             value.
    """
    params = list(params)
    with th.enable_grad(), math_sdpa():
        loss = loss_fn()
        grads = th.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [(g, p) for g, p in zip(grads, params) if g is not None and g.requires_grad]
    dim = sum(p.numel() for p in params)

    def fn(v):
        if v.numel() != dim:
            raise ValueError(f"vector has {v.numel()} entries, parameters have {dim}")
        vs = _split_like(v.reshape(-1), params)
        if not used:
            return th.zeros_like(v)
        index = {id(p): i for i, p in enumerate(params)}
        with th.enable_grad(), math_sdpa():
            dot = sum((g * vs[index[id(p)]]).sum() for g, p in used)
            hv = th.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
        return _flatten_grads(hv, params).to(dtype=v.dtype, device=v.device)

    fn.dim = dim
    fn.loss = float(loss.detach().item())
    return fn


# ----------------------------------------------------------------------------------------
# Eigenvalues: Lanczos, power iteration, stochastic Lanczos quadrature
# ----------------------------------------------------------------------------------------


def _random_unit_vector(dim, seed, dtype, device, kind="gaussian"):
    gen = th.Generator().manual_seed(int(seed))
    if kind == "rademacher":
        v = th.randint(0, 2, (dim,), generator=gen, dtype=th.int64).to(dtype) * 2 - 1
    else:
        v = th.randn(dim, generator=gen, dtype=th.float64).to(dtype)
    v = v.to(device)
    return v / th.linalg.vector_norm(v)


@dataclass
class LanczosResult:
    """
    :ivar eigenvalues: the top-k Ritz values, largest first (by value, or by magnitude when
                       which="LM"), float64 numpy.
    :ivar ritz_values: all Ritz values (eigenvalues of the tridiagonal), ascending.
    :ivar ritz_weights: squared first components of the tridiagonal's eigenvectors, the SLQ
                        quadrature weights (sum to 1), aligned with ritz_values.
    :ivar alphas, betas: the tridiagonal (diagonal, off-diagonal).
    :ivar num_iters: the number of Lanczos steps taken (fewer than asked on breakdown).
    :ivar eigenvectors: [k x dim] Ritz vectors when requested, else None.
    """

    eigenvalues: np.ndarray
    ritz_values: np.ndarray
    ritz_weights: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    num_iters: int
    eigenvectors: Optional[th.Tensor] = field(default=None, repr=False)


def lanczos(
    hvp_fn,
    dim,
    k=5,
    num_iters=None,
    seed=0,
    device="cpu",
    dtype=th.float64,
    which="LA",
    init="gaussian",
    return_vectors=False,
    tol=1e-10,
):
    """
    Lanczos iteration with full reorthogonalisation on a symmetric operator.

    With Q the Lanczos basis, T = Q^T H Q is tridiagonal (alphas on the diagonal, betas off
    it); its eigenvalues (Ritz values) approximate H's extreme eigenvalues. Every new vector
    is orthogonalised twice against the whole basis (classical Gram-Schmidt, twice), which
    keeps the Ritz values free of spurious copies; the basis costs num_iters * dim * 8 bytes
    in float64.

    :param hvp_fn: v -> H v on flat vectors (see make_hvp_fn).
    :param dim: the operator's dimension.
    :param k: how many top Ritz values to return.
    :param num_iters: Lanczos steps (default max(3 k, 20), at most dim).
    :param seed: seeds the start vector.
    :param dtype: dtype of the Lanczos vectors (float64 by default; float32 halves memory).
    :param which: "LA" for the algebraically largest, "LM" for the largest in magnitude.
    :param init: "gaussian" or "rademacher" start vector.
    :param return_vectors: also return the top-k Ritz vectors.
    :param tol: stop early when the next beta falls below tol * (largest |alpha| seen)
                (an invariant subspace was found).
    :return: a LanczosResult.
    """
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' or 'LM', not {which!r}")
    if num_iters is None:
        num_iters = max(3 * k, 20)
    num_iters = int(min(num_iters, dim))
    if num_iters < 1:
        raise ValueError("lanczos needs num_iters >= 1")

    q = _random_unit_vector(dim, seed, dtype, device, init)
    basis = th.zeros(num_iters, dim, dtype=dtype, device=device)
    alphas, betas = [], []
    scale = 0.0
    for j in range(num_iters):
        basis[j] = q
        w = hvp_fn(q).to(dtype=dtype, device=device)
        a = float(th.dot(w, q))
        alphas.append(a)
        scale = max(scale, abs(a))
        # Full reorthogonalisation against the basis so far (twice is enough).
        Q = basis[: j + 1]
        for _ in range(2):
            w = w - Q.T @ (Q @ w)
        if j == num_iters - 1:
            break
        b = float(th.linalg.vector_norm(w))
        if b <= tol * max(scale, 1e-30):
            break
        betas.append(b)
        q = w / b

    m = len(alphas)
    T = np.diag(np.array(alphas, dtype=np.float64))
    if m > 1:
        off = np.array(betas[: m - 1], dtype=np.float64)
        T += np.diag(off, 1) + np.diag(off, -1)
    evals, evecs = np.linalg.eigh(T)
    weights = evecs[0, :] ** 2

    if which == "LA":
        order = np.argsort(-evals)
    else:
        order = np.argsort(-np.abs(evals), kind="stable")
    top = order[: min(k, m)]
    vectors = None
    if return_vectors:
        S = th.from_numpy(evecs[:, top]).to(dtype=dtype, device=device)
        vectors = (basis[:m].T @ S).T.contiguous()
    return LanczosResult(
        eigenvalues=evals[top].copy(),
        ritz_values=evals,
        ritz_weights=weights,
        alphas=np.array(alphas),
        betas=np.array(betas[: m - 1]),
        num_iters=m,
        eigenvectors=vectors,
    )


def lanczos_top_eigenvalues(hvp_fn, dim, k=5, num_iters=None, seed=0, device="cpu", **kwargs):
    """The top-k eigenvalues (largest first) of the operator, by lanczos()."""
    res = lanczos(hvp_fn, dim, k=k, num_iters=num_iters, seed=seed, device=device, **kwargs)
    return res.eigenvalues


def power_iteration(hvp_fn, dim, iters=100, tol=1e-6, seed=0, device="cpu", dtype=th.float64):
    """
    Power iteration for the dominant eigenvalue (largest in magnitude, with its sign).

    Stops when the Rayleigh quotient changes by less than tol relative to its magnitude.
    Converges at the rate |lambda_2 / lambda_1| per step; compare with lanczos(which="LM").

    :return: (eigenvalue as float, unit eigenvector, number of iterations used).
    """
    v = _random_unit_vector(dim, seed, dtype, device)
    eig = None
    for it in range(1, int(iters) + 1):
        w = hvp_fn(v).to(dtype=dtype, device=device)
        new = float(th.dot(w, v))
        norm = float(th.linalg.vector_norm(w))
        if norm == 0.0:
            return 0.0, v, it
        v = w / norm
        if eig is not None and abs(new - eig) <= tol * max(abs(new), 1e-30):
            return new, v, it
        eig = new
    return eig, v, int(iters)


def spectral_density(
    hvp_fn,
    dim,
    num_iters=50,
    num_runs=1,
    seed=0,
    device="cpu",
    dtype=th.float64,
    num_grid=1000,
    sigma=None,
    grid=None,
):
    """
    Eigenvalue density of the operator by stochastic Lanczos quadrature (SLQ).

    Each run starts Lanczos from an independent Rademacher vector; its Ritz values theta_j
    with weights tau_j (squared first eigenvector components) form a quadrature of the
    spectral measure. The density is the average over runs of
    sum_j tau_j N(x; theta_j, sigma^2), which integrates to 1.

    :param num_iters: Lanczos steps per run.
    :param num_runs: independent start vectors.
    :param sigma: Gaussian broadening (default 1% of the spread of the Ritz values, or 1e-3
                  of their magnitude when they coincide).
    :param grid: evaluation points (default num_grid points from the smallest Ritz value
                 minus 5 sigma to the largest plus 5 sigma).
    :return: dict with "grid", "density" (numpy), "nodes" and "weights" ([num_runs] lists of
             numpy arrays), "sigma".
    """
    nodes, weights = [], []
    for r in range(int(num_runs)):
        res = lanczos(
            hvp_fn, dim, k=1, num_iters=num_iters, seed=seed + r, device=device,
            dtype=dtype, init="rademacher",
        )
        nodes.append(res.ritz_values)
        weights.append(res.ritz_weights)
    all_nodes = np.concatenate(nodes)
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    if sigma is None:
        spread = hi - lo
        sigma = 0.01 * spread if spread > 0 else 1e-3 * max(abs(hi), 1.0)
    sigma = float(sigma)
    if grid is None:
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, int(num_grid))
    grid = np.asarray(grid, dtype=np.float64)
    density = np.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for th_j, tau_j in zip(nodes, weights):
        z = (grid[:, None] - th_j[None, :]) / sigma
        density += (norm * np.exp(-0.5 * z**2) * tau_j[None, :]).sum(axis=1)
    density /= len(nodes)
    return {"grid": grid, "density": density, "nodes": nodes, "weights": weights, "sigma": sigma}


# ----------------------------------------------------------------------------------------
# Checkpoints (used by the scripts)
# ----------------------------------------------------------------------------------------


def load_model_and_diffusion(path, flags, device="cpu"):
    """
    A checkpoint's model (eval mode, on `device`) and diffusion, built from `flags` (over its
    run's config.json), as `run_dir.load_run` loads it, with a CPU copy of its weights (the
    start of an interpolation).

    :param path: a checkpoint file or a run folder (see `run_dir.load_run`).
    :param flags: model and diffusion options (the keywords of create_model_and_diffusion).
    :return: (model, diffusion, the loaded state dict on the CPU).
    """
    from ..run.run_dir import load_run

    run = load_run(path, overrides=flags, device=device)
    state = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
    return run.model, run.diffusion, state


def require_inputs(args, flags):
    """Each of `flags` given and on disk: the data (`data_dir`) or a checkpoint, diffusion or
    GAN (a GAN checkpoint may carry gan.py's prefix)."""
    from . import gan

    for flag in flags:
        path = getattr(args, flag)
        if not path:
            what = "a checkpoint" if flag != "data_dir" else "images (folder or .npz)"
            raise ValueError(f"--{flag} is required: {what}")
        if not os.path.exists(gan.strip_prefix(path)):
            raise FileNotFoundError(f"--{flag} {gan.strip_prefix(path)}: no such file or folder")

def check_timestep(diffusion_steps, timestep_respacing, timestep):
    """--timestep must index the (respaced) process whose loss is analysed, or be -1 (random)."""
    try:
        steps = len(space_timesteps(diffusion_steps, timestep_respacing or [diffusion_steps]))
    except ValueError as e:
        raise ValueError(
            f"--timestep_respacing {timestep_respacing!r} does not fit --diffusion_steps "
            f"{diffusion_steps}: {e}"
        ) from None
    if not -1 <= timestep < steps:
        raise ValueError(
            f"--timestep {timestep} is out of range: give 0..{steps - 1} (the process has "
            f"{steps} steps) or -1 for random timesteps"
        )


def fixed_batch_from_args(args, diffusion, device):
    """
    The fixed (batch, t, noise, model_kwargs) of the analysis scripts' flags (--data_dir,
    --batch_size, --seed, --timestep, --class_cond), with notes for surprising values.
    """
    from ..image_datasets import load_image_dataset

    if args.timestep_respacing:
        print(f"note: --timestep_respacing {args.timestep_respacing!r} is set; the loss is that of "
              "the respaced process (leave it empty to analyse the training objective)", file=sys.stderr)
    data = load_image_dataset(args.data_dir, args.image_size, class_cond=args.class_cond,
                              image_channels=args.image_channels)
    if args.batch_size > len(data.images):
        print(f"note: --batch_size {args.batch_size} but {args.data_dir} holds "
              f"{len(data.images)} images; the batch is all {len(data.images)}", file=sys.stderr)
    timestep = None if args.timestep < 0 else args.timestep
    batch, t, noise = fixed_loss_inputs(diffusion, data.images, args.batch_size, seed=args.seed, device=device,
                                        timestep=timestep)
    model_kwargs = {}
    if args.class_cond:
        model_kwargs["y"] = th.from_numpy(data.labels[: batch.shape[0]]).to(device)
    return batch, t, noise, model_kwargs


# ----------------------------------------------------------------------------------------
# The GAN contrast (improved_diffusion/experiments/gan.py): consistency by kind, GAN losses, roughness
# ----------------------------------------------------------------------------------------


def consistency_by_kind(result, kinds):
    """
    The mean pair PSNR within each kind of model, from a consistency() result.

    :param kinds: one label per model (e.g. "diffusion", "gan"), in the order of the image sets.
    :return: {kind: {"C": mean PSNR of the pairs whose two models are of that kind, "pairs": n}}
             for every kind with at least two models.
    """
    out = {}
    for kind in dict.fromkeys(kinds):
        pairs = [p["psnr"] for p in result["pairs"] if kinds[p["i"]] == kind and kinds[p["j"]] == kind]
        if pairs:
            out[kind] = {"C": float(np.mean(pairs)), "pairs": len(pairs)}
    return out


def fixed_gan_inputs(images, batch_size, latent_dim, seed=0, device="cpu"):
    """
    A fixed real batch and fixed latents for reproducible GAN losses.

    :param images: uint8 images [N x H x W x C]; the first batch_size are the real batch.
    :param latent_dim: the generator's latent dimension.
    :param seed: seeds a CPU torch.Generator for the latents (one per real image).
    :return: (real in [-1, 1] NCHW float32, z [B x latent_dim]) on device.
    """
    if isinstance(images, th.Tensor):
        images = images.cpu().numpy()
    images = np.array(images[:batch_size], dtype=np.uint8)
    if images.ndim != 4:
        raise ValueError(f"expected images [N x H x W x C], got shape {images.shape}")
    real = th.from_numpy(images).permute(0, 3, 1, 2).to(th.float32) / 127.5 - 1.0
    gen = th.Generator().manual_seed(int(seed))
    z = th.randn(real.shape[0], int(latent_dim), generator=gen, dtype=th.float32)
    return real.to(device), z.to(device)


GAN_PLAYERS = ("generator", "discriminator")


def gan_loss_fn(generator, discriminator, real, z, player):
    """
    A closure returning one player's GAN loss (gan.gan_losses: the non-saturating L_G, or
    L_D) on a fixed real batch and fixed latents, with BatchNorm on batch statistics and its
    running averages untouched: a deterministic function of the weights.
    """
    from . import gan

    if player not in GAN_PLAYERS:
        raise ValueError(f"player must be one of {', '.join(GAN_PLAYERS)}, not {player!r}")

    def loss_fn():
        return gan.gan_losses(generator, discriminator, real, z)[player]

    return loss_fn


def gan_interpolation_losses(generator, discriminator, nets_a, nets_b, alphas, real, z):
    """
    Both GAN losses along theta(alpha) = (1 - alpha) theta_a + alpha theta_b (paper Eq. 6),
    generator and discriminator interpolated together.

    :param nets_a, nets_b: {"generator": state dict, "discriminator": state dict} of the two
                           endpoints (a ganNNNNNN.pt file's contents).
    :return: {"generator": [L_G per alpha], "discriminator": [L_D per alpha]}; the networks'
             own weights are restored afterwards.
    """
    from . import gan

    nets = {"generator": generator, "discriminator": discriminator}
    for name in GAN_PLAYERS:
        check_same_architecture(nets_a[name], nets_b[name])
    saved = {name: {k: v.detach().clone() for k, v in net.state_dict().items()} for name, net in nets.items()}
    out = {name: [] for name in GAN_PLAYERS}
    try:
        with th.no_grad():
            for alpha in alphas:
                for name, net in nets.items():
                    net.load_state_dict(interpolate_state_dicts(nets_a[name], nets_b[name], alpha), strict=True)
                losses = gan.gan_losses(generator, discriminator, real, z)
                for name in GAN_PLAYERS:
                    out[name].append(float(losses[name].item()))
    finally:
        for name, net in nets.items():
            net.load_state_dict(saved[name], strict=True)
    return out


def curve_roughness(alphas, losses):
    """
    Numbers for how erratic a 1-D interpolation curve is (the paper's Fig. 4 contrast):

    - "rel_range_0_1": (max - min) of the loss for alpha in [0, 1], over the mean of the two
      endpoint losses (0 for a flat line);
    - "barrier": max over alpha in [0, 1] of L(alpha) - max(L(0), L(1)), over the same mean
      (0 when the loss never rises above the worse endpoint);
    - "direction_changes": how often the slope changes sign along the whole grid (0 or 1 for
      a convex or monotone curve);
    - "rel_max_jump": the largest change between neighbouring grid points, over the mean
      endpoint loss.
    """
    a = np.asarray(alphas, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    ends = [y[np.argmin(np.abs(a - x))] for x in (0.0, 1.0)]
    scale = max(abs(float(np.mean(ends))), 1e-12)
    inside = y[(a >= -1e-12) & (a <= 1 + 1e-12)]
    diffs = np.diff(y)
    signs = np.sign(diffs[diffs != 0])
    return {
        "rel_range_0_1": float((inside.max() - inside.min()) / scale),
        "barrier": float(max(inside.max() - max(ends), 0.0) / scale),
        "direction_changes": int(np.sum(signs[1:] != signs[:-1])),
        "rel_max_jump": float(np.abs(diffs).max() / scale) if len(diffs) else 0.0,
    }
