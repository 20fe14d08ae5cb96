"""
Image data held in host memory as uint8, and the batch streams that feed training.

The whole data set is decoded once into a ``(N, H, W, C)`` uint8 array, C the image channels
(1 grey, 3 RGB, 4 RGBA; ``--image_channels``). Batches stay uint8
until they reach the accelerator, where :func:`to_model_input` scales them to [-1, 1], so
only a quarter of the float32 bytes cross the bus.

Two sources are understood:

* a folder of images, searched recursively (``.png``, ``.jpg``, ``.jpeg``, ``.gif``,
  ``.webp``, any case). As in the original code, the class of a file is the part of its
  name before the first underscore (``truck_00042.png``, ``n01440764_2708.JPEG``) and class
  indices follow the sorted class names;
* an ``.npz`` file holding ``arr_0`` (or ``images``): uint8 NHWC (grey also NHW), and optionally ``arr_1``
  (or ``labels``): one integer class per image. This is the format that the prep scripts
  in ``datasets/`` and the sampling scripts write. An uncompressed ``.npz`` (``np.savez``)
  is memory-mapped, so several ranks on one machine share the page cache instead of each
  holding a copy.

Typical use::

    dataset = load_image_dataset("cifar_train", image_size=32, class_cond=True)
    stream = BatchStream(dataset, batch_size=128, rank=rank, world_size=world_size, seed=0)
    images, cond = next(stream)              # uint8 NCHW, {"y": int64} or {}
    x = to_model_input(images, device)       # float32 in [-1, 1], on the device
    state = stream.state_dict()              # {"epoch": ..., "position": ...}
"""

import os
import struct
import zipfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = ("gif", "jpeg", "jpg", "png", "webp")
# The PIL mode that image files are converted to, by number of image channels.
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}

# Above this many files, decoding shows a progress bar (when ``progress`` is left at None).
_PROGRESS_THRESHOLD = 1000


class ImageDecodeError(ValueError):
    """An image file could not be read, or was truncated or corrupt."""


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------


def center_crop_arr(pil_image, image_size):
    """
    Resize and center-crop a PIL image to a square uint8 array, as guided-diffusion does.

    While the short side is at least twice ``image_size`` the image is halved with a BOX
    filter (cheap, alias-free downsampling); then it is scaled with BICUBIC so that the
    short side equals ``image_size`` (this also enlarges images that are too small) and the
    centre square is cut out.

    :param pil_image: a PIL image, already in the mode wanted in the output (e.g. RGB).
    :param image_size: side of the square output.
    :return: an array of shape (image_size, image_size, C) (or (image_size, image_size)
             for single-band images).
    """
    image = pil_image
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)

    scale = image_size / min(image.size)
    new_size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(new_size, resample=Image.BICUBIC)

    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _check_channels(channels):
    if channels not in PIL_MODES:
        raise ValueError(f"image_channels must be 1 (grey), 3 (RGB) or 4 (RGBA), got {channels!r}")


def load_image_file(path, image_size, channels=3):
    """
    Decode one image file to a uint8 array of shape (image_size, image_size, channels).

    Files are converted as PIL converts modes: with 3 channels grey, palette and RGBA
    (alpha dropped) become RGB, as in the original; with 1, colour becomes grey (ITU-R 601
    luma); with 4, an alpha channel is added where there is none (opaque).

    :raises ImageDecodeError: naming ``path`` when the file is unreadable, truncated or
                              corrupt.
    """
    try:
        # verify() checks the container (PNG chunk CRCs, ...) without decoding; it leaves
        # the image object unusable, so the file is opened again to decode it. load()
        # catches truncated pixel data.
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            converted = image.convert(PIL_MODES[channels])
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(
            f"cannot read image file {path!r}: {type(exc).__name__}: {exc}"
        ) from exc
    arr = center_crop_arr(converted, image_size)
    return np.ascontiguousarray(arr.reshape(image_size, image_size, channels), dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# The in-memory data set
# ---------------------------------------------------------------------------------------


class ImageDataset:
    """
    A whole image data set as one uint8 array, with optional integer class labels.

    :param images: uint8 array (N, H, W, C), C in 1, 3, 4 (a ``np.memmap`` is fine).
    :param labels: None, or an integer array (N,) of class indices >= 0.
    :param class_names: optional list of names; ``class_names[k]`` is the name of class k.
    """

    def __init__(self, images, labels=None, class_names=None):
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in PIL_MODES:
            raise ValueError(
                "images must be a uint8 array of shape (N, H, W, C) with C 1, 3 or 4, got "
                f"dtype {images.dtype} and shape {tuple(images.shape)}"
            )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
                raise ValueError(
                    f"labels must have shape ({images.shape[0]},) to match the images, "
                    f"got {tuple(labels.shape)}"
                )
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
            labels = labels.astype(np.int64)
            if labels.size and labels.min() < 0:
                raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
        self.images = images
        self.labels = labels
        self.class_names = None if class_names is None else list(class_names)

    def __len__(self):
        return self.images.shape[0]

    @property
    def image_size(self):
        """Height of the images (they are square when made by :func:`load_image_dataset`)."""
        return self.images.shape[1]

    @property
    def channels(self):
        """Channels of the images: 1 (grey), 3 (RGB) or 4 (RGBA)."""
        return self.images.shape[-1]

    @property
    def num_classes(self):
        """Number of classes (largest label + 1), or None for an unlabelled data set."""
        if self.labels is None:
            return None
        if self.class_names is not None:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if self.labels.size else 0

    def __repr__(self):
        return (
            f"ImageDataset(n={len(self)}, shape={tuple(self.images.shape[1:])}, "
            f"num_classes={self.num_classes})"
        )


def load_image_dataset(
    data_dir, image_size, class_cond=False, *, image_channels=3, num_workers=0, progress=None, mmap=True
):
    """
    Load a folder of images or an ``.npz`` file into an :class:`ImageDataset`.

    Folder images are decoded once and resized with :func:`center_crop_arr`. Images in an
    ``.npz`` are used as they are when already ``image_size`` square, and resized the same
    way otherwise.

    :param data_dir: a folder (searched recursively, files in sorted order; names starting
                     with "." are skipped) or a path to an ``.npz`` file.
    :param image_size: side of the square images to produce.
    :param class_cond: if True, load class labels (from file-name prefixes, or ``arr_1`` /
                       ``labels`` in an ``.npz``) and fail if there are none. If False the
                       data set has no labels.
    :param num_workers: processes used to decode a folder (0: decode in this process).
    :param progress: show a progress bar while decoding; None shows one above 1000 files.
    :param mmap: memory-map an uncompressed ``.npz`` instead of reading it into memory.
    :param image_channels: 1, 3 or 4. Image files are converted to it; an ``.npz`` must
                           hold images with this many channels (grey may be NHW), else
                           ValueError naming both counts. None: an ``.npz``'s own count
                           (folders: 3), for tools that take whatever the data is.
    """
    if image_channels is not None:
        _check_channels(image_channels)
    if not data_dir:
        raise ValueError("unspecified data directory (data_dir is empty)")
    data_dir = os.fspath(data_dir)
    if not _is_int(image_size) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    image_size = int(image_size)
    if not os.path.exists(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} does not exist")
    if os.path.isdir(data_dir):
        return _load_folder(data_dir, image_size, class_cond, num_workers, progress, image_channels or 3)
    if data_dir.lower().endswith(".npz"):
        return _load_npz(data_dir, image_size, class_cond, progress, mmap, image_channels)
    raise ValueError(f"data_dir {data_dir!r} is neither a folder of images nor an .npz file")


def check_labels_fit(dataset, num_classes, data, classes):
    """
    ValueError, before any training step, when labels of `dataset` do not index `num_classes`
    classes (a label embedding's rows, a classifier's logits; a diffusion model's null label
    of --class_dropout_prob comes after them): one line naming the data (`data`, e.g.
    "--data_dir PATH"), its largest label and what sets the count (`classes`).
    """
    if dataset.labels is None or num_classes is None or dataset.num_classes <= num_classes:
        return
    raise ValueError(f"{data} has labels up to {dataset.num_classes - 1}, but {classes} is {num_classes} "
                     f"(labels 0 to {num_classes - 1})")


def list_image_files(data_dir):
    """All image files under ``data_dir``, recursively, in sorted order per folder."""
    found = []
    for entry in sorted(os.scandir(data_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.extend(list_image_files(entry.path))
        elif "." in entry.name and entry.name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
            found.append(entry.path)
    return found


def _class_labels_from_names(paths, data_dir):
    prefixes = []
    for path in paths:
        name = os.path.basename(path)
        if "_" not in name:
            raise ValueError(
                f"class_cond=True but file {path!r} in {data_dir!r} has no class prefix: "
                "class labels come from the part of the file name before the first '_' "
                "(e.g. 'truck_00042.png')"
            )
        prefixes.append(name.split("_", 1)[0])
    class_names = sorted(set(prefixes))
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[p] for p in prefixes], dtype=np.int64), class_names


# Process-pool entry points. They live at module level in an importable module so that
# multiprocessing can hand them to workers under every start method (fork, spawn, ...).
def decode_task(task):
    """``load_image_file(*task)`` for ``task = (path, image_size[, channels])``."""
    return load_image_file(*task)


def decode_and_save_task(task):
    """Decode and resize ``task = (path, image_size, out_path)`` and save it as ``out_path``."""
    path, image_size, out_path = task
    Image.fromarray(load_image_file(path, image_size)).save(out_path)
    return out_path


def decode_image_files(paths, image_size, *, channels=3, num_workers=0, progress=None, desc="decoding"):
    """
    Decode and resize image files into one uint8 array (len(paths), S, S, channels).

    :raises ImageDecodeError: naming the first file that cannot be read.
    """
    out = np.empty((len(paths), image_size, image_size, channels), dtype=np.uint8)
    show = len(paths) > _PROGRESS_THRESHOLD if progress is None else progress
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not show)
    try:
        if num_workers and num_workers > 0 and len(paths) > 1:
            import multiprocessing

            tasks = [(p, image_size, channels) for p in paths]
            chunk = max(1, min(256, len(paths) // (4 * num_workers)))
            with multiprocessing.Pool(num_workers) as pool:
                for i, arr in enumerate(pool.imap(decode_task, tasks, chunksize=chunk)):
                    out[i] = arr
                    bar.update(1)
        else:
            for i, path in enumerate(paths):
                out[i] = load_image_file(path, image_size, channels)
                bar.update(1)
    finally:
        bar.close()
    return out


def _load_folder(data_dir, image_size, class_cond, num_workers, progress, channels):
    paths = list_image_files(data_dir)
    if not paths:
        exts = ", ".join("." + e for e in IMAGE_EXTENSIONS)
        raise ValueError(
            f"no images found in data_dir {data_dir!r} (searched recursively for {exts}, "
            "any case)"
        )
    labels = class_names = None
    if class_cond:
        labels, class_names = _class_labels_from_names(paths, data_dir)
    images = decode_image_files(
        paths, image_size, channels=channels, num_workers=num_workers, progress=progress, desc=data_dir
    )
    return ImageDataset(images, labels, class_names)


def _npz_member_memmap(path, member):
    """Memory-map an uncompressed ``.npy`` member of a zip file, or None if impossible."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if dtype.hasobject:
        return None
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(
        path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset
    )


def _load_npz(path, image_size, class_cond, progress, mmap, channels):
    if not zipfile.is_zipfile(path):  # numpy would call it pickled data and advise unsafe loading
        raise ValueError(f"{path!r} is not a valid .npz archive (a zip of .npy arrays, as numpy.savez writes it)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read .npz file {path!r}: {exc}") from exc
    with npz:
        keys = list(npz.files)
        image_key = next((k for k in ("arr_0", "images") if k in keys), None)
        if image_key is None:
            raise ValueError(
                f".npz file {path!r} has no 'arr_0' or 'images' array (keys: {keys})"
            )
        label_key = next((k for k in ("arr_1", "labels") if k in keys), None)
        if class_cond and label_key is None:
            raise ValueError(
                f"class_cond=True but .npz file {path!r} has no labels: expected an "
                f"'arr_1' or 'labels' array next to the images (keys: {keys})"
            )
        images = None
        if mmap:
            try:
                images = _npz_member_memmap(path, image_key + ".npy")
            except (OSError, ValueError, KeyError, struct.error):
                images = None
        if images is None:
            images = npz[image_key]
        labels = npz[label_key] if class_cond else None

    if images.dtype != np.uint8:
        raise ValueError(
            f"images in {path!r} (key {image_key!r}) must be uint8 (0-255), got {images.dtype}"
        )
    if images.ndim == 3:  # grey (N, H, W)
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in PIL_MODES:
        raise ValueError(
            f"images in {path!r} (key {image_key!r}) must have shape (N, H, W, C) "
            f"(NHWC, C = 1, 3 or 4; grey may be (N, H, W)), got {tuple(images.shape)}"
        )
    if channels is None:
        channels = images.shape[-1]
    if images.shape[-1] != channels:
        raise ValueError(
            f"images in {path!r} have {images.shape[-1]} channel(s) but --image_channels is "
            f"{channels}: pass --image_channels {images.shape[-1]} to train on them as they are"
        )
    if len(images) == 0:
        raise ValueError(f"no images in .npz file {path!r} (key {image_key!r} is empty)")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"labels in {path!r} (key {label_key!r}) must have shape ({len(images)},), "
                f"got {tuple(labels.shape)}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels in {path!r} (key {label_key!r}) must be integers, got {labels.dtype}"
            )
    if images.shape[1:3] != (image_size, image_size):
        show = len(images) > _PROGRESS_THRESHOLD if progress is None else progress
        resized = np.empty((len(images), image_size, image_size, channels), dtype=np.uint8)
        for i in tqdm(range(len(images)), desc=f"resizing {path}", disable=not show):
            image = np.asarray(images[i])
            image = Image.fromarray(image[..., 0] if channels == 1 else image)
            resized[i] = center_crop_arr(image, image_size).reshape(image_size, image_size, channels)
        images = resized
    return ImageDataset(images, labels)


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------


class BatchStream:
    """
    An endless, deterministic, resumable stream of uint8 batches for one rank.

    Epoch ``e`` visits the images in the order of a permutation drawn from
    ``np.random.default_rng([seed, e])``, the same on every rank (or in index order with
    ``shuffle=False``). The permutation is cut to a multiple of ``world_size`` and rank
    ``r`` takes every ``world_size``-th element starting at ``r`` (``perm[r::world_size]``),
    so within an epoch the ranks' shards are disjoint, equally long and together cover all
    but at most ``world_size - 1`` images. Each rank's shard is then cut into batches of
    ``batch_size`` (a short last batch is dropped when ``drop_last``). Whether the image at
    shard position ``i`` is mirrored is decided by ``np.random.default_rng([seed, e, rank])``.

    Every rank therefore holds the same ``(epoch, position)`` at the same step, and the
    state saved by one rank resumes all of them. Exact resumption needs the same data set,
    seed, world size and flip/shuffle settings; ``position`` counts images, so the batch
    size may change on resume.

    Each item is ``(images, cond)``: ``images`` a contiguous uint8 tensor (B, C, H, W) on
    the CPU, ``cond`` ``{"y": int64 tensor (B,)}`` when the data set has labels, else ``{}``.

    With ``device`` set, the whole data set is copied once to that device as uint8 NCHW and
    batches are gathered and mirrored there: the same batches, bit for bit, with no per-step
    copy of images (CIFAR-10 takes 150 MB; an ImageNet-sized set does not fit a GPU).

    :param dataset: an :class:`ImageDataset`.
    :param batch_size: images per batch on this rank.
    :param rank: this rank's index, 0 <= rank < world_size.
    :param world_size: number of ranks sharing the data.
    :param seed: seed of the shuffling and flipping (non-negative integer).
    :param shuffle: shuffle every epoch (False: index order, as ``deterministic=True``).
    :param random_flip: mirror half of the images horizontally.
    :param drop_last: drop each epoch's last batch when it would be short.
    :param device: keep the images on this device (None: host memory).
    """

    def __init__(
        self,
        dataset,
        batch_size,
        *,
        rank=0,
        world_size=1,
        seed=0,
        shuffle=True,
        random_flip=True,
        drop_last=True,
        device=None,
    ):
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not _is_int(world_size) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        batch_size, world_size, rank, seed = map(int, (batch_size, world_size, rank, seed))
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.random_flip = random_flip
        self.drop_last = drop_last

        self.shard_size = len(dataset) // world_size
        if self.shard_size < batch_size:
            raise ValueError(
                f"batch_size {batch_size} is larger than the {self.shard_size} images each "
                f"rank gets: the data set has {len(dataset)} images shared by world size "
                f"{world_size}; use a smaller batch_size or more data"
            )
        self._epoch = 0
        self._position = 0
        self._cached_epoch = None
        self._order = None
        self._flips = None
        self.device = None if device is None else torch.device(device)
        self._device_images = self._device_labels = None
        if self.device is not None:
            self._device_images, self._device_labels = _copy_to_device(dataset, self.device)

    @property
    def epoch(self):
        """The epoch the next batch is drawn from (before any roll-over)."""
        return self._epoch

    @property
    def batches_per_epoch(self):
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def _prepare_epoch(self):
        if self._cached_epoch == self._epoch:
            return
        n = len(self.dataset)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self._epoch]).permutation(n)
        else:
            perm = np.arange(n)
        perm = perm[: self.shard_size * self.world_size]
        self._order = perm[self.rank :: self.world_size]
        if self.random_flip:
            flip_rng = np.random.default_rng([self.seed, self._epoch, self.rank])
            self._flips = flip_rng.random(self.shard_size) < 0.5
        else:
            self._flips = None
        self._cached_epoch = self._epoch

    def __iter__(self):
        return self

    def __next__(self):
        remaining = self.shard_size - self._position
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self._epoch += 1
            self._position = 0
        self._prepare_epoch()
        start = self._position
        stop = min(start + self.batch_size, self.shard_size)
        indices = self._order[start:stop]
        if self._flips is not None:
            flips = self._flips[start:stop]
        else:
            flips = np.zeros(len(indices), dtype=bool)
        if self.device is not None:
            images, cond = self._gather_on_device(indices, flips)
            self._position = stop
            return images, cond
        source = self.dataset.images
        batch = np.empty((len(indices), source.shape[3]) + source.shape[1:3], dtype=np.uint8)
        # One image at a time: transposing HWC -> CHW per image stays in cache and is
        # several times faster than transposing the whole gathered batch at once.
        for j, (index, flip) in enumerate(zip(indices, flips)):
            image = source[index]
            batch[j] = (image[:, ::-1] if flip else image).transpose(2, 0, 1)
        images = torch.from_numpy(batch)
        cond = {}
        if self.dataset.labels is not None:
            cond["y"] = torch.from_numpy(self.dataset.labels[indices].astype(np.int64))
        self._position = stop
        return images, cond

    next = __next__

    def _gather_on_device(self, indices, flips):
        """The batch of `indices`, mirrored where `flips`, gathered from the device copy."""
        index = torch.from_numpy(np.ascontiguousarray(indices)).to(self.device, non_blocking=True)
        images = self._device_images.index_select(0, index)
        if flips.any():
            mirror = torch.from_numpy(np.ascontiguousarray(flips)).to(self.device, non_blocking=True)
            images = torch.where(mirror[:, None, None, None], images.flip(3), images)
        cond = {}
        if self._device_labels is not None:
            cond["y"] = self._device_labels.index_select(0, index)
        return images, cond

    def state_dict(self):
        """The position of the stream: ``{"epoch": int, "position": int}`` (images read)."""
        return {"epoch": int(self._epoch), "position": int(self._position)}

    def load_state_dict(self, state):
        """Continue from a :meth:`state_dict`; the next batch is the one that followed it."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"BatchStream state must be {{'epoch': int, 'position': int}}, got {state!r}"
            ) from exc
        if epoch < 0 or not 0 <= position <= self.shard_size:
            raise ValueError(
                f"BatchStream state {state!r} is out of range for a shard of "
                f"{self.shard_size} images"
            )
        self._epoch = epoch
        self._position = position


def _copy_to_device(dataset, device, chunk=4096):
    """The data set as uint8 NCHW (and int64 labels) on `device`, copied in chunks."""
    n, h, w, c = dataset.images.shape
    try:
        images = torch.empty((n, c, h, w), dtype=torch.uint8, device=device)
        for start in range(0, n, chunk):
            part = torch.from_numpy(np.ascontiguousarray(dataset.images[start : start + chunk]))
            images[start : start + len(part)] = part.to(device).permute(0, 3, 1, 2)
    except torch.cuda.OutOfMemoryError:
        raise MemoryError(
            f"--data_on_device: the {n} images ({n * h * w * c / 2**30:.1f} GiB as uint8) do not "
            f"fit on {device}; leave --data_on_device off to keep them in host memory"
        ) from None
    labels = None if dataset.labels is None else torch.from_numpy(dataset.labels).to(device)
    return images, labels


# ---------------------------------------------------------------------------------------
# Device transfer and the original generator API
# ---------------------------------------------------------------------------------------


def to_model_input(uint8_batch, device, dtype=torch.float32, *, memory_format=None):
    """
    Move a uint8 NCHW batch to ``device`` and scale it to [-1, 1] there (x / 127.5 - 1).

    The conversion to floating point happens on the device, so only uint8 bytes cross the
    bus. The arithmetic is done in float32 and the result cast to ``dtype``.

    A floating-point batch is taken to be in [-1, 1] already (what :func:`load_data` and
    the original loaders yield) and is only moved and cast.

    :param uint8_batch: uint8 tensor (or numpy array) of shape (N, C, H, W).
    :param device: target device.
    :param dtype: floating dtype of the result.
    :param memory_format: optional ``torch.memory_format`` (e.g. ``torch.channels_last``).
    """
    if isinstance(uint8_batch, np.ndarray):
        uint8_batch = torch.from_numpy(uint8_batch)
    if uint8_batch.dtype == torch.uint8:
        x = uint8_batch.to(device, non_blocking=True)
        x = x.to(torch.float32).div_(127.5).sub_(1.0)
    elif uint8_batch.is_floating_point():
        x = uint8_batch.to(device, torch.float32, non_blocking=True)
    else:
        raise TypeError(f"expected a uint8 batch (or floats in [-1, 1]), got {uint8_batch.dtype}")
    if dtype != torch.float32:
        x = x.to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x


def _dist_rank_and_size():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
    seed=0,
    image_channels=3,
):
    """
    For a dataset, create a generator over (images, kwargs) pairs, forever.

    Each ``images`` is a float32 NCHW tensor in [-1, 1] on the CPU, and ``kwargs`` holds
    ``"y"``, an int64 tensor of class labels, when ``class_cond``. When
    ``torch.distributed`` is initialised, every rank gets its own disjoint share of each
    epoch. (Kept for compatibility; training uses :class:`BatchStream` and
    :func:`to_model_input` to keep batches uint8 until they reach the device.)

    :param data_dir: a folder of images or an ``.npz`` file (see :func:`load_image_dataset`).
    :param batch_size: the batch size of each returned pair.
    :param image_size: the size to which images are resized.
    :param class_cond: if True, include a "y" key in returned dicts for class labels; if
                       classes are not available an exception is raised.
    :param deterministic: if True, yield results in index order (no shuffling).
    :param random_crop: not supported (images are decoded once, center-cropped); must be
                        False.
    :param random_flip: if True, randomly flip the images for augmentation.
    :param seed: seed of the shuffling and flipping (the same on every rank).
    :param image_channels: 1 (grey), 3 (RGB) or 4 (RGBA).
    """
    if random_crop:
        raise ValueError(
            "random_crop=True is not supported: images are decoded once and center-cropped"
        )
    rank, world_size = _dist_rank_and_size()
    dataset = load_image_dataset(
        data_dir, image_size, class_cond=class_cond, image_channels=image_channels,
        progress=None if rank == 0 else False,
    )
    stream = BatchStream(
        dataset,
        batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=not deterministic,
        random_flip=random_flip,
    )
    for images, cond in stream:
        yield to_model_input(images, "cpu"), cond


# ---------------------------------------------------------------------------------------
# Super-resolution: the low-resolution condition
# ---------------------------------------------------------------------------------------


def low_res_of(images, small_size):
    """
    The condition of a super-resolution model: a batch area-downsampled to `small_size`,
    as guided-diffusion's super_res_train.py makes it (`F.interpolate(mode="area")` of
    the batch in [-1, 1]).

    :param images: uint8 NCHW (scaled as :func:`to_model_input` does), or floats in [-1, 1].
    :param small_size: side of the low-resolution images.
    :return: a float32 [N x C x small_size x small_size] tensor in [-1, 1], on the
             images' device.
    """
    if images.dtype == torch.uint8:
        x = images.to(torch.float32).div(127.5).sub(1.0)
    elif images.is_floating_point():
        x = images.to(torch.float32)
    else:
        raise TypeError(f"expected a uint8 batch (or floats in [-1, 1]), got {images.dtype}")
    return torch.nn.functional.interpolate(x, size=(small_size, small_size), mode="area")


class LowResStream:
    """
    A batch stream for super-resolution training: the batches of `stream` (e.g. a
    :class:`BatchStream` at the large size), each condition dict also holding
    ``"low_res"``, the same (already mirrored) images through :func:`low_res_of`.
    ``state_dict`` / ``load_state_dict`` are the wrapped stream's, so resuming is exact.

    :param stream: an iterator of (uint8 NCHW images, condition dict).
    :param small_size: side of the low-resolution images.
    """

    def __init__(self, stream, small_size):
        if not _is_int(small_size) or small_size < 1:
            raise ValueError(f"small_size must be a positive integer, got {small_size!r}")
        self.stream = stream
        self.small_size = int(small_size)

    def __iter__(self):
        return self

    def __next__(self):
        images, cond = next(self.stream)
        return images, {**cond, "low_res": low_res_of(images, self.small_size)}

    next = __next__

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)
