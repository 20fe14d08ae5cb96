"""
Seeded sampling: per-row generators, images independent of batch size and of the number of
ranks (the real `scripts/image_sample.py` under `mpiexec -n 2`), checkpoint errors, the NLL
script and the curve plots.
"""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion.evaluation import sampling
from improved_diffusion.evaluation.sampling import StackedRandomGenerator, sample_images, sample_seed
from improved_diffusion.script_util import create_model_and_diffusion
from tiny import flags, mpiexec, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model that samples in a fraction of a second (image_size 8, two levels).
MODEL = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_heads=2,
    diffusion_steps=40,
    noise_schedule="cosine",
    learn_sigma=True,
    dropout=0.1,
    class_cond=True,
)


def load_script(name):
    """Import scripts/<name> as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(
        "script_" + name[:-3], os.path.join(ROOT, "scripts", name)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(seed=0, **overrides):
    """Tiny model with every weight perturbed (the output layer starts at zero)."""
    torch.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**{**MODEL, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, diffusion


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not stall on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ema_0.9999_000010.pt"
    model, _ = make_model()
    torch.save(model.state_dict(), path)
    return str(path)


# ----------------------------------------------------------------------------------------
# Random generators


def test_stacked_generator_rows_depend_only_on_their_seed():
    shape = (3, 2, 4, 4)
    a = StackedRandomGenerator([5, 6, 7], "cpu")
    b = StackedRandomGenerator([99, 6], "cpu")
    c = StackedRandomGenerator([6], "cpu")
    xa, xb, xc = a.randn(shape), b.randn((2,) + shape[1:]), c.randn((1,) + shape[1:])
    assert torch.equal(xa[1], xb[1]) and torch.equal(xa[1], xc[0])
    assert not torch.equal(xa[0], xa[1])
    # Later draws too, of another dtype, through randn_like.
    like = torch.empty(3, 5, dtype=torch.float64)
    ya, yc = a.randn_like(like), c.randn_like(like[:1])
    assert ya.dtype == torch.float64 and torch.equal(ya[1], yc[0])
    la, lc = a.randint(0, 1000, (3,)), c.randint(0, 1000, (1,))
    assert la[1] == lc[0]
    with pytest.raises(ValueError, match="3 seeds"):
        a.randn((4, 2))


def test_sample_seeds_are_distinct():
    seeds = {sample_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(seeds) == 3000


# ----------------------------------------------------------------------------------------
# sample_images in one process


def test_sample_images_independent_of_batch_size():
    model, diffusion = make_model(timestep_respacing="10")
    model.train()
    common = dict(num_samples=7, image_size=8, device="cpu", seed=3, class_cond=True,
                  num_classes=10, progress=False)
    a, la = sample_images(model, diffusion, batch_size=4, **common)
    b, lb = sample_images(model, diffusion, batch_size=16, **common)
    assert model.training  # mode restored
    assert a.shape == (7, 8, 8, 3) and a.dtype == np.uint8
    assert la.shape == (7,) and la.dtype == np.int64 and la.max() < 10
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.std() > 10  # real images, not a constant

    # A prefix of the run is the same images; another seed gives other images.
    c, lc = sample_images(model, diffusion, batch_size=2, **{**common, "num_samples": 3})
    np.testing.assert_array_equal(a[:3], c)
    d, _ = sample_images(model, diffusion, batch_size=4, **{**common, "seed": 4})
    assert not np.array_equal(a, d)


def test_ddim_sampling_independent_of_batch_size():
    model, diffusion = make_model(timestep_respacing="ddim5")
    common = dict(num_samples=5, image_size=8, device="cpu", seed=1, class_cond=True,
                  num_classes=10, progress=False, use_ddim=True, eta=0.5)
    a, _ = sample_images(model, diffusion, batch_size=2, **common)
    b, _ = sample_images(model, diffusion, batch_size=5, **common)
    np.testing.assert_array_equal(a, b)


def test_sample_images_needs_process_group_for_several_ranks():
    model, diffusion = make_model()
    with pytest.raises(RuntimeError, match="not initialised"):
        sample_images(model, diffusion, num_samples=4, batch_size=2, image_size=8,
                      device="cpu", class_cond=True, progress=False, rank=0, world_size=2)


def test_save_grid(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3)).astype(np.uint8)
    path = tmp_path / "sub" / "grid.png"
    sampling.save_grid(images, str(path), padding=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)  # 3 per row, 2 rows
    np.testing.assert_array_equal(grid[2:10, 12:20], images[1])


# ----------------------------------------------------------------------------------------
# scripts/image_sample.py


def test_image_sample_same_npz_for_batch_sizes_and_ranks(checkpoint, tmp_path):
    args = flags(MODEL) + ["--model_path", checkpoint, "--timestep_respacing", "10",
                           "--num_samples", "10", "--num_classes", "10", "--seed", "7"]
    one = tmp_path / "one.npz"
    two = tmp_path / "two.npz"
    run_script("image_sample.py", args + ["--batch_size", "4", "--out", one])
    run_script("image_sample.py", args + ["--batch_size", "16", "--out", two],
               launcher=mpiexec(2))
    a, b = np.load(one), np.load(two)
    assert a["arr_0"].shape == (10, 8, 8, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert Image.open(tmp_path / "two_grid.png").size == (4 * 10 + 2, 3 * 10 + 2)

    # The in-process run with the same settings agrees with the script.
    model, diffusion = make_model(timestep_respacing="10")
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    images, labels = sample_images(model, diffusion, num_samples=10, batch_size=10,
                                   image_size=8, device="cpu", seed=7, class_cond=True,
                                   num_classes=10, progress=False)
    np.testing.assert_array_equal(images, a["arr_0"])
    np.testing.assert_array_equal(labels, a["arr_1"])


def test_image_sample_default_output_in_log_dir(checkpoint, tmp_path, capsys):
    script = load_script("image_sample.py")
    script.main(flags(MODEL) + ["--model_path", checkpoint, "--timestep_respacing", "4",
                                "--num_samples", "3", "--batch_size", "3",
                                "--log_dir", str(tmp_path), "--grid", "none"])
    assert sorted(os.listdir(tmp_path)) == ["samples_3x8x8x3.npz"]


def run_sample_main(args, capsys):
    script = load_script("image_sample.py")
    with pytest.raises(SystemExit) as info:
        script.main(args)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_image_sample_missing_and_corrupt_checkpoint(tmp_path, capsys):
    base = flags(MODEL) + ["--num_samples", "2", "--out", str(tmp_path / "x.npz")]
    err = run_sample_main(base + ["--model_path", str(tmp_path / "nope.pt")], capsys)
    assert "not found" in err and "nope.pt" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint")
    err = run_sample_main(base + ["--model_path", str(corrupt)], capsys)
    assert "cannot be read" in err and "corrupt.pt" in err and "weights_only=False" not in err
    assert not (tmp_path / "x.npz").exists()


def test_image_sample_checkpoint_with_other_flags(checkpoint, tmp_path, capsys):
    base = ["--model_path", checkpoint, "--num_samples", "2", "--out", str(tmp_path / "x.npz")]
    err = run_sample_main(flags({**MODEL, "class_cond": False}) + base, capsys)
    assert "unexpected keys (1): label_emb.weight" in err
    assert "--class_cond" in err
    err = run_sample_main(flags({**MODEL, "num_channels": 64}) + base, capsys)
    assert "shape mismatches" in err and "checkpoint (32," in err
    err = run_sample_main(flags({**MODEL, "learn_sigma": False}) + base, capsys)
    assert "out.2.weight: checkpoint (6, 32, 3, 3) vs model (3, 32, 3, 3)" in err


def test_image_sample_missing_checkpoint_cli(tmp_path):
    proc = run_script(
        "image_sample.py", flags(MODEL) + ["--model_path", str(tmp_path / "gone.pt")], check=False
    )
    assert proc.returncode == 2
    assert "gone.pt" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------
# scripts/image_nll.py


def test_image_nll_gives_finite_bpd(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3)).astype(np.uint8)
    data = tmp_path / "data.npz"
    np.savez(data, arr_0=images, arr_1=rng.integers(0, 10, 5))
    out = tmp_path / "nll"
    script = load_script("image_nll.py")
    script.main(flags(MODEL) + ["--model_path", checkpoint, "--data_dir", str(data),
                                "--num_samples", "0", "--batch_size", "2",
                                "--out_dir", str(out)])
    result = json.loads((out / "nll.json").read_text())
    assert result["num_samples"] == 5
    assert np.isfinite(result["bpd"]) and result["bpd"] > 0
    assert result["prior_bpd"] >= 0 and result["vb_bpd"] > 0
    vb = np.load(out / "vb_terms.npz")["arr_0"]
    assert vb.shape == (40,) and np.isfinite(vb).all()
    assert "done 5 samples: bpd=" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# scripts/plot_curves.py


def write_progress(run_dir, loss_scale, fid_every):
    run_dir.mkdir()
    with open(run_dir / "progress.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr", "fid"])
        for step in range(0, 200, 10):
            fid = f"{300 * loss_scale / (1 + step / 50):.3f}" if step % fid_every == 0 else ""
            writer.writerow([step, loss_scale * np.exp(-step / 80) + 0.01, 1e-4, fid])


def test_plot_curves_writes_png(tmp_path, capsys):
    write_progress(tmp_path / "baseline", 1.0, 50)
    write_progress(tmp_path / "clts", 0.7, 40)
    out = tmp_path / "curves.png"
    script = load_script("plot_curves.py")
    runs = [str(tmp_path / "baseline"), str(tmp_path / "clts")]
    script.main(runs + ["--out", str(out), "--names", "base,ours"])
    image = Image.open(out)
    assert image.format == "PNG" and image.size[0] > 2 * image.size[1] > 400
    series = script.read_progress(runs[1])
    assert [s for s, _ in series["fid"]] == [0, 40, 80, 120, 160]
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "missing"), "--out", str(out)])
    assert "no progress.csv" in capsys.readouterr().err
    # Without --out the plot goes into the first run's folder, not the current one.
    script.main(runs)
    assert Image.open(tmp_path / "baseline" / "curves.png").format == "PNG"
    assert capsys.readouterr().out.strip() == str(tmp_path / "baseline" / "curves.png")
