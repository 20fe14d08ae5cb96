"""Loading images into uint8 memory, and the deterministic, resumable batch streams."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion.image_datasets import (
    BatchStream,
    ImageDataset,
    center_crop_arr,
    load_data,
    load_image_dataset,
    to_model_input,
)


def _noise(rng, h, w, c=3):
    shape = (h, w, c) if c > 1 else (h, w)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    """Mixed formats, modes and sizes, one nested; classes bird/cat/dog from the prefixes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_noise(rng, 40, 40)).save(root / "cat_000.png")
    Image.fromarray(_noise(rng, 100, 150)).save(root / "cat_002.png")  # wide, halved once
    Image.fromarray(_noise(rng, 32, 32, 1), mode="L").save(root / "dog_001.jpg")
    Image.fromarray(_noise(rng, 20, 20, 1), mode="L").convert("P").save(root / "dog_004.gif")
    Image.fromarray(_noise(rng, 48, 64, 4), mode="RGBA").save(root / "sub" / "bird_003.PNG")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden_005.png").write_bytes(b"AppleDouble junk")
    return root


def test_folder_loads_shapes_modes_and_labels(image_folder):
    ds = load_image_dataset(str(image_folder), 32, class_cond=True)
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (5, 32, 32, 3) and ds.images.dtype == np.uint8
    # Sorted walk: cat_000, cat_002, dog_001, dog_004, notes.txt (skipped), sub/bird_003.
    assert ds.class_names == ["bird", "cat", "dog"]
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [1, 1, 2, 2, 0]
    assert ds.num_classes == 3 and len(ds) == 5
    # Grayscale and palette images become RGB with equal channels.
    for i in (2, 3):
        assert np.array_equal(ds.images[i, ..., 0], ds.images[i, ..., 1])
        assert np.array_equal(ds.images[i, ..., 0], ds.images[i, ..., 2])

    unlabelled = load_image_dataset(image_folder, 32)
    assert unlabelled.labels is None and unlabelled.num_classes is None
    assert np.array_equal(unlabelled.images, ds.images)


def test_folder_pixels_match_independent_resize(image_folder):
    ds = load_image_dataset(str(image_folder), 32)
    # 40x40 -> no halving (40 < 64), BICUBIC to 32x32, nothing to crop.
    src = Image.open(image_folder / "cat_000.png").convert("RGB")
    assert np.array_equal(ds.images[0], np.asarray(src.resize((32, 32), Image.BICUBIC)))
    # 150x100 -> BOX halving to 75x50 -> BICUBIC to 48x32 -> columns 8..40.
    src = Image.open(image_folder / "cat_002.png").convert("RGB")
    half = src.resize((75, 50), Image.BOX)
    expected = np.asarray(half.resize((48, 32), Image.BICUBIC))[:, 8:40]
    assert np.array_equal(ds.images[1], expected)
    # 20x20 GIF is enlarged to 32x32.
    src = Image.open(image_folder / "dog_004.gif").convert("RGB")
    assert np.array_equal(ds.images[3], np.asarray(src.resize((32, 32), Image.BICUBIC)))
    # RGBA: alpha is dropped. 64x48 -> BICUBIC to 43x32 -> columns 5..37.
    src = Image.open(image_folder / "sub" / "bird_003.PNG").convert("RGB")
    expected = np.asarray(src.resize((43, 32), Image.BICUBIC))[:, 5:37]
    assert np.array_equal(ds.images[4], expected)


def test_center_crop_of_stripes_is_the_middle_stripe():
    # Three 64-wide stripes, 64 high. At 32 the image is BOX-halved once to 96x32 and the
    # centre 32 columns are exactly the green stripe.
    arr = np.zeros((64, 192, 3), dtype=np.uint8)
    arr[:, :64, 0] = 255
    arr[:, 64:128, 1] = 200
    arr[:, 128:, 2] = 255
    out = center_crop_arr(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3)
    assert (out[..., 1] == 200).all() and (out[..., 0] == 0).all() and (out[..., 2] == 0).all()


def test_parallel_decoding_matches_serial(image_folder):
    serial = load_image_dataset(image_folder, 16)
    parallel = load_image_dataset(image_folder, 16, num_workers=2)
    assert np.array_equal(serial.images, parallel.images)


def test_npz_loading_memmap_compressed_keys_and_resize(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    labels = np.array([3, 1, 0, 2, 1, 3])

    plain = tmp_path / "plain.npz"
    np.savez(plain, arr_0=images, arr_1=labels)
    ds = load_image_dataset(str(plain), 16, class_cond=True)
    assert isinstance(ds.images, np.memmap)  # uncompressed: memory-mapped
    assert np.array_equal(ds.images, images)
    assert ds.labels.tolist() == labels.tolist() and ds.num_classes == 4
    assert load_image_dataset(plain, 16).labels is None

    named = tmp_path / "named.npz"
    np.savez_compressed(named, images=images, labels=labels)
    ds = load_image_dataset(named, 16, class_cond=True)
    assert np.array_equal(ds.images, images) and ds.labels.tolist() == labels.tolist()

    gray = tmp_path / "gray.npz"  # grey as (N, H, W): read as (N, H, W, 1) with image_channels=1
    np.savez(gray, arr_0=images[..., 0])
    ds = load_image_dataset(gray, 16, image_channels=1)
    assert ds.channels == 1 and np.array_equal(ds.images, images[..., :1])
    with pytest.raises(ValueError, match=r"1 channel\(s\) but --image_channels is 3"):
        load_image_dataset(gray, 16)
    resized = load_image_dataset(gray, 8, image_channels=1).images
    assert resized.shape == (6, 8, 8, 1)
    assert np.array_equal(resized[2, ..., 0], center_crop_arr(Image.fromarray(images[2, ..., 0]), 8))

    ds = load_image_dataset(plain, 8)
    expected = center_crop_arr(Image.fromarray(images[2]), 8)
    assert ds.images.shape == (6, 8, 8, 3) and np.array_equal(ds.images[2], expected)


def test_missing_and_empty_data_dir(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_image_dataset(str(missing), 32)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty_dir") as info:
        load_image_dataset(str(empty), 32)
    assert "no images found" in str(info.value) and ".png" in str(info.value)
    with pytest.raises(ValueError, match="unspecified"):
        load_image_dataset("", 32)


def test_truncated_and_garbage_files_are_named(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a_good.png")
    rng = np.random.default_rng(2)
    Image.fromarray(_noise(rng, 64, 64)).save(folder / "b_cut.png")
    data = (folder / "b_cut.png").read_bytes()
    (folder / "b_cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="b_cut.png"):
        load_image_dataset(folder, 8)
    (folder / "b_cut.png").unlink()
    (folder / "c_text.jpg").write_text("this is not a JPEG")
    with pytest.raises(ValueError, match="c_text.jpg"):
        load_image_dataset(folder, 8)


def test_class_cond_without_labels(tmp_path):
    folder = tmp_path / "nolabels"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "digit.png")
    with pytest.raises(ValueError, match="digit.png"):
        load_image_dataset(folder, 8, class_cond=True)
    npz = tmp_path / "unlabelled.npz"
    np.savez(npz, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="unlabelled.npz") as info:
        load_image_dataset(npz, 8, class_cond=True)
    assert "class_cond" in str(info.value) and "arr_1" in str(info.value)


def test_bad_npz_contents(tmp_path):
    floats = tmp_path / "floats.npz"
    np.savez(floats, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="floats.npz.*uint8"):
        load_image_dataset(floats, 8)
    four = tmp_path / "four_channels.npz"
    np.savez(four, arr_0=np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"four_channels.npz.*4 channel\(s\) but --image_channels is 3"):
        load_image_dataset(four, 8)
    two = tmp_path / "two_channels.npz"
    np.savez(two, arr_0=np.zeros((2, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match=r"two_channels.npz.*\(N, H, W, C\)"):
        load_image_dataset(two, 8, image_channels=None)
    with pytest.raises(ValueError, match="image_channels must be 1 .* got 2"):
        load_image_dataset(four, 8, image_channels=2)
    other = tmp_path / "other_key.npz"
    np.savez(other, pixels=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="other_key.npz.*arr_0"):
        load_image_dataset(other, 8)
    short = tmp_path / "short_labels.npz"
    np.savez(short, arr_0=np.zeros((3, 8, 8, 3), np.uint8), arr_1=np.array([0, 1]))
    with pytest.raises(ValueError, match="short_labels.npz"):
        load_image_dataset(short, 8, class_cond=True)


# --------------------------------------------------------------------------------------
# BatchStream
# --------------------------------------------------------------------------------------


def _indexed_dataset(n, size=4, labels=True):
    """Image i has red == i everywhere and green == column index, so flips are visible."""
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    images[..., 0] = np.arange(n, dtype=np.uint8)[:, None, None]
    images[..., 1] = np.arange(size, dtype=np.uint8)[None, None, :]
    return ImageDataset(images, np.arange(n) % 7 if labels else None)


def _decode(batch):
    """(indices, flipped) of a uint8 NCHW batch built from _indexed_dataset."""
    idx = batch[:, 0, 0, 0].tolist()
    flipped = (batch[:, 1, 0, 0] != 0).tolist()
    return idx, flipped


def _take(stream, k):
    return [next(stream) for _ in range(k)]


def test_batches_are_uint8_nchw_with_labels():
    ds = _indexed_dataset(10, size=6)
    images, cond = next(BatchStream(ds, 4, seed=3))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 6, 6)
    assert images.is_contiguous()
    idx, flipped = _decode(images)
    assert cond["y"].dtype == torch.int64
    assert cond["y"].tolist() == [i % 7 for i in idx]
    for row, was_flipped in zip(images, flipped):
        expected = torch.arange(6, dtype=torch.uint8)
        assert torch.equal(row[1, 0], expected.flip(0) if was_flipped else expected)
    _, cond = next(BatchStream(_indexed_dataset(10, labels=False), 4))
    assert cond == {}


def test_same_seed_same_batches_and_epochs_are_permutations():
    ds = _indexed_dataset(12)
    a = BatchStream(ds, 4, seed=5)
    b = BatchStream(ds, 4, seed=5)
    c = BatchStream(ds, 4, seed=6)
    batches_a, batches_b, batches_c = _take(a, 9), _take(b, 9), _take(c, 9)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya["y"], yb["y"])
    assert any(not torch.equal(xa, xc) for (xa, _), (xc, _) in zip(batches_a, batches_c))
    orders = []
    for epoch in range(3):
        idx = sum((_decode(x)[0] for x, _ in batches_a[3 * epoch : 3 * epoch + 3]), [])
        assert sorted(idx) == list(range(12))
        orders.append(idx)
    assert orders[0] != orders[1]  # a new permutation every epoch
    assert a.state_dict() == {"epoch": 2, "position": 12}


def test_no_shuffle_is_index_order():
    stream = BatchStream(_indexed_dataset(10), 3, shuffle=False, random_flip=False)
    seen = [_decode(next(stream)[0]) for _ in range(4)]
    assert [s[0] for s in seen] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]
    assert not any(any(s[1]) for s in seen)


def test_two_ranks_are_disjoint_and_cover_each_epoch():
    ds = _indexed_dataset(20)
    ranks = [
        BatchStream(ds, 3, rank=r, world_size=2, seed=11, drop_last=False) for r in range(2)
    ]
    assert ranks[0].batches_per_epoch == 4  # 10 images per rank: 3 + 3 + 3 + 1
    for epoch in range(2):
        shards = [sum((_decode(x)[0] for x, _ in _take(s, 4)), []) for s in ranks]
        assert len(shards[0]) == len(shards[1]) == 10
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(20))
        assert ranks[0].state_dict() == ranks[1].state_dict() == {"epoch": epoch, "position": 10}

    # 21 images on 2 ranks: equal shards of 10, one image left out per epoch.
    ds = _indexed_dataset(21)
    ranks = [BatchStream(ds, 5, rank=r, world_size=2, seed=0) for r in range(2)]
    shards = [sum((_decode(x)[0] for x, _ in _take(s, 2)), []) for s in ranks]
    assert not set(shards[0]) & set(shards[1]) and len(set(shards[0] + shards[1])) == 20


def test_flips_are_reproducible_and_roughly_half():
    ds = _indexed_dataset(200)
    first = [_decode(x) for x, _ in _take(BatchStream(ds, 50, seed=2), 8)]
    again = [_decode(x) for x, _ in _take(BatchStream(ds, 50, seed=2), 8)]
    assert first == again
    flips = sum((f for _, f in first), [])
    assert 0.4 < np.mean(flips) < 0.6
    never = [_decode(x)[1] for x, _ in _take(BatchStream(ds, 50, random_flip=False), 4)]
    assert not any(sum(never, []))
    # Flipping copies: the data set itself is unchanged.
    assert (ds.images[:, :, 0, 1] == 0).all()


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 4, 7])
def test_resume_from_state_dict_gives_the_same_batches(consumed):
    ds = _indexed_dataset(14)  # 2 ranks x 7 images, batch 3: 2 batches per epoch
    kwargs = dict(rank=1, world_size=2, seed=9)
    original = BatchStream(ds, 3, **kwargs)
    _take(original, consumed)
    state = json.loads(json.dumps(original.state_dict()))  # plain ints survive JSON
    assert set(state) == {"epoch", "position"}
    assert all(type(v) is int for v in state.values())
    resumed = BatchStream(ds, 3, **kwargs)
    resumed.load_state_dict(state)
    for (xa, ca), (xb, cb) in zip(_take(original, 5), _take(resumed, 5)):
        assert torch.equal(xa, xb) and torch.equal(ca["y"], cb["y"])
    assert original.state_dict() == resumed.state_dict()


def test_state_survives_torch_save_weights_only(tmp_path):
    stream = BatchStream(_indexed_dataset(10), 4)
    _take(stream, 3)
    torch.save({"data": stream.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["data"]
    fresh = BatchStream(_indexed_dataset(10), 4)
    fresh.load_state_dict(state)
    assert torch.equal(next(fresh)[0], next(stream)[0])


def test_stream_argument_errors():
    ds = _indexed_dataset(10)
    with pytest.raises(ValueError) as info:
        BatchStream(ds, 6, rank=0, world_size=2)
    message = str(info.value)
    assert "batch_size 6" in message and "10 images" in message and "world size 2" in message
    with pytest.raises(ValueError, match="rank"):
        BatchStream(ds, 2, rank=2, world_size=2)
    stream = BatchStream(ds, 2)
    with pytest.raises(ValueError, match="epoch"):
        stream.load_state_dict({"position": 3})
    with pytest.raises(ValueError, match="out of range"):
        stream.load_state_dict({"epoch": 0, "position": 11})


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("labels", [True, False])
def test_device_resident_stream_gives_the_host_streams_batches(device, labels):
    """The device copy gathers and mirrors with torch ops; the host path with numpy. Random
    pixels (so a wrong flip axis or channel order shows), 2 ranks, short last batches,
    several epochs, and a resume mid-epoch."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(23, 5, 7, 3), dtype=np.uint8)  # H != W on purpose
    ds = ImageDataset(images, rng.integers(0, 10, size=23) if labels else None)
    for rank in range(2):
        kwargs = dict(rank=rank, world_size=2, seed=8, drop_last=False)
        host, dev = BatchStream(ds, 4, **kwargs), BatchStream(ds, 4, device=device, **kwargs)
        for (xh, ch), (xd, cd) in zip(_take(host, 10), _take(dev, 10)):
            assert xd.device.type == device and xd.dtype == torch.uint8 and xd.is_contiguous()
            assert torch.equal(xd.cpu(), xh)
            assert set(cd) == set(ch) and all(torch.equal(cd[k].cpu(), ch[k]) for k in ch)
        resumed = BatchStream(ds, 4, device=device, **kwargs)
        resumed.load_state_dict(host.state_dict())
        assert torch.equal(next(resumed)[0].cpu(), next(host)[0])


# --------------------------------------------------------------------------------------
# Device transfer and load_data
# --------------------------------------------------------------------------------------


def test_to_model_input_scales_to_minus_one_one():
    batch = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8).view(1, 1, 2, 3)
    x = to_model_input(batch, "cpu")
    assert x.dtype == torch.float32 and x.shape == batch.shape
    assert torch.equal(x, batch.float() / 127.5 - 1)
    assert x.min() == -1 and x.max() == 1
    y = to_model_input(batch, torch.device("cpu"), torch.bfloat16)
    assert y.dtype == torch.bfloat16
    z = to_model_input(batch.expand(2, 3, 2, 3), "cpu", memory_format=torch.channels_last)
    assert z.is_contiguous(memory_format=torch.channels_last)
    # Floats are taken as already in [-1, 1] (load_data's batches): moved, not rescaled.
    assert torch.equal(to_model_input(x.double(), "cpu"), x)
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(batch.long(), "cpu")


def test_load_data_yields_scaled_floats_forever(tmp_path):
    images = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    images[:, :, :4] = 255
    images[:, 0, 0, 0] = np.arange(5) * 10
    npz = tmp_path / "tiny.npz"
    np.savez(npz, arr_0=images, arr_1=np.array([0, 1, 0, 1, 2]))
    gen = load_data(data_dir=str(npz), batch_size=2, image_size=8, class_cond=True,
                    deterministic=True, random_flip=False)
    seen = [next(gen) for _ in range(5)]  # 2 batches per epoch, several epochs
    for x, cond in seen:
        assert x.dtype == torch.float32 and x.shape == (2, 3, 8, 8)
        assert x.min() == -1 and x.max() == 1
        assert cond["y"].dtype == torch.int64
    assert torch.equal(seen[0][0], torch.from_numpy(images[:2]).permute(0, 3, 1, 2) / 127.5 - 1)
    assert [c["y"].tolist() for _, c in seen] == [[0, 1], [0, 1]] * 2 + [[0, 1]]
    x, cond = next(load_data(data_dir=npz, batch_size=3, image_size=8))
    assert cond == {} and x.shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="random_crop"):
        next(load_data(data_dir=npz, batch_size=3, image_size=8, random_crop=True))
    assert os.path.exists(npz)
