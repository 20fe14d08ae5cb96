"""
Seeded sampling that gives the same images on any number of processes and any batch size.

Every sample has an index i in [0, num_samples) and its own seed,

    sample_seed(seed, i) = (seed * SEED_STRIDE + i) mod 2**63,    SEED_STRIDE = 2**31 - 1

(a prime larger than any sample count, so the seeds of different ``seed`` values do not
overlap while i < SEED_STRIDE). One ``torch.Generator`` per sample, seeded that way, draws
that sample's class label (first) and then all of its Gaussian noise: the initial x_T and
the noise of every denoising step. Noise reaches the diffusion through the ``randn_like``
keyword of ``p_sample_loop`` / ``ddim_sample_loop`` (see docs/design.md). So sample i depends
only on (seed, i, model, device), and the same seed reproduces an ``.npz`` bit for bit
whatever ``--batch_size`` or the number of ranks (on the same kind of device).
"""

import contextlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from ..options import config
from ..run.checkpoint import CheckpointMismatchError, atomic_write, load_model_weights  # noqa: F401 (re-exported)
from ..script_util import NUM_CLASSES

SEED_STRIDE = 2**31 - 1


def sample_seed(seed, index):
    """The seed of sample ``index`` for the run seed ``seed``."""
    return (int(seed) * SEED_STRIDE + int(index)) % (2**63)


class StackedRandomGenerator:
    """
    One ``torch.Generator`` per batch row: row i of every draw comes from ``seeds[i]`` alone.

    :param seeds: one integer seed per row.
    :param device: the device of the generators and of the tensors they make.
    """

    def __init__(self, seeds, device):
        self.device = torch.device(device)
        self.generators = [
            torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds
        ]

    def __len__(self):
        return len(self.generators)

    def _check_rows(self, shape):
        if len(shape) == 0 or shape[0] != len(self.generators):
            raise ValueError(
                f"StackedRandomGenerator has {len(self.generators)} seeds but was asked for "
                f"shape {tuple(shape)}"
            )

    def randn(self, shape, dtype=torch.float32, device=None):
        """Standard normal tensor of ``shape``; rows drawn in float32, then cast."""
        shape = tuple(shape)
        self._check_rows(shape)
        rows = [
            torch.randn(shape[1:], generator=g, device=self.device, dtype=torch.float32)
            for g in self.generators
        ]
        out = torch.stack(rows).to(dtype)
        return out if device is None else out.to(device)

    def randn_like(self, x):
        """Standard normal tensor shaped, typed and placed like ``x``."""
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, low, high, size):
        """Integers in [low, high) shaped ``size`` (first dimension: one row per seed)."""
        size = tuple(size)
        self._check_rows(size)
        rows = [
            torch.randint(low, high, size[1:], generator=g, device=self.device)
            for g in self.generators
        ]
        return torch.stack(rows)


def _dist_rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def to_uint8(x):
    """Model-space images in [-1, 1], NCHW -> uint8 NHWC numpy (as image_sample.py)."""
    x = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def sample_images(
    model,
    diffusion,
    *,
    num_samples,
    batch_size,
    image_size,
    device,
    seed=0,
    use_ddim=False,
    eta=0.0,
    clip_denoised=True,
    class_cond=False,
    num_classes=1000,
    progress=True,
    rank=None,
    world_size=None,
    autocast_dtype=None,
    in_channels=None,
):
    """
    Sample ``num_samples`` images, split over ranks, gathered on every rank.

    Rank r samples the indices r, r + W, r + 2W, ... in batches of ``batch_size``; the
    results are gathered to all ranks and put back in index order. Every rank must call
    this (it ends in a collective when W > 1). The model is put in eval mode for the call
    and its previous mode restored afterwards.

    :param model: the denoiser (unwrapped or DDP; any module the diffusion accepts).
    :param diffusion: a GaussianDiffusion / SpacedDiffusion.
    :param num_samples: total number of images over all ranks.
    :param batch_size: images per forward pass on each rank.
    :param image_size: side length of the square images.
    :param device: where to sample.
    :param seed: run seed; sample i uses :func:`sample_seed` (seed, i).
    :param use_ddim: DDIM (``ddim_sample_loop``) instead of ancestral sampling.
    :param eta: DDIM eta.
    :param clip_denoised: clip the predicted x_0 to [-1, 1].
    :param class_cond: draw a class label per sample (from its own generator) and pass it
                       as ``y``.
    :param num_classes: number of classes for ``class_cond``.
    :param progress: show a progress bar (rank 0 only).
    :param rank: this process's rank; None: from torch.distributed (0 if not initialised).
    :param world_size: number of ranks; None: from torch.distributed (1 if not initialised).
    :param autocast_dtype: e.g. torch.bfloat16 to run the model under autocast; None: fp32.
    :param in_channels: image channels; None: the model's (:func:`image_channels_of`).
    :return: (images uint8 [N x H x W x C] numpy, labels int64 [N] numpy or None).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}"
        )
    dist_rank, dist_world = _dist_rank_world()
    rank = dist_rank if rank is None else rank
    world_size = dist_world if world_size is None else world_size
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"world_size={world_size} but torch.distributed is not initialised; call "
            "dist_util.setup_dist() first"
        )
    device = torch.device(device)
    if in_channels is None:
        in_channels = image_channels_of(model)
    indices = list(range(rank, num_samples, world_size))
    sample_fn = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    extra = {"eta": eta} if use_ddim else {}

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_samples, desc="sampling", unit="img")

    was_training = model.training
    model.eval()
    local_images, local_labels = [], []
    try:
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            rng = StackedRandomGenerator([sample_seed(seed, i) for i in batch], device)
            model_kwargs = {}
            if class_cond:
                labels = rng.randint(0, num_classes, (len(batch),))
                model_kwargs["y"] = labels
                local_labels.append(labels.cpu().numpy().astype(np.int64))
            shape = (len(batch), in_channels, image_size, image_size)
            noise = rng.randn(shape)
            with torch.no_grad(), _autocast(device, autocast_dtype):
                x = sample_fn(
                    model,
                    shape,
                    noise=noise,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                    device=device,
                    progress=False,
                    randn_like=rng.randn_like,
                    **extra,
                )
            local_images.append(to_uint8(x))
            if bar is not None:
                bar.update(len(batch) * world_size)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()

    empty = np.zeros((0, image_size, image_size, in_channels), np.uint8)
    images = np.concatenate(local_images) if local_images else empty
    labels = None
    if class_cond:
        labels = np.concatenate(local_labels) if local_labels else np.zeros((0,), np.int64)
    if world_size > 1:
        images = _gather_strided(images, num_samples, world_size)
        if class_cond:
            labels = _gather_strided(labels, num_samples, world_size)
    return images, labels


def image_channels_of(model):
    """Image channels of a UNet, also inside a wrapper (DDP, torch.compile, guidance): the
    ``in_channels`` of the first module that has one; 3 when none has."""
    for module in model.modules():
        if isinstance(getattr(module, "in_channels", None), int):
            return module.in_channels
    return 3


def _autocast(device, dtype):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _gather_strided(local, num_samples, world_size):
    """
    Gather rank r's rows (indices r, r + W, ...) from every rank and interleave them.

    Uses a padded ``all_gather`` of uint8/int64 tensors on the backend's device (CUDA for
    NCCL, CPU otherwise), in chunks to bound memory.
    """
    backend = str(dist.get_backend())
    if "gloo" in backend or "nccl" not in backend:
        comm_device = torch.device("cpu")
    else:
        comm_device = torch.device("cuda", torch.cuda.current_device())
    per_rank = (num_samples + world_size - 1) // world_size
    counts = [len(range(r, num_samples, world_size)) for r in range(world_size)]
    padded = np.zeros((per_rank,) + local.shape[1:], dtype=local.dtype)
    padded[: len(local)] = local
    row_bytes = max(1, int(np.prod(local.shape[1:])) * local.itemsize)
    chunk = max(1, (64 << 20) // (row_bytes * world_size))  # about 64 MiB per gather
    parts = [[] for _ in range(world_size)]
    for start in range(0, per_rank, chunk):
        piece = torch.from_numpy(padded[start : start + chunk]).to(comm_device)
        buffers = [torch.empty_like(piece) for _ in range(world_size)]
        dist.all_gather(buffers, piece)
        for r in range(world_size):
            parts[r].append(buffers[r].cpu().numpy())
    out = np.zeros((num_samples,) + local.shape[1:], dtype=local.dtype)
    for r in range(world_size):
        rows = np.concatenate(parts[r])[: counts[r]]
        out[r::world_size] = rows
    return out


def write_samples(out, arrays, grid=None, grid_size=64, log=print):
    """Write the sample arrays to `out` (.npz, atomically: a reader never sees half a file) and,
    unless `grid` is None, the first `grid_size` images of arrays[0] as a PNG grid."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, lambda f: np.savez(f, *arrays))  # a full disk: one line naming the file (CheckpointError)
    log(f"saving to {out}")
    if grid is not None and grid_size > 0:
        try:
            save_grid(arrays[0][:grid_size], grid)
        except OSError as e:
            raise ValueError(f"cannot write {grid}: {os.strerror(e.errno) if e.errno else e}") from e
        log(f"grid of {min(len(arrays[0]), grid_size)} images: {grid}")


def save_grid(images, path, nrow=None, padding=2):
    """
    Save uint8 [N x H x W x C] images as one PNG grid (grey as RGB, RGBA as it is).

    :param nrow: images per row; None: about sqrt(N).
    :param padding: black pixels between images.
    """
    from PIL import Image

    grid = make_grid(images, nrow, padding)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    Image.fromarray(grid).save(path)


def make_grid(images, nrow=None, padding=2):
    """uint8 [N x H x W x C] images as one uint8 grid image, `nrow` per row (None: about
    sqrt(N)), black `padding` pixels between them; grey becomes RGB."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"save_grid needs uint8 [N, H, W, C] images, got {images.dtype} {images.shape}"
        )
    n, h, w, c = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=3)
        c = 3
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = np.zeros(
        (ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8
    )
    for k in range(n):
        row, col = divmod(k, nrow)
        y = padding + row * (h + padding)
        x = padding + col * (w + padding)
        grid[y : y + h, x : x + w] = images[k]
    return grid


run_config_path = config.run_config_path

# Model/diffusion flags that say how to run the model, not what it is: sampling with
# another respacing than training is the usual case, and checkpointing and dropout do
# nothing in eval mode, so a command-line value that differs from the run is not noted.
RUN_TIME_FLAGS = ("timestep_respacing", "use_checkpoint", "dropout")


def read_run_config(model_path, log=print):
    """The run's config.json next to the checkpoint as a dict, or None (absent or unreadable)."""
    path = run_config_path(model_path) if model_path else ""
    if not path or not os.path.isfile(path):
        return None
    try:
        return config.read_options_file(path)
    except ValueError as e:
        log(f"warning: ignoring {e}")
        return None


def _spell(value):
    return "''" if value == "" else str(value)


def run_overrides(args, run_config, model_path, argv=None):
    """
    One `note:` line per model/diffusion flag given on the command line (`argv`, default
    sys.argv[1:]) whose value differs from the training run's config.json: the flags come
    from the run, so an explicit different value is deliberate, but worth a line in the log.
    """
    if not run_config:
        return []
    path = run_config_path(model_path)
    explicit = config.explicit_flags(sys.argv[1:] if argv is None else argv)
    notes = []
    for name in config.names(*config.MODEL_GROUPS):
        if name in explicit and name in run_config and name not in RUN_TIME_FLAGS:
            mine, theirs = getattr(args, name), config.coerce(name, run_config[name], path)
            if mine != theirs:
                notes.append(f"note: --{name} {_spell(mine)} overrides the training run's "
                             f"{_spell(theirs)} ({path})")
    return notes


def run_differences(flags, model_path, first_path, log=print):
    """
    Warnings for a checkpoint built from `flags` read from another checkpoint's run (the
    first of interpolate.py's or consistency.py's models, `first_path`): one per
    model/diffusion flag whose value differs from the checkpoint's own config.json; none
    when it has no config.json, or shares the first one's.
    """
    path = run_config_path(model_path)
    other = read_run_config(model_path, log)
    if other is None or path == run_config_path(first_path):
        return []
    warnings = []
    for name in config.names(*config.MODEL_GROUPS):
        if name in other and name in flags and name not in RUN_TIME_FLAGS:
            theirs = config.coerce(name, other[name], path)
            if flags[name] != theirs:
                warnings.append(f"warning: {model_path} is built with --{name} {_spell(flags[name])} "
                                f"but its run has {_spell(theirs)} ({path})")
    return warnings


def classes_to_sample(num_classes, class_cond, model_path, log=print, config=None):
    """
    How many classes to draw labels from: `num_classes` when > 0, else the run's
    data_num_classes. The label embedding always has NUM_CLASSES rows, so the weights cannot
    tell how many classes the training data had.
    """
    if not class_cond or num_classes > 0:
        return num_classes or NUM_CLASSES
    config = config if config is not None else read_run_config(model_path, log)
    path = run_config_path(model_path)
    n = (config or {}).get("data_num_classes")
    if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= NUM_CLASSES:
        log(f"drawing class labels from {n} classes (data_num_classes in {path})")
        return n
    why = f"{path} has no data_num_classes" if config is not None else f"no {path}"
    log(f"warning: drawing class labels from all {NUM_CLASSES} rows of the label embedding "
        f"({why}); pass --num_classes N, the number of classes of the training data")
    return NUM_CLASSES


# ---------------------------------------------------------------------------------------
# What the sampling scripts share (image_sample.py, classifier_sample.py, super_res_sample.py,
# consistency.py): their flags are the table's sample group (config.SAMPLING)
# ---------------------------------------------------------------------------------------


def check_counts(args, flags=("num_samples", "batch_size")):
    """--num_samples and --batch_size (or `flags`) must be at least 1."""
    for flag in flags:
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")


def sampling_device(args):
    """--device, or this rank's device."""
    from .. import dist_util

    return torch.device(args.device) if args.device else dist_util.dev()


def model_flags(args):
    """The model and diffusion flags a script parsed (with its run's config.json beneath)."""
    names = [*config.names(*config.MODEL_GROUPS), "large_size", "small_size"]
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def load_for_sampling(args, run_config, device, log=print, argv=None, use_fp16=True):
    """
    The `LoadedRun` (run_dir.load_run) of --model_path, a checkpoint or a run folder, built
    from the parsed model flags (the run's config.json < --config < the command line): a note
    for each flag that overrides the run's value, the model in eval mode on `device`, fp16
    with --use_fp16 True (the original's way; `use_fp16=False` ignores it, as image_nll.py did).
    """
    from ..run.run_dir import load_run

    for note in run_overrides(args, run_config, args.model_path, argv):
        log(note)
    run = load_run(args.model_path, overrides=model_flags(args), device=device, log=log)
    if use_fp16 and args.use_fp16:
        run.model.convert_to_fp16()
    return run


def sample_with_flags(model, diffusion, args, device, *, image_size, class_cond, num_classes):
    """
    `sample_images` with the sample group's flags of `args` (--num_samples, --batch_size,
    --seed, --use_ddim, --eta, --clip_denoised, --precision); returns (images, labels, seconds).
    """
    from .. import dist_util
    from ..run import precision

    autocast_dtype = precision.DTYPES[precision.resolve(args.precision, device, purpose="sample")]
    start = time.time()
    images, labels = sample_images(
        model, diffusion, num_samples=args.num_samples, batch_size=args.batch_size, image_size=image_size,
        device=device, seed=args.seed, use_ddim=args.use_ddim, eta=args.eta, clip_denoised=args.clip_denoised,
        class_cond=class_cond, num_classes=num_classes, progress=dist_util.get_rank() == 0,
        autocast_dtype=autocast_dtype,
    )
    return images, labels, time.time() - start


def output_paths(out, grid, grid_size, shape, default_dir):
    """(npz path, grid path or None) of --out / --grid / --grid_size for samples of `shape`:
    --out is the .npz, or a folder (empty: `default_dir`) for samples_NxHxWxC.npz; the grid
    goes beside the .npz unless --grid names it, none with --grid none or --grid_size 0."""
    if not out.endswith(".npz"):
        out = os.path.join(out or default_dir, f"samples_{'x'.join(str(d) for d in shape)}.npz")
    if grid == "none" or grid_size <= 0:
        return out, None
    return out, grid or out[: -len(".npz")] + "_grid.png"


def save_samples(args, arrays, default_dir, log=print, **facts):
    """Rank 0 writes `arrays` (images first) where --out / --grid say, and one JSON line of
    where and how many, plus `facts`."""
    out, grid = output_paths(args.out, args.grid, args.grid_size, arrays[0].shape, default_dir)
    write_samples(out, arrays, grid, args.grid_size, log)
    log(json.dumps({"out": out, "num_samples": len(arrays[0]), **facts}))
    return out
