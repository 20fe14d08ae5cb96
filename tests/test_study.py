"""
scripts/study.py: its statistics against independent computations, and a tiny study end to
end that is killed, resumed and skips what is done.
"""

import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_study():
    spec = importlib.util.spec_from_file_location("study", os.path.join(ROOT, "scripts", "study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = load_study()


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [0.5, 0.51, 0.49, 0.7, 0.3], [10.0, 10.5]])
def test_t_interval_matches_scipy(values):
    from scipy import stats

    m = study.mean_interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert m["mean"] == pytest.approx(np.mean(values))
    assert m["lo"] == pytest.approx(lo, rel=1e-10)
    assert m["hi"] == pytest.approx(hi, rel=1e-10)
    assert m["n"] == len(values)


def test_t_interval_edge_cases():
    assert study.mean_interval([]) == dict(mean=None, lo=None, hi=None, n=0, sd=None)
    one = study.mean_interval([3.0, None])
    assert one["mean"] == 3.0 and one["lo"] is None
    assert study.t_quantile(0.975, 2) == pytest.approx(4.302652729911275)


def test_steps_to_target_on_synthetic_curves():
    steps = [100, 200, 300, 400]
    # a straight line 1 - s/1000: reaches 0.75 at s = 250 exactly
    line = [1 - s / 1000 for s in steps]
    assert study.steps_to_target(steps, line, 0.75) == pytest.approx(250.0)
    # an exponential decay sampled coarsely: linear interpolation between the bracketing points
    curve = [math.exp(-s / 200) for s in steps]
    target = 0.3
    i = next(k for k, v in enumerate(curve) if v <= target)
    expect = steps[i - 1] + (curve[i - 1] - target) / (curve[i - 1] - curve[i]) * (steps[i] - steps[i - 1])
    assert study.steps_to_target(steps, curve, target) == pytest.approx(expect)
    assert study.steps_to_target(steps, line, 0.1) is None  # never reached
    assert study.steps_to_target(steps, line, 0.95) == 100  # already there at the first evaluation
    # non-monotone: the first crossing counts
    assert study.steps_to_target(steps, [1.0, 0.4, 0.9, 0.3], 0.5) == pytest.approx(100 + 0.5 / 0.6 * 100)


def test_summary_speedup_on_synthetic_runs():
    preset = dict(steps=400, eval_steps=(100, 200, 300, 400), fid_steps=())
    records = []
    for seed, noise in enumerate([0.0, 0.01, -0.01]):
        # baseline: 1 - s/1000 (final 0.6); fast: 1 - s/500 (reaches 0.6 at s = 200)
        records.append(dict(variant="baseline", seed=seed, evals={
            str(s): {"heldout_mse": 1 - s / 1000 + noise, "heldout_vlb_bpd": 2.0} for s in preset["eval_steps"]}))
        records.append(dict(variant="fast", seed=seed, evals={
            str(s): {"heldout_mse": 1 - s / 500, "heldout_vlb_bpd": 2.0} for s in preset["eval_steps"]}))
    summary = study.summarize(preset, records)
    fast = summary["variants"]["fast"]["steps_to_baseline_final"]["heldout_mse"]
    assert fast["mean"] == pytest.approx(200.0)
    assert fast["speedup"] == pytest.approx(2.0)
    assert fast["reached"] == fast["of"] == 3
    base = summary["variants"]["baseline"]["metrics"]["heldout_mse"]["400"]
    assert base["mean"] == pytest.approx(0.6)
    assert "| fast | 3 |" in study.markdown(summary)


def tiny_data(path, n=48):
    rng = np.random.default_rng(0)
    images = (rng.random((n, 16, 16, 3)) > 0.5).astype(np.uint8) * 255
    np.savez(path, images, np.zeros(n, dtype=np.int64))
    return path


TINY = ("--num_channels 32 --channel_mult 1 --num_res_blocks 1 --attention_resolutions '' "
        "--diffusion_steps 20 --batch_size 4")


def study_cmd(tmp_path, data):
    return [sys.executable, os.path.join(ROOT, "scripts", "study.py"), "--preset", "cpu", "--steps", "4",
            "--variants", "baseline,speed", "--seeds", "0,1", "--data", str(data), "--holdout", "8",
            "--out", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs"), "--extra_flags", TINY]


def test_tiny_study_killed_and_resumed(tmp_path):
    data = tiny_data(tmp_path / "d.npz")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = study_cmd(tmp_path, data)
    first = tmp_path / "out" / "runs" / "baseline_seed0.json"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    def finished():
        try:
            return "train_seconds" in json.loads(first.read_text())  # written when a run is complete
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    while not finished() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its training run, killed mid-way (as Ctrl-C would)
    out, _ = proc.communicate()
    assert first.exists(), out
    rec = json.loads(first.read_text())
    assert set(rec["evals"]) == {"1", "2", "3", "4"}
    assert not (tmp_path / "out" / "runs" / "speed_seed1.json").exists()

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "baseline seed 0: done, skipped" in done.stdout
    runs = sorted(os.listdir(tmp_path / "out" / "runs"))
    assert runs == ["baseline_seed0.json", "baseline_seed1.json", "speed_seed0.json", "speed_seed1.json"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["variants"]) == {"baseline", "speed"}
    m = summary["variants"]["speed"]["metrics"]["heldout_mse"]["4"]
    assert m["n"] == 2 and m["lo"] <= m["mean"] <= m["hi"]
    assert "steps_to_baseline_final" in summary["variants"]["speed"]
    assert (tmp_path / "out" / "summary.md").exists()

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 4, again.stdout
    # the same records from the same evaluations: nothing was retrained
    assert json.loads(first.read_text()) == rec



@pytest.mark.slow
def test_parallel_workers_give_the_serial_records(tmp_path):
    """--parallel 2: two runs at once, each its own process on one thread, the same
    arithmetic as the serial study's, so the records' evaluations are equal exactly."""
    data = tiny_data(tmp_path / "d.npz")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    records = {}
    for mode, extra in (("serial", []), ("parallel", ["--parallel", "2"])):
        cmd = study_cmd(tmp_path / mode, data) + ["--variants", "baseline"] + extra
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        records[mode] = {f: json.loads((tmp_path / mode / "out" / "runs" / f).read_text())["evals"]
                         for f in ("baseline_seed0.json", "baseline_seed1.json")}
    assert "2 to go, 2 at a time" in proc.stdout and proc.stdout.count(": finished") == 2, proc.stdout
    assert records["parallel"] == records["serial"]
    assert (tmp_path / "parallel" / "out" / "summary.json").exists()


def test_plan_lists_main_table_and_sweeps(capsys):
    assert study.main(["--plan", "--sweeps", "clts_sigma"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(study.MAIN_VARIANTS) * 3 + 4 * 2  # sigma 1.0 is `all` itself
    assert any(line.startswith("all_clts_sigma=0.05\tseed 1\tconfigs/demo_all.json --clts_sigma 0.05") for line in lines)
    variants = {line.split("\t")[0] for line in lines}
    assert {"baseline", "md", "md_lrc", "clts", "all", "minsnr", "p2", "speed", "lognormal"} <= variants


def test_digits_preset_scaled_to_other_steps_keeps_its_proportions():
    digits = study.PRESETS["digits"]
    with open(os.path.join(ROOT, "configs", "demo.json")) as f:
        demo_steps = json.load(f)["total_steps"]
    assert digits["steps"] == demo_steps // 2
    assert digits["train_flags"] == ["--clts_target_steps", str(digits["steps"] // 5)]  # a fifth, as the demo
    short = study.with_steps(digits, 50)
    assert short["steps"] == 50
    assert short["eval_steps"] == short["quality_steps"] == (10, 20, 30, 40, 50)
    assert short["train_flags"] == ["--clts_target_steps", "10"]
    assert digits["train_flags"] == ["--clts_target_steps", str(digits["steps"] // 5)]  # the preset is untouched
    cpu = study.with_steps(study.PRESETS["cpu"], 600)
    assert cpu["eval_steps"] == (120, 240, 360, 480, 600)
    assert cpu["train_flags"][cpu["train_flags"].index("--clts_target_steps") + 1] == "120"


def test_digits_preset_scores_samples_with_the_digit_classifier(tmp_path):
    """The digits preset: held-out digits from every class, and sample quality (digit-FID and
    the recognised share) at each quality step, summarised over seeds."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 6)
    images = (rng.random((60, 8, 8, 1)) > 0.6).astype(np.uint8) * 255
    data = tmp_path / "grey.npz"
    np.savez(data, images, labels)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "study.py"), "--preset", "digits", "--steps", "2",
           "--variants", "baseline", "--seeds", "0,1", "--data", str(data), "--holdout", "10",
           "--quality_samples", "6", "--out", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs"),
           "--extra_flags", TINY + " --image_channels 1 --image_size 8 --diffusion_steps 50"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = np.load(tmp_path / "runs" / "data" / "train_minus_every6th.npz")
    assert len(train["arr_0"]) == 50 and np.bincount(train["arr_1"], minlength=10).min() == 5  # every class held out once
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    metrics = summary["variants"]["baseline"]["metrics"]
    for step in ("1", "2"):
        assert metrics["digit_fid"][step]["n"] == 2 and metrics["digit_fid"][step]["mean"] >= 0
        assert 0 <= metrics["recognisable"][step]["mean"] <= 1
    assert "digit-FID" in (tmp_path / "out" / "summary.md").read_text()



@pytest.mark.slow
def test_digits_paper_evaluates_each_run_at_its_best_posthoc_ema(tmp_path):
    """The digits_paper preset: the paper's objective, and every run evaluated twice, at the
    fixed EMA and at the std its selection samples score best; the best-EMA numbers are those
    of the EMA rebuilt from the run's power-function EMAs (recomputed here)."""
    from improved_diffusion.experiments import study as package
    from improved_diffusion.experiments.analysis import load_model_and_diffusion
    from improved_diffusion.run.posthoc_ema import reconstruct

    rng = np.random.default_rng(1)
    data = tmp_path / "grey.npz"
    np.savez(data, (rng.random((60, 8, 8, 1)) > 0.6).astype(np.uint8) * 255, np.repeat(np.arange(10), 6))
    preset = package.with_steps(package.PRESETS["digits_paper"], 4)
    assert preset["eval_steps"] == (1, 2, 3, 4) and "--learn_sigma" in preset["train_flags"]
    preset.update(data=str(data), holdout=10, heldout_images=10, quality_samples=6, quality_respacing="10",
                  posthoc_stds=(0.05, 0.1, 0.2), train_flags=preset["train_flags"] + shlex.split(
                      TINY + " --image_channels 1 --image_size 8"))
    out, runs = str(tmp_path / "out"), str(tmp_path / "runs")
    package.run_all(preset, package.run_plan(preset, ["baseline"], [0, 1], [], []), out, runs, "digits_paper",
                    keep_checkpoints=True)
    summary = package.write_summary(preset, out, "digits_paper")

    record = json.loads((tmp_path / "out" / "runs" / "baseline_seed0.json").read_text())
    post = record["posthoc"]
    assert set(post["selection"]) == {"0.05", "0.1", "0.2"}
    assert post["std"] == float(min(post["selection"], key=post["selection"].get))
    assert package.run_done(record, preset)
    log_dir = os.path.join(runs, "baseline_seed0")
    model, diffusion, _ = load_model_and_diffusion(log_dir, {}, device="cpu")
    model.load_state_dict(reconstruct(log_dir, post["std"], 4, log=lambda *a: None)[0])
    heldout = package.prepare_data(preset, os.path.join(runs, "data"))[1]
    mse, vlb = package.heldout_metrics(model, diffusion, heldout, 10, 1, "cpu")
    assert post["evals"]["4"]["heldout_mse"] == pytest.approx(mse, rel=1e-6)
    assert post["evals"]["4"]["heldout_mse"] != record["evals"]["4"]["heldout_mse"]  # not the fixed EMA's
    assert summary["posthoc"]["variants"]["baseline"]["std_by_seed"]["0"] == post["std"]
    assert summary["posthoc"]["variants"]["baseline"]["metrics"]["digit_fid"]["4"]["n"] == 2
    assert "## At each run's best EMA" in (tmp_path / "out" / "summary.md").read_text()


def test_training_options_are_rendered_from_the_table():
    from improved_diffusion.experiments import study as package

    opts = package.options_from_flags(["--lr", "1e-3", "--attention_resolutions", "", "--random_flip=True"])
    assert opts == {"lr": 0.001, "attention_resolutions": "", "random_flip": True}
    assert package.render_flags(opts) == ["--lr", "0.001", "--attention_resolutions", "", "--random_flip", "True"]
    with pytest.raises(ValueError, match="--no_such_flag"):
        package.options_from_flags(["--no_such_flag", "1"])
    with pytest.raises(ValueError, match="--lr"):
        package.options_from_flags(["--lr"])
    with pytest.raises(ValueError, match="--lr must be positive"):
        package.render_flags({"lr": -1.0})
