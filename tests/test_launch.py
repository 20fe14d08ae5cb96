"""
The launch scripts (scripts/launch/): train.sh end to end at tiny scale, the ablation runner,
config_flags.py, summarize.py, and the errors users hit first.
"""

import csv
import glob
import importlib.util
import json
import os
import shlex
import subprocess

import numpy as np
import pytest
import torch
import torch.nn as nn

from tiny import PYTHON, ROOT, TINY_MODEL, env, make_npz

LAUNCH = os.path.join(ROOT, "scripts", "launch")
SHELL_SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(ROOT, "scripts", "*.sh")))


def load_module(name):
    spec = importlib.util.spec_from_file_location("launch_" + name[:-3], os.path.join(LAUNCH, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config_flags = load_module("config_flags.py")
summarize = load_module("summarize.py")
train_flags = load_module("train_flags.py")
train_help = load_module("train_help.py")
variants = load_module("variants.py")


def bash(script, args, extra_env=None, cwd=None, timeout=300):
    e = env()
    for key in ("NGPUS", "LAUNCHER", "GLOBAL_BATCH", "REF_STATS", "DATA_DIR", "LOG_DIR", "EVAL_INTERVAL",
                "EVAL_SAMPLES", "NUM_SAMPLES", "INCEPTION", "SEED", "KEEP_GOING"):
        e.pop(key, None)
    e["PYTHON"] = PYTHON
    e.update(extra_env or {})
    return subprocess.run(["bash", os.path.join(LAUNCH, script)] + [str(a) for a in args], env=e,
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def tiny_config(path, **overrides):
    cfg = dict(TINY_MODEL, batch_size=4, log_interval=1, save_interval=1000, total_steps=3,
               schedule_sampler="clts", clts_target_steps=4, momentum_decay=True, lr_compensation=True)
    cfg.update(overrides)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(path)


class StandInFeatures(nn.Module):
    """TorchScript stand-in for the Inception file: [N, 3, 299, 299] -> [N, 8] (fast on a CPU)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture
def fid_stand_in(tmp_path):
    """(inception path, reference statistics path) made with the stand-in network."""
    from improved_diffusion.evaluation import fid

    torch.manual_seed(0)
    net = str(tmp_path / "standin.pt")
    torch.jit.script(StandInFeatures().eval()).save(net)
    images = np.load(make_npz(tmp_path / "ref_images.npz", n=20, seed=5))["arr_0"]
    features = fid.compute_features(images, fid.load_inception(net, "cpu"), batch_size=10)
    mu, sigma = fid.compute_statistics(features)
    ref = str(tmp_path / "ref_stats.npz")
    fid.save_statistics(ref, mu, sigma, len(images))
    return net, ref


# ---------------------------------------------------------------------------- shell basics


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script,missing", [
    ("train.sh", "VARIANT_CONFIG DATA_DIR LOG_DIR"),
    ("cifar10.sh", "VARIANT"),
    ("imagenet128.sh", "VARIANT"),
    ("ablation.sh", "EXPERIMENT OUT_DIR"),
])
def test_usage_when_arguments_are_missing(script, missing):
    proc = bash(script, [])
    assert proc.returncode == 2
    assert "missing" in proc.stderr and missing in proc.stderr
    assert f"scripts/launch/{script}" in proc.stderr  # the usage text


VARIANTS = ("baseline", "md", "md_lrc", "clts", "all")
# What each paper variant adds to its experiment's baseline config (the full files before they
# became overlays held exactly this): the overlays must resolve to it, key for key.
CLTS = {"schedule_sampler": "clts", "clts_mu": 0.3, "clts_sigma": 1.0, "clts_target_steps": 100000}
MD = {"momentum_decay": True, "md_beta_init": 0.9, "md_beta_min": 0.5}
LRC = {"lr_compensation": True}
PAPER_OVERLAYS = {"baseline": {}, "md": MD, "md_lrc": {**MD, **LRC}, "clts": CLTS, "all": {**CLTS, **MD, **LRC}}
# The demo's variants set every method switch (demo.json has all three on).
SWITCHES = {"baseline": ("uniform", False, False), "md": ("uniform", True, False), "md_lrc": ("uniform", True, True),
            "clts": ("clts", False, False), "all": ("clts", True, True)}


def config_file(name):
    return os.path.join(ROOT, "configs", name)


def test_paper_configs_match_global_batch():
    """configs/*: per-rank batch_size x 8 GPUs is the paper's global batch (SPEC section 3)."""
    from improved_diffusion.options import config

    for exp, global_batch in (("cifar10", 128), ("imagenet128", 256)):
        for variant in VARIANTS:
            cfg = config.read_options_file(config_file(f"{exp}_{variant}.json"))
            assert cfg["batch_size"] * 8 == global_batch, (exp, variant)
            assert cfg.get("momentum_decay", False) == (variant in ("md", "md_lrc", "all"))
            assert cfg.get("lr_compensation", False) == (variant in ("md_lrc", "all"))
            assert (cfg.get("schedule_sampler", "uniform") == "clts") == (variant in ("clts", "all"))


@pytest.mark.parametrize("exp", ["cifar10", "imagenet128"])
def test_paper_variants_are_overlays_of_the_baseline(exp):
    """Each variant file is the baseline plus its methods' keys, and nothing else."""
    from improved_diffusion.options import config

    base = config.read_options_file(config_file(f"{exp}_baseline.json"))
    assert "base" not in base and not set(base) & set({**CLTS, **MD, **LRC})
    for variant, overlay in PAPER_OVERLAYS.items():
        path = config_file(f"{exp}_{variant}.json")
        assert config.read_options_file(path) == {**base, **overlay}, variant
        if variant != "baseline":
            with open(path) as f:
                own = json.load(f)
            assert own == {"base": f"{exp}_baseline.json", **overlay}, variant  # only what differs


def test_demo_variants_set_every_switch():
    from improved_diffusion.options import config

    demo = config.read_options_file(config_file("demo.json"))
    for variant, (sampler, md, lrc) in SWITCHES.items():
        cfg = config.read_options_file(config_file(f"demo_{variant}.json"))
        switches = {"schedule_sampler": sampler, "momentum_decay": md, "lr_compensation": lrc}
        assert cfg == {**demo, **switches}, variant


def test_every_config_is_valid():
    """Every file in configs/ reads as --config does: known options, right types and ranges."""
    from improved_diffusion.options import config

    for path in sorted(glob.glob(config_file("*.json"))):
        values = config.load_config(path, config.names())
        config.validate(values)


def test_variants_come_from_the_config_files(tmp_path):
    assert [v for v, _, _ in variants.select("cifar10")] == list(VARIANTS)  # the paper's order
    (name, path, flags), = variants.select("imagenet128", "md_lrc")
    assert path == config_file("imagenet128_md_lrc.json") and flags == []
    assert [(v, os.path.basename(p)) for v, p, _ in variants.select("demo", "all,md")] == \
        [("all", "demo_all.json"), ("md", "demo_md.json")]
    # a config file of one's own: the demo's switches as flags on top of it
    own = tiny_config(tmp_path / "mine.json")
    for variant, path, flags in variants.select(own):
        sampler, md, lrc = SWITCHES[variant]
        assert path == own and flags == ["--schedule_sampler", sampler, "--momentum_decay", str(md),
                                         "--lr_compensation", str(lrc)]
    with pytest.raises(variants.VariantError, match=r"unknown variant 'foo' \(choose from: baseline, md, md_lrc"):
        variants.select("cifar10", "md,foo")
    with pytest.raises(variants.VariantError, match=r"unknown experiment 'nope'.*known: cifar10, demo, imagenet128"):
        variants.select("nope")
    with pytest.raises(variants.VariantError, match="base config not found"):
        variants.select(str(tmp_path / "missing.json"))


def test_train_help_is_up_to_date():
    """docs/train-help.txt is the option table's help; `scripts/launch/train_help.py --write` renews it."""
    from improved_diffusion.options import config

    with open(train_help.PATH) as f:
        text = f.read()
    assert text == train_help.text(), "docs/train-help.txt is out of date: python scripts/launch/train_help.py --write"
    for name in config.names():
        assert f"  --{name} (" in text


# ---------------------------------------------------------------------------- config_flags.py


def test_config_flags_prints_model_flags(tmp_path):
    from improved_diffusion.script_util import model_and_diffusion_defaults

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "image_size": 32, "num_channels": 64, "learn_sigma": True, "class_cond": False,
        "attention_resolutions": "", "channel_mult": "1,2,2", "noise_schedule": "cosine",
        "dropout": 0.3, "lr": 1e-4, "batch_size": 16, "schedule_sampler": "clts",
    }))
    proc = subprocess.run([PYTHON, os.path.join(LAUNCH, "config_flags.py"), str(run)],
                          env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    flags = dict(zip(words[::2], words[1::2]))
    assert all(w.startswith("--") for w in words[::2])
    assert flags["--image_size"] == "32" and flags["--num_channels"] == "64"
    assert flags["--learn_sigma"] == "True" and flags["--class_cond"] == "False"
    assert flags["--channel_mult"] == "1,2,2" and flags["--dropout"] == "0.3"
    assert flags["--attention_resolutions"] == ""  # empty on purpose: kept, quoted
    assert "''" in proc.stdout
    assert flags["--diffusion_steps"] == str(model_and_diffusion_defaults()["diffusion_steps"])
    assert "--lr" not in flags and "--batch_size" not in flags and "--schedule_sampler" not in flags
    assert "--timestep_respacing" not in flags  # empty by default and here: left out
    assert set(flags) <= {f"--{k}" for k in model_and_diffusion_defaults()}

    # The flags build the same model as the config through image_sample.py's parser.
    sample = importlib.util.spec_from_file_location("sample_script", os.path.join(ROOT, "scripts", "image_sample.py"))
    module = importlib.util.module_from_spec(sample)
    sample.loader.exec_module(module)
    args = module.create_argparser().parse_args(words)
    assert args.image_size == 32 and args.learn_sigma is True and args.attention_resolutions == ""

    assert "--image_size" not in config_flags.model_flags({"image_size": 8}, exclude={"image_size"})
    (tmp_path / "c.json").write_text(json.dumps({"eval_num_samples": 200, "use_fp16": True}))
    assert config_flags.format_value(True) == "True"
    out = subprocess.run([PYTHON, os.path.join(LAUNCH, "config_flags.py"), str(tmp_path / "c.json"),
                          "--get", "eval_num_samples"], env=env(), capture_output=True, text=True)
    assert out.stdout.strip() == "200"
    missing = subprocess.run([PYTHON, os.path.join(LAUNCH, "config_flags.py"), str(tmp_path / "nope")],
                             env=env(), capture_output=True, text=True)
    assert missing.returncode != 0 and "no such file" in missing.stderr


def test_config_flags_finds_newest_intact_ema_checkpoint(tmp_path, capsys):
    from improved_diffusion.run import checkpoint as ckpt

    def write_checkpoint(step, intact=True):
        files = {}
        for name in (ckpt.model_name(step), ckpt.ema_name(0.9999, step), ckpt.ema_name(0.999, step)):
            torch.save({"w": torch.zeros(1)}, tmp_path / name)
            files[name] = os.path.getsize(tmp_path / name)
        if not intact:
            files[ckpt.ema_name(0.9999, step)] += 1  # a torn write: sizes disagree
        torch.save({"step": step, "files": files, "ema_rate": [0.9999, 0.999]}, tmp_path / ckpt.state_name(step))

    with pytest.raises(SystemExit, match="no intact checkpoint"):
        config_flags.ema_checkpoint(str(tmp_path))
    write_checkpoint(10)
    write_checkpoint(20, intact=False)
    assert config_flags.ema_checkpoint(str(tmp_path)) == str(tmp_path / "ema_0.9999_000010.pt")
    (tmp_path / "config.json").write_text(json.dumps({"image_size": 8}))
    config_flags.main([str(tmp_path), "--with_checkpoint", "--exclude", "timestep_respacing"])
    words = shlex.split(capsys.readouterr().out)
    assert words[:4] == ["--model_path", str(tmp_path / "ema_0.9999_000010.pt"), "--attention_resolutions", "16,8"]
    assert words[words.index("--image_size") + 1] == "8"


# ---------------------------------------------------------------------------- summarize.py


def write_progress(run_dir, rows):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "progress.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr", "fid"])
        for row in rows:
            w.writerow(row)


def fid_rows(fids, loss0=1.0):
    """Rows logged every 50 steps; FID every 100 (empty cells elsewhere)."""
    rows = []
    for step in range(50, 450, 50):
        fid = fids.get(step, "")
        rows.append([step, loss0 / step * 50, 1e-4, fid])
    return rows


def test_summarize_best_fid_and_steps_to_baseline(tmp_path):
    out = tmp_path / "abl"
    write_progress(out / "baseline", fid_rows({100: 50.0, 200: 40.0, 300: 30.0, 400: 25.0}))
    # reaches the baseline's final FID (25) between steps 100 (45) and 200 (24): at
    # 100 + 20/21 x 100 (stats.steps_to_target); best 18 at step 400
    write_progress(out / "all", fid_rows({100: 45.0, 200: 24.0, 300: 20.0, 400: 18.0}))
    # never reaches it
    write_progress(out / "md", fid_rows({100: 60.0, 200: 55.0, 300: 40.0, 400: 30.0}))
    # resumed: step 400 logged twice, the second row wins; exactly the target counts
    rows = fid_rows({100: 48.0, 200: 35.0, 300: 25.0, 400: 99.0}) + [[400, 0.5, 1e-4, 22.0]]
    write_progress(out / "clts", rows)
    os.makedirs(out / "all" / "samples")
    (out / "all" / "samples" / "ema_0.9999_000400_n50000_250_seed0_fid.json").write_text('{"fid": 3.5}')
    (out / "runs.tsv").write_text("# name\tflags\nbaseline\tconfigs/x.json --a 1\nmd\tx\nclts\ty\nall\tz\n")

    runs, text = summarize.summarize(str(out))
    by = {r["run"]: r for r in runs}
    assert [r["run"] for r in runs] == ["baseline", "md", "clts", "all"]  # runs.tsv order
    assert by["all"]["best_fid"] == 18.0 and by["all"]["best_fid_step"] == 400
    assert by["all"]["final_fid"] == 18.0 and by["all"]["steps"] == 400
    assert by["all"]["steps_to_baseline_fid"] == pytest.approx(100 + 20 / 21 * 100)
    assert by["all"]["speedup"] == pytest.approx(400 / (100 + 20 / 21 * 100))
    assert by["all"]["sample_fid"] == 3.5
    assert by["baseline"]["steps_to_baseline_fid"] == 400 and by["baseline"]["speedup"] == 1.0
    assert by["md"]["steps_to_baseline_fid"] is None and by["md"]["speedup"] is None
    assert by["clts"]["steps_to_baseline_fid"] == 300 and by["clts"]["final_fid"] == 22.0
    assert by["clts"]["final_loss"] == 0.5
    assert by["baseline"]["final_loss"] == pytest.approx(1.0 / 400 * 50)

    with open(out / "summary.csv") as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert float(table["all"]["speedup"]) == pytest.approx(2.04878) and table["md"]["steps_to_baseline_fid"] == ""
    assert table["baseline"]["fid@300"] == "30" and table["clts"]["fid@400"] == "22"
    md = (out / "summary.md").read_text()
    assert md == text and "| all | 400 |" in md and "2.05x" in md and "| 195 |" in md and "final FID 25.00" in md
    assert "`configs/x.json --a 1`" in md

    # No baseline run: no comparison, the rest still there.
    runs, text = summarize.summarize(str(out), baseline="nonexistent")
    assert all(r["speedup"] is None for r in runs) and "No baseline run" in text


def test_summarize_baseline_that_dipped_below_its_final_fid(tmp_path):
    write_progress(tmp_path / "baseline", fid_rows({100: 30.0, 200: 28.0, 300: 29.0, 400: 29.0}))
    write_progress(tmp_path / "clts", fid_rows({100: 40.0, 200: 29.5, 300: 29.0, 400: 27.0}))
    runs, _ = summarize.summarize(str(tmp_path))
    by = {r["run"]: r for r in runs}
    assert [r["run"] for r in runs] == ["baseline", "clts"]  # no runs.tsv: baseline first
    # 29 is reached between steps 100 (30) and 200 (28): at 150
    assert by["baseline"]["steps_to_baseline_fid"] == 150 and by["baseline"]["speedup"] == 1.0
    assert by["clts"]["steps_to_baseline_fid"] == 300
    assert by["clts"]["speedup"] == pytest.approx(150 / 300)
    assert by["baseline"]["best_fid"] == 28.0 and by["baseline"]["best_fid_step"] == 200


def test_summarize_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        summarize.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        summarize.main([str(tmp_path)])  # no runs
    assert "no runs" in capsys.readouterr().err


# ---------------------------------------------------------------------------- train.sh


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_train_sh_end_to_end(tmp_path, fid_stand_in):
    """Train 3 steps (FID of the EMA every 2), sample 4 images with 10 steps, FID; re-run resumes."""
    net, ref = fid_stand_in
    data = make_npz(tmp_path / "data.npz", n=16)
    config = tiny_config(tmp_path / "tiny.json")
    log_dir = tmp_path / "run"
    run_env = {"NGPUS": "1", "REF_STATS": ref, "INCEPTION": net, "EVAL_INTERVAL": "2",
               "EVAL_SAMPLES": "4", "EVAL_RESPACING": "ddim5", "NUM_SAMPLES": "4",
               "SAMPLE_RESPACING": "10", "SAMPLE_BATCH": "4", "GLOBAL_BATCH": "4"}
    out = ok(bash("train.sh", [config, data, log_dir], run_env))
    assert "== 1/3 train" in out and "== 2/3 sample" in out and "== 3/3 fid" in out
    assert "+ " + PYTHON in out and "image_train.py --config" in out  # commands are echoed
    assert "--timestep_respacing 10" in out and "--eval_ref_stats" in out

    with open(log_dir / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert float(rows[1]["fid"]) >= 0 and rows[0]["fid"] == ""
    cfg = json.loads((log_dir / "config.json").read_text())
    assert cfg["batch_size"] == 4 and cfg["eval_num_samples"] == 4 and cfg["eval_interval"] == 2
    samples = log_dir / "samples" / "ema_0.9999_000003_n4_10_seed0.npz"
    assert np.load(samples)["arr_0"].shape == (4, 8, 8, 3)
    result = json.loads((log_dir / "samples" / "ema_0.9999_000003_n4_10_seed0_fid.json").read_text())
    assert np.isfinite(result["fid"]) and result["num_samples"] == 4

    # The same command again: training resumes at its end, the samples and FID are reused.
    again = ok(bash("train.sh", [config, data, log_dir], run_env))
    assert "samples exist already" in again and "FID exists already" in again
    assert len(list((log_dir / "samples").glob("*.npz"))) == 1


def test_train_sh_global_batch_not_divisible(tmp_path):
    data = make_npz(tmp_path / "data.npz", n=4)
    proc = bash("train.sh", [tiny_config(tmp_path / "t.json"), data, tmp_path / "run"],
                {"NGPUS": "3", "GLOBAL_BATCH": "8"})
    assert proc.returncode == 2
    assert "GLOBAL_BATCH=8 is not divisible by NGPUS=3" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_train_sh_input_errors(tmp_path):
    data = make_npz(tmp_path / "data.npz", n=4)
    config = tiny_config(tmp_path / "t.json")
    proc = bash("train.sh", [tmp_path / "nope.json", data, tmp_path / "run"], {"NGPUS": "1"})
    assert proc.returncode == 2 and "config not found" in proc.stderr
    proc = bash("train.sh", [config, tmp_path / "nodata", tmp_path / "run"], {"NGPUS": "1"})
    assert proc.returncode == 2 and "data not found" in proc.stderr
    proc = bash("train.sh", [config, data, tmp_path / "run"], {"NGPUS": "1", "REF_STATS": str(tmp_path / "x.npz")})
    assert proc.returncode == 2 and "REF_STATS not found" in proc.stderr
    proc = bash("train.sh", [config, data, tmp_path / "run"], {"NGPUS": "2", "LAUNCHER": "srun"})
    assert proc.returncode == 2 and "LAUNCHER must be mpiexec or torchrun" in proc.stderr


@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_launchers_split_the_global_batch(tmp_path, launcher):
    """NGPUS=2 GLOBAL_BATCH=8: two processes with --batch_size 4 (a dry run: nothing trains)."""
    data = make_npz(tmp_path / "data.npz", n=4)
    proc = bash("train.sh", [tiny_config(tmp_path / "t.json"), data, tmp_path / "run", "--dry_run", "True"],
                {"NGPUS": "2", "GLOBAL_BATCH": "8", "LAUNCHER": launcher})
    out = ok(proc)
    assert "global batch 8 = 2 process(es) x 4" in out
    assert '"batch_size": 4' in out and "world size 2" in out
    assert "--dry_run given: not sampling" in out


def test_paper_experiment_scripts(tmp_path):
    data = make_npz(tmp_path / "data.npz", n=4)
    proc = bash("cifar10.sh", ["foo"])
    assert proc.returncode == 2 and "unknown variant 'foo'" in proc.stderr and "md_lrc" in proc.stderr
    proc = bash("cifar10.sh", ["all"], {"DATA_DIR": str(tmp_path / "nothing")})
    assert proc.returncode == 2 and "data not found" in proc.stderr and "datasets/cifar10.py" in proc.stderr
    proc = bash("imagenet128.sh", ["all"], {"DATA_DIR": data})
    assert proc.returncode == 2 and "imagenet128_ref.npz" in proc.stderr and "REF_STATS=" in proc.stderr
    proc = bash("imagenet128.sh", ["baseline"], {"DATA_DIR": data, "REF_STATS": "", "NGPUS": "6"})
    assert proc.returncode == 2 and "GLOBAL_BATCH=256 is not divisible by NGPUS=6" in proc.stderr


# ---------------------------------------------------------------------------- ablation.sh


def test_ablation_two_variants(tmp_path):
    data = make_npz(tmp_path / "data.npz", n=8)
    config = tiny_config(tmp_path / "tiny.json")
    out_dir = tmp_path / "abl"
    out = ok(bash("ablation.sh", [config, out_dir, "--variants", "baseline,all", "--total_steps", "2"],
                  {"NGPUS": "1", "DATA_DIR": data}))
    assert "== run 1/2: baseline" in out and "== run 2/2: all" in out
    for name, sampler, md in (("baseline", "uniform", False), ("all", "clts", True)):
        cfg = json.loads((out_dir / name / "config.json").read_text())
        assert cfg["schedule_sampler"] == sampler and cfg["momentum_decay"] is md
        assert cfg["lr_compensation"] is md and cfg["total_steps"] == 2 and cfg["seed"] == 0
        assert (out_dir / name / "progress.csv").is_file()
    assert (out_dir / "curves.png").stat().st_size > 0
    md_text = (out_dir / "summary.md").read_text()
    assert "| baseline | 2 |" in md_text and "| all | 2 |" in md_text and "No FID values" in md_text
    with open(out_dir / "summary.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["baseline", "all"]
    assert (out_dir / "runs.tsv").read_text().splitlines()[1].startswith("baseline\t")


def test_ablation_plans_sweeps_and_variants(tmp_path):
    data = make_npz(tmp_path / "data.npz", n=4)
    config = tiny_config(tmp_path / "tiny.json")
    out_dir = tmp_path / "sweep"
    out = ok(bash("ablation.sh", [config, out_dir, "--sweep", "clts_mu=0.1,0.5", "--with_baseline", "--plan",
                                  "--total_steps", "7"], {"DATA_DIR": data}))
    lines = [line for line in out.splitlines() if not line.startswith("[")]
    assert [line.split(":")[0] for line in lines] == ["baseline", "clts_mu_0.1", "clts_mu_0.5"]
    assert "--seed 0 --schedule_sampler clts --momentum_decay True --lr_compensation True --clts_mu 0.5 " \
           "--total_steps 7" in lines[2]
    assert "--schedule_sampler uniform --momentum_decay False" in lines[0]
    assert not out_dir.exists()

    # cifar10: the variants are the config files; the global batch defaults to 128
    out = ok(bash("ablation.sh", ["cifar10", out_dir, "--plan"], {"DATA_DIR": data, "REF_STATS": ""}))
    for variant in ("baseline", "md", "md_lrc", "clts", "all"):
        assert f"configs/cifar10_{variant}.json" in out
    assert "global batch 128 on 8 process(es)" in out

    # demo: its overlay files on top of configs/demo.json (all methods on)
    out = ok(bash("ablation.sh", ["demo", out_dir, "--variants", "md", "--plan"], {"DATA_DIR": data}))
    lines = [line for line in out.splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("md: ") and "configs/demo_md.json" in lines[0]
    assert lines[0].endswith(f"{out_dir / 'md'} --seed 0")  # no flags: the file is the variant
    assert "on 1 process(es)" in out


@pytest.mark.parametrize("args,message", [
    (["--variants", "baseline,foo"], "unknown variant 'foo'"),
    # typos and bad values are caught before anything runs, with --plan too
    (["--sweep", "clts_muu=0.1", "--plan"], "--sweep clts_muu: no such image_train.py option (did you mean clts_mu"),
    (["--sweep", "clts_mu=0.1,abc", "--plan"], "--sweep clts_mu=abc: argument --clts_mu: invalid float value: 'abc'"),
    (["--sweep", "clts_mu=0.1", "--clts_mu", "0.5", "--plan"], "--clts_mu is also among the extra flags"),
    (["--plan", "--total_stepz", "3"], "--total_stepz: no such image_train.py option (did you mean total_steps"),
    (["--plan", "--data_dir", "elsewhere"], "--data_dir: set by the launch scripts"),
    (["--sweep", "clts_mu"], "--sweep must be KEY=V1,V2"),
    (["--sweep", "clts_mu=0.1", "--base", "nope"], "unknown variant 'nope'"),
    (["--variants", "md", "--sweep", "clts_mu=0.1"], "not both"),
    (["--with_baseline"], "only goes with --sweep"),
])
def test_ablation_errors(tmp_path, args, message):
    data = make_npz(tmp_path / "data.npz", n=4)
    proc = bash("ablation.sh", [tiny_config(tmp_path / "t.json"), tmp_path / "out"] + args, {"DATA_DIR": data})
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_ablation_unknown_experiment(tmp_path):
    proc = bash("ablation.sh", ["nosuchexp", tmp_path / "out"])
    assert proc.returncode == 2 and "unknown experiment 'nosuchexp'" in proc.stderr and "cifar10" in proc.stderr


def test_ablation_plan_needs_no_data_or_reference_statistics(tmp_path):
    """The README's --plan example works before the data and FID statistics exist."""
    out_dir = tmp_path / "x"
    # as the README writes it: the experiment's default data and REF_STATS, present or not
    out = ok(bash("ablation.sh", ["cifar10", out_dir, "--sweep", "clts_mu=0.1,0.3", "--base", "clts", "--plan"],
                  cwd=tmp_path, timeout=120))
    lines = [line for line in out.splitlines() if not line.startswith("[")]
    assert [line.split(":")[0] for line in lines] == ["clts_mu_0.1", "clts_mu_0.3"]
    assert "configs/cifar10_clts.json" in lines[0] and lines[1].endswith("--clts_mu 0.3")
    # both missing: noted, not fatal
    missing = {"DATA_DIR": str(tmp_path / "no_data"), "REF_STATS": str(tmp_path / "no_ref.npz")}
    proc = bash("ablation.sh", ["cifar10", out_dir, "--sweep", "clts_mu=0.1,0.3", "--base", "clts", "--plan"],
                missing, cwd=tmp_path, timeout=120)
    out = ok(proc)
    assert f"note: data not found: {tmp_path / 'no_data'}" in out and "datasets/cifar10.py" in out
    assert f"note: reference statistics not found: {tmp_path / 'no_ref.npz'}" in out
    assert "--image_size 32" in out  # the hint to make them works for a folder
    assert "clts_mu_0.3: " in out
    assert not out_dir.exists() and sorted(os.listdir(tmp_path)) == []
    # without --plan the same inputs are still an error, before anything is written
    proc = bash("ablation.sh", ["cifar10", out_dir, "--sweep", "clts_mu=0.1"], missing, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "data not found" in proc.stderr
    assert not out_dir.exists()


def test_ablation_seed_sweep_sets_each_runs_seed(tmp_path):
    """--sweep seed=...: the swept value wins over SEED (a dry run: the options, no training)."""
    data = make_npz(tmp_path / "data.npz", n=4)
    out_dir = tmp_path / "seeds"
    out = ok(bash("ablation.sh", [tiny_config(tmp_path / "t.json"), out_dir, "--sweep", "seed=3", "--base", "baseline",
                                  "--dry_run", "True"], {"NGPUS": "1", "DATA_DIR": data}))
    assert "== run 1/1: seed_3" in out and '"seed": 3' in out and '"seed": 0' not in out


def test_train_flags_checker():
    assert train_flags.check(["--total_steps", "3", "--learn_sigma", "True"]) is None
    assert train_flags.check(["--total_step", "3"]) is None  # a unique prefix, as argparse takes it
    assert train_flags.check([], ("clts_sigma", ["0.1", "2"])) == "clts_sigma"
    with pytest.raises(train_flags.FlagError, match=r"--sweep clts_muu: .*did you mean clts_mu\b"):
        train_flags.check([], ("clts_muu", ["0.1"]))
    with pytest.raises(train_flags.FlagError, match="--sweep clts_m: no such"):  # the sweep key must be exact
        train_flags.check([], ("clts_m", ["0.1"]))
    with pytest.raises(train_flags.FlagError, match="--learn_sigma: expected a boolean"):
        train_flags.check(["--learn_sigma", "maybe"])
    with pytest.raises(train_flags.FlagError, match="--log_dir: set by the launch scripts"):
        train_flags.check(["--log_dir=x"])
    assert "clts_mu" in train_flags.suggestions("mu", train_flags.option_names())
    proc = subprocess.run([PYTHON, os.path.join(LAUNCH, "train_flags.py"), "--sweep", "momentum_decy=True"],
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean momentum_decay" in proc.stderr


# ---------------------------------------------------------------------------- --help everywhere


@pytest.mark.parametrize("script", ["train.sh", "cifar10.sh", "imagenet128.sh", "ablation.sh"])
def test_launch_help_exits_zero(script):
    """--help prints the usage on stdout and succeeds; the scripts run as executables, as documented."""
    path = os.path.join(LAUNCH, script)
    assert os.access(path, os.X_OK), f"{script} is not executable (configs/README.md runs it directly)"
    for flag in ("--help", "-h"):
        proc = subprocess.run([path, flag], env=env(), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert f"scripts/launch/{script}" in proc.stdout and "NGPUS" in proc.stdout
        assert proc.stderr == ""


def copy_script(tmp_path, name):
    """scripts/NAME in an empty stand-in checkout: whatever it would do happens there, not here."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    with open(os.path.join(ROOT, "scripts", name)) as f:
        (repo / "scripts" / name).write_text(f.read())
    return repo


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files) + \
        sorted(os.path.relpath(os.path.join(d, x), root) for d, dirs, _ in os.walk(root) for x in dirs)


def run_top(tmp_path, name, args, extra_env=None):
    """bash scripts/NAME ARGS from a stand-in checkout, with PYTHON=false and OUT in tmp_path."""
    repo = copy_script(tmp_path, name)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    e = env()
    for key in ("OUT", "STEPS", "EVAL_SAMPLES", "REF_IMAGES", "SAMPLES", "VIRTUAL_ENV"):
        e.pop(key, None)
    # were --help ignored, the install would stop at once (no interpreter named "false" makes a venv)
    e.update({"PYTHON": "false", "OUT": str(tmp_path / "out")}, **(extra_env or {}))
    before = all_files(tmp_path)
    proc = subprocess.run(["bash", str(repo / "scripts" / name)] + list(args), cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=20)
    return proc, before, all_files(tmp_path)


@pytest.mark.parametrize("script,names", [
    ("demo.sh", ["OUT", "STEPS", "EVAL_SAMPLES", "REF_IMAGES", "PYTHON", "runs/demo", "2500", "OUT/report/", "OUT/timing.json"]),
    ("analysis_demo.sh", ["DEMO_RUN", "OUT", "STEPS", "SAMPLES", "runs/demo", "runs/analysis", "OUT/consistency/"]),
    ("install.sh", ["PYTHON", ".venv", "python3"]),
    ("test.sh", ["OMP_NUM_THREADS", "PYTHON", "pytest"]),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_runs_nothing(tmp_path, script, names, flag):
    proc, before, after = run_top(tmp_path, script, [flag])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and f"scripts/{script}" in proc.stdout
    for name in names:
        assert name in proc.stdout, name
    assert proc.stderr == ""
    assert after == before  # no .venv, no data, no OUT


@pytest.mark.parametrize("script,args,message", [
    ("demo.sh", ["--steps", "10"], "unknown argument '--steps'"),
    ("demo.sh", ["runs/mine"], "unknown argument 'runs/mine'"),
    ("install.sh", ["--upgrade"], "unknown argument '--upgrade'"),
    ("analysis_demo.sh", ["--steps=10"], "unknown option '--steps=10'"),
    ("analysis_demo.sh", ["a", "b", "c"], "too many arguments"),
])
def test_top_level_unknown_arguments(tmp_path, script, args, message):
    proc, before, after = run_top(tmp_path, script, args)
    assert proc.returncode == 2
    assert message in proc.stderr and "usage:" in proc.stderr
    assert after == before


@pytest.mark.parametrize("value,message", [
    ("abc", "STEPS must be a positive whole number, got 'abc'"),
    ("3", "STEPS must be at least 5"),
])
def test_demo_rejects_bad_steps(tmp_path, value, message):
    proc, before, after = run_top(tmp_path, "demo.sh", [], {"STEPS": value})
    assert proc.returncode == 2 and message in proc.stderr
    assert after == before


def test_analysis_demo_checks_the_demo_run_before_training(tmp_path):
    """A missing or shorter demo run is an error at once, not after 20 minutes of training."""
    proc, before, after = run_top(tmp_path, "analysis_demo.sh", [])
    assert proc.returncode == 2 and "no .venv" in proc.stderr and after == before
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text("")
    (repo / "data" / "demo").mkdir(parents=True)
    (repo / "data" / "demo" / "mnist_demo.npz").write_text("")
    proc, before, after = run_top(tmp_path, "analysis_demo.sh", ["runs/demo", "runs/analysis"])
    assert proc.returncode == 2 and "runs/demo/train/config.json not found" in proc.stderr
    (repo / "runs" / "demo" / "train").mkdir(parents=True)
    (repo / "runs" / "demo" / "train" / "config.json").write_text("{}")
    proc, before, after = run_top(tmp_path, "analysis_demo.sh", [], {"STEPS": "500"})
    assert proc.returncode == 2 and "config.json names no ema_rate" in proc.stderr
    (repo / "runs" / "demo" / "train" / "config.json").write_text(json.dumps(
        {"total_steps": 1000, "ema_rate": "0.995,0.9999", "data_dir": "data/demo/mnist_demo.npz"}))
    proc, before, after = run_top(tmp_path, "analysis_demo.sh", [], {"STEPS": "500"})
    assert proc.returncode == 2 and "runs/demo/train/ema_0.995_000500.pt not found" in proc.stderr
    assert "STEPS=500" in proc.stderr
    assert after == before and not (repo / "runs" / "analysis").exists()
