"""
The multi-seed study (scripts/study.py is its command line): does a method train faster
than the baseline, and by how much?

Trains variants x seeds with scripts/image_train.py (`launch_training`: one process per
run, one thread each), evaluates the EMA model at fixed steps and summarises over seeds:

  * held-out loss at uniform timesteps on a fixed batch with fixed timesteps and noise
    (deterministic): the epsilon-MSE (unweighted, whatever the run's loss weighting) and an
    unbiased one-timestep estimate of the VLB in bits/dim (prior + T x mean L_t);
  * FID of the EMA model (DDIM samples, the bundled Inception network) at the FID steps,
    through the one `evaluator.Evaluator`;
  * per variant and step: mean and 95% t-interval over seeds; steps to reach the baseline's
    final mean (`stats.steps_to_target` per seed, t-interval over seeds) and the speed-up
    (baseline steps / those steps).

Resumable: each run's evaluations are written to OUT/runs/VARIANT_seedS.json as they are
made; a run whose file holds every evaluation is skipped (training and all), a partly
trained run resumes from its newest checkpoint (image_train.py --resume auto).
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from ..options import config
from .. import methods
from . import claims
from ..evaluation.evaluator import Evaluator, Sampling
from .stats import mean_interval, steps_to_target, t_quantile  # noqa: F401  (the study's statistics)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The paper's five, then one variant per rival method (improved_diffusion/methods/ declares them).
PAPER_VARIANTS = methods.PAPER_VARIANTS
MAIN_VARIANTS = methods.variants()
# Sweeps: (name, base variant, option, values); each run is the base variant plus --option value.
SWEEPS = (
    ("clts_sigma", "all", "clts_sigma", (0.05, 0.1, 0.2, 0.5, 1.0)),
    ("clts_mu", "all", "clts_mu", (0.1, 0.3, 0.5, 0.7)),
    ("md_beta_min", "md_lrc", "md_beta_min", (0.3, 0.5, 0.7)),
    # Is the demo's lr (2e-3, tuned for x_0 prediction) too high for another objective? A
    # lower constant lr against the lr decay that MD + LRC brings (docs/results.md section 6).
    ("baseline_lr", "baseline", "lr", (5e-4, 1e-3)),
)

# cpu: the demo digits on a CPU, one thread per run. Small batch and a high lr so that the
# 1.2M-parameter demo model gets many updates in little time (docs/results.md says why).
_CPU_STEPS = 300
PRESETS = {
    "cpu": dict(
        experiment="demo",
        data="data/demo/mnist_demo.npz",
        holdout=500,  # the last 500 digits are held out of training
        steps=_CPU_STEPS,
        eval_steps=tuple(range(_CPU_STEPS // 5, _CPU_STEPS + 1, _CPU_STEPS // 5)),
        # The bundled Inception network runs at ~3 images/s on one CPU thread: FID with a
        # measurable seed spread does not fit the cpu budget; --fid_steps turns it on.
        fid_steps=(),
        # The session-3 demo configuration: configs/demo.json has since become the grey,
        # x0-predicting demo; these flags give back what this preset's results were run with.
        train_flags=["--batch_size", "8", "--lr", "1e-3", "--ema_rate", "0.99",
                     "--clts_target_steps", str(_CPU_STEPS // 5),
                     "--image_channels", "3", "--predict_xstart", "False", "--random_flip", "True"],
        seeds=(0, 1, 2),
        sweep_seeds=(0, 1),
        heldout_images=256,
        heldout_repeats=1,
        fid_samples=100,
        fid_respacing="ddim25",
        fid_batch=100,
        ref_images=500,
        launcher=[],
        device="cpu",
    ),
    # One GPU in under 8 minutes: the demo (configs/demo.json, grey digits) for 4,000 steps.
    "gpu": dict(
        experiment="demo",
        data="data/demo/mnist_demo_grey.npz",
        holdout=500,
        holdout_split="every",
        steps=4000,
        eval_steps=(500, 1000, 1500, 2000, 2500, 3000, 3500, 4000),
        fid_steps=(1000, 2000, 4000),
        train_flags=["--clts_target_steps", "800",
                     "--data_on_device", "True"],
        seeds=(0, 1, 2),
        sweep_seeds=(0, 1),
        heldout_images=500,
        heldout_repeats=4,
        fid_samples=1000,
        fid_respacing="ddim25",
        fid_batch=500,
        ref_images=4500,
        launcher=[],
        device="cuda",
    ),
    # The paper's CIFAR-10 setting on 8 GPUs (configs/cifar10_*.json): 500k steps each run.
    "paper": dict(
        experiment="cifar10",
        data="data/cifar10/train",
        holdout=0,
        heldout_source="data/cifar10/test",
        heldout_image_size=32,
        steps=500000,
        eval_steps=tuple(range(50000, 500001, 50000)),
        fid_steps=(100000, 200000, 300000, 400000, 500000),
        train_flags=[],
        seeds=(0, 1, 2),
        sweep_seeds=(0, 1),
        heldout_images=1000,
        heldout_repeats=1,
        fid_samples=10000,
        fid_respacing="250",
        fid_batch=500,
        ref_images=50000,
        launcher=["torchrun", "--standalone", "--nproc_per_node", "8"],
        device="cuda",
    ),
}
# digits: the demo model and optimiser of the README's first command (configs/demo.json: grey
# digits, x0-prediction, batch 32, lr 2e-3, EMA 0.995) for half its steps, one thread per run:
# at 1,250 steps the demo's samples are strokes and half of them recognisable digits (past
# the blob regime), and 9 variants x 3 seeds fit about 90 minutes of a 2-core machine.
# CLTS ramps over a fifth of the run, as in the demo. Held out: every tenth digit (all ten
# classes). Sample quality comes from a small digit classifier (scripts/digit_score.py)
# instead of Inception (about 3 images/s per CPU thread): the share of samples it recognises,
# and the Frechet distance in its feature space ("digit-FID", against the training digits).
with open(os.path.join(ROOT, "configs", "demo.json")) as _f:
    _DIGITS_STEPS = int(json.load(_f)["total_steps"]) // 2
_DIGITS_EVALS = tuple(round(_DIGITS_STEPS * k / 5) for k in range(1, 6))
PRESETS["digits"] = dict(
    PRESETS["cpu"], data="data/demo/mnist_demo_grey.npz", holdout=500, holdout_split="every",
    steps=_DIGITS_STEPS, eval_steps=_DIGITS_EVALS, quality_steps=_DIGITS_EVALS, quality_samples=300,
    quality_respacing="ddim25", train_flags=["--clts_target_steps", str(_DIGITS_STEPS // 5)],
    heldout_images=500)
# digits_paper: the paper's objective (its CIFAR-10 experiment is Improved Diffusion's) on the
# grey digits, 16 px (the demo data: the size at which a one-thread run reaches recognisable
# digits in minutes): epsilon prediction with learned variances (L_hybrid), cosine schedule,
# T = 4000, dropout 0.1, Adam betas (0.9, 0.999). Model, batch (32) and lr (2e-3) stay the
# demo's, tuned for this 1.2M-parameter model with x_0 prediction (the paper's lr 1e-4 is for
# a 52.5M-parameter model at batch 128 over 500k steps; it was not tried here), for the demo's
# full 2,500 steps.
# The baseline_lr sweep found 2e-3 too high for this objective: a constant 1e-3 or 5e-4 does as
# well as MD + LRC (docs/results.md section 6).
# Every run tracks power-function EMAs (std 0.05 and 0.10), so that each arm is also
# evaluated at its best EMA, chosen from POSTHOC_STDS (`evaluate_posthoc`); samples use 100
# ancestral steps, the sampler of learned-variance models.
POSTHOC_STDS = (0.03, 0.05, 0.08, 0.12, 0.18)  # 0.08: about the fixed EMA 0.995 at 2,500 steps (200 / 2,500)
_PAPER_DIGITS_STEPS = 2 * _DIGITS_STEPS
_PAPER_DIGITS_EVALS = tuple(round(_PAPER_DIGITS_STEPS * k / 5) for k in range(1, 6))
PRESETS["digits_paper"] = dict(
    PRESETS["digits"], steps=_PAPER_DIGITS_STEPS, eval_steps=_PAPER_DIGITS_EVALS, quality_steps=_PAPER_DIGITS_EVALS,
    quality_respacing="100", posthoc_stds=POSTHOC_STDS,
    train_flags=["--predict_xstart", "False", "--learn_sigma", "True", "--diffusion_steps", "4000", "--dropout", "0.1",
                 "--clts_target_steps", str(_PAPER_DIGITS_STEPS // 5), "--phema_stds", "0.05,0.1"])
# The paper's ImageNet-128 setting (configs/imagenet128_*.json), 8 GPUs; held out: the
# validation images (prepared like the training set, datasets/README.md).
PRESETS["paper_imagenet128"] = dict(
    PRESETS["paper"], experiment="imagenet128", data="data/imagenet128/train.npz",
    heldout_source="data/imagenet128/val.npz", heldout_image_size=None, steps=4360000,
    eval_steps=tuple(range(250000, 4360001, 250000)) + (4360000,),
    fid_steps=(1000000, 2000000, 3000000, 4360000))

METRICS = ("heldout_mse", "heldout_vlb_bpd", "fid", "digit_fid", "recognisable")
# Lower is better for these; the steps to reach the baseline's value are computed for each.
TARGET_METRICS = ("heldout_mse", "heldout_vlb_bpd", "digit_fid")


# --------------------------------------------------------------------------- the runs


def run_plan(preset, variants, seeds, sweeps, sweep_seeds):
    """A list of (name, config file, extra flags, seed) for the study."""
    exp = preset["experiment"]
    runs = []
    for variant in variants:
        for seed in seeds:
            runs.append((variant, f"configs/{exp}_{variant}.json", [], seed))
    for sweep, base, option, values in SWEEPS:
        if sweep not in sweeps:
            continue
        for value in values:
            if _same_as_base(preset, f"configs/{exp}_{base}.json", option, value):
                continue  # the base variant's own runs are this point of the sweep
            name = f"{base}_{option}={value}"
            for seed in sweep_seeds:
                runs.append((name, f"configs/{exp}_{base}.json", [f"--{option}", str(value)], seed))
    return runs


def _same_as_base(preset, config_file, option, value):
    """Whether --option value is what the base variant already trains with (no new run)."""
    if f"--{option}" in preset["train_flags"]:
        return False
    values = config.defaults()
    values.update(config.read_options_file(os.path.join(ROOT, config_file)))
    return option in values and float(values[option]) == float(value)


def prepare_data(preset, out_data):
    """The training split and the held-out images (numpy uint8 NHWC) of a preset."""
    holdout = preset["holdout"]
    if not holdout:
        source = preset.get("heldout_source")
        if not source:
            return preset["data"], None
        from ..evaluation.fid import load_reference_images

        return preset["data"], np.asarray(load_reference_images(source, preset.get("heldout_image_size"))[: preset["heldout_images"]])
    src = os.path.join(ROOT, preset["data"])  # an absolute path stays as it is
    if not os.path.exists(src):
        grey = " --channels 1" if "grey" in os.path.basename(preset["data"]) else ""
        raise SystemExit(f"study: {preset['data']} is missing: python datasets/mnist_demo.py --out data/demo "
                         f"--image_size 16{grey}")
    os.makedirs(out_data, exist_ok=True)
    data = np.load(src)
    images, labels = data["arr_0"], data["arr_1"] if "arr_1" in data else None
    # "last": the last `holdout` images (the cpu preset's split; the demo file is sorted by
    # class, so those are all nines, a class its runs never see). "every": every
    # (N / holdout)-th image, so the held-out digits cover every class.
    if preset.get("holdout_split", "last") == "every":
        keep = np.ones(len(images), bool)
        keep[np.linspace(0, len(images) - 1, holdout).round().astype(int)] = False
        train_path = os.path.join(out_data, f"train_minus_every{len(images) // holdout}th.npz")
    else:
        keep = np.arange(len(images)) < len(images) - holdout
        train_path = os.path.join(out_data, f"train_minus_last{holdout}.npz")
    if not os.path.exists(train_path):
        arrays = [images[keep]] + ([labels[keep]] if labels is not None else [])
        tmp = train_path + ".tmp.npz"
        np.savez(tmp, *arrays)
        os.replace(tmp, train_path)
    return train_path, images[~keep]


def reference_stats(preset, train_path, out_data, networks):
    """The FID reference file of the training split (`scripts/fid.py ref`'s), made once."""
    from ..evaluation import fid, metrics

    path = os.path.join(out_data, f"ref_stats_{preset['ref_images']}.npz")
    if not os.path.exists(path):
        evaluator = Evaluator(device=preset["device"], networks=networks)
        pool, spatial = fid.reference_features(train_path, evaluator.extractor, max_images=preset["ref_images"],
                                               device=preset["device"], spatial=True)
        metrics.save_reference(path, pool, spatial)
    return path


def one_thread_env():
    """Each training run on one thread, importing this checkout's package."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_file(out, name, seed):
    return os.path.join(out, "runs", f"{name}_seed{seed}.json")


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def run_done(record, preset):
    """Whether `record` holds every evaluation the preset asks for (at the best post-hoc EMA too)."""
    if not record:
        return False
    sets = [record.get("evals", {})]
    if preset.get("posthoc_stds"):
        post = record.get("posthoc", {})
        if set(post.get("selection", {})) != {f"{s:g}" for s in preset["posthoc_stds"]}:
            return False
        sets.append(post.get("evals", {}))
    return all(str(step) in ev and not _missing(preset, ev[str(step)], step)
               for ev in sets for step in preset["eval_steps"])


def options_from_flags(flags, where="--extra_flags"):
    """{option: value} of image_train.py flags (`--name value` or `--name=value`), typed by
    the options table; ValueError naming the flag for one the table does not know."""
    options, i = {}, 0
    while i < len(flags):
        word = flags[i]
        if not word.startswith("--"):
            raise ValueError(f"{where}: expected --name value, got {word!r}")
        name, eq, value = word[2:].partition("=")
        if not eq:
            if i + 1 >= len(flags):
                raise ValueError(f"{where}: --{name} has no value")
            value, i = flags[i + 1], i + 1
        if name not in config.BY_NAME:
            raise ValueError(f"{where}: --{name} is not an option of image_train.py")
        options[name] = config.coerce(name, value, where)
        i += 1
    return options


def render_flags(options):
    """The image_train.py command line of `options` (the one place it is written)."""
    argv = []
    for name, value in options.items():
        config.BY_NAME[name].validate(value)
        argv += [f"--{name}", str(value)]
    return argv


def launch_training(options, launcher=(), output=None):
    """
    Train one run: scripts/image_train.py with `options` (names of the options table), under
    `launcher` (e.g. torchrun ... for the paper presets; none: this Python), one thread per
    process. Returns the run folder, options["log_dir"].

    A separate process, not image_train.main() in this one: the paper presets run under
    torchrun on 8 GPUs, torch's thread count is fixed per process before the first op (the
    committed results ran each run on one thread), and a killed study leaves each run's
    process group, logger and lock behind it cleanly; image_train.py itself builds the run
    with training.check / build_model / build_loop.
    """
    cmd = list(launcher or [sys.executable]) + [os.path.join(ROOT, "scripts", "image_train.py")]
    cmd += render_flags(options)
    log_dir = options["log_dir"]
    with open(output or os.path.join(log_dir, "study_train.out"), "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=one_thread_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}): {shlex.join(cmd)}; see {log_dir}/study_train.out")
    return log_dir


def train(preset, config_file, flags, seed, log_dir, train_path, save_interval):
    """One run of the study: its config file, the preset's flags, then the run's own (a sweep's)."""
    options = dict(config=config_file, data_dir=train_path, log_dir=log_dir, seed=seed, total_steps=preset["steps"],
                   save_interval=save_interval, log_interval=save_interval, eval_interval=0, keep_checkpoints=0)
    options.update(options_from_flags(preset["train_flags"] + list(flags)))
    return launch_training(options, preset["launcher"])


def same_as_base(config_file, flags, out, seed, preset):
    """The finished record of the base variant when `flags` only repeat its config's values."""
    if not flags:
        return None
    values = config.read_options_file(os.path.join(ROOT, config_file))
    for opt, value in zip(flags[::2], flags[1::2]):
        key = opt.lstrip("-")
        if key not in values or str(values[key]) != value:
            return None
    base = os.path.basename(config_file)[: -len(".json")].split("_", 1)[1]
    record = load_json(run_file(out, base, seed))
    return record if run_done(record, preset) else None


def heldout_metrics(model, diffusion, images, n_images, repeats, device, seed=1234):
    """Held-out epsilon-MSE and the one-timestep VLB estimate (bits/dim) on fixed inputs."""
    import torch

    from .analysis import fixed_loss_inputs

    x = np.asarray(images[:n_images])
    x = np.concatenate([x] * repeats)
    x0, t, noise = fixed_loss_inputs(diffusion, x, len(x), seed=seed, device=device)
    mses, vbs = [], []
    with torch.no_grad():
        for s in range(0, len(x0), 256):
            terms = diffusion.heldout_loss_terms(model, x0[s:s + 256], t[s:s + 256], noise[s:s + 256])
            mses.append(terms["eps_mse"])
            vbs.append(terms["vb"].double())
            prior = terms["prior_bpd"].double().mean()
    mse = torch.cat(mses).mean().item()
    vlb = (torch.cat(vbs).mean() * diffusion.num_timesteps + prior).item()
    return mse, vlb


def evaluate_run(preset, log_dir, record, heldout, ref_stats, cache, rec_path):
    """
    The missing evaluations of one run at the preset's steps, from its EMA checkpoints:
    held-out loss, FID (the `Evaluator`, samples seeded by 10,000 + step) and digit quality
    (samples seeded by 20,000 + step); the record is written after each step. With the
    preset's `posthoc_stds`, the same again at the run's best post-hoc EMA (`evaluate_posthoc`).

    :param cache: shared over runs: "networks" (the evaluators' feature networks), "digits",
                  "train_path".
    """
    import torch

    from .analysis import load_model_and_diffusion

    torch.set_num_threads(1)
    cfg = load_json(os.path.join(log_dir, "config.json"))
    flags = {k: cfg[k] for k in config.names(*config.MODEL_GROUPS) if k in cfg}
    rate = cfg["ema_rate"].split(",")[0]
    evaluators = _evaluators(preset, flags, ref_stats, cache)
    for step in preset["eval_steps"]:
        e = record["evals"].setdefault(str(step), {})
        if _missing(preset, e, step):
            path = os.path.join(log_dir, f"ema_{rate}_{step:06d}.pt")
            model, diffusion, _ = load_model_and_diffusion(path, flags, device=preset["device"])  # load_run
            _fill_metrics(preset, e, step, model, diffusion, heldout, evaluators, cache)
            write_json(rec_path, record)
    if preset.get("posthoc_stds"):
        evaluate_posthoc(preset, log_dir, record, flags, heldout, evaluators, cache, rec_path)


def _evaluators(preset, flags, ref_stats, cache):
    """(FID evaluator or None, digit-sample evaluator or None) of a run's model options."""
    networks = cache.setdefault("networks", {})
    fid_eval = quality = None
    if preset["fid_steps"]:
        fid_eval = Evaluator(ref_stats, ("fid",), device=preset["device"], networks=networks, sampling=Sampling(
            flags, preset["fid_respacing"], preset["fid_samples"], preset["fid_batch"]))
    if preset.get("quality_steps"):
        quality = Evaluator(device=preset["device"], sampling=Sampling(
            flags, preset["quality_respacing"], preset["quality_samples"], preset["quality_samples"]))
    return fid_eval, quality


def _missing(preset, e, step):
    """Whether evaluation record `e` of `step` lacks a metric the preset asks for there."""
    return ("heldout_mse" not in e or (step in preset["fid_steps"] and "fid" not in e)
            or (step in preset.get("quality_steps", ()) and "digit_fid" not in e))


def _fill_metrics(preset, e, step, model, diffusion, heldout, evaluators, cache):
    """The metrics `e` lacks at `step`, of `model`: held-out loss, FID, digit quality."""
    fid_eval, quality = evaluators
    device = preset["device"]
    if "heldout_mse" not in e and heldout is not None:
        e["heldout_mse"], e["heldout_vlb_bpd"] = heldout_metrics(
            model, diffusion, heldout, preset["heldout_images"], preset["heldout_repeats"], device)
    if step in preset["fid_steps"] and "fid" not in e:
        e["fid"] = float(fid_eval.score(np.asarray(fid_eval.sample(model, seed=10_000 + step)))["fid"])
    if step in preset.get("quality_steps", ()) and "digit_fid" not in e:
        e.update(digit_quality(quality.sample(model, seed=20_000 + step), preset, cache))


def evaluate_posthoc(preset, log_dir, record, flags, heldout, evaluators, cache, rec_path):
    """
    Every arm at its best EMA: at the final step, the EMA of each std of `posthoc_stds` is
    rebuilt from the run's power-function EMAs (run/posthoc_ema.py) and scored by the digit-FID
    of selection samples (seeded by 30,000 + step: not the reported samples); the best std's
    EMA is then evaluated at every evaluation step as the fixed EMA is, into record["posthoc"].
    One rule for every arm; the fixed-EMA results stay in record["evals"].
    """
    from ..run.posthoc_ema import reconstruct
    from .analysis import load_model_and_diffusion

    if evaluators[1] is None:
        raise ValueError("the preset's posthoc_stds need its quality_steps: the EMA is chosen by digit-FID")
    post = record.setdefault("posthoc", {"selection": {}, "evals": {}})
    final = preset["steps"]
    model, diffusion, _ = load_model_and_diffusion(log_dir, flags, device=preset["device"])
    quality = evaluators[1]
    for std in preset["posthoc_stds"]:
        if f"{std:g}" not in post["selection"]:
            model.load_state_dict(reconstruct(log_dir, std, final, log=lambda *a: None)[0])
            samples = quality.sample(model, seed=30_000 + final)
            post["selection"][f"{std:g}"] = digit_quality(samples, preset, cache)["digit_fid"]
            write_json(rec_path, record)
    post["std"] = float(min(post["selection"], key=post["selection"].get))
    for step in preset["eval_steps"]:
        e = post["evals"].setdefault(str(step), {})
        if _missing(preset, e, step):
            model.load_state_dict(reconstruct(log_dir, post["std"], step, log=lambda *a: None)[0])
            _fill_metrics(preset, e, step, model, diffusion, heldout, evaluators, cache)
            write_json(rec_path, record)


def _digit_score():
    """scripts/digit_score.py, the digit classifier the quality metrics use."""
    if os.path.join(ROOT, "scripts") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import digit_score

    return digit_score


def digit_quality(images, preset, cache, threshold=0.9):
    """The share of `images` the digit classifier recognises (top class a digit with
    probability >= threshold) and the Frechet distance of their classifier features to the
    training digits' (digit-FID)."""
    import torch

    from ..evaluation.fid import compute_statistics, frechet_distance

    if "digits" not in cache:
        digit_score = _digit_score()
        net = digit_score.load_or_train(os.path.join(ROOT, preset["data"]), log=lambda *a: None)[0]
        captured = []
        net.fc1.register_forward_hook(lambda module, inputs, output: captured.append(torch.relu(output)))

        def features(x):
            captured.clear()
            classes, probs = digit_score.classify(net, x)
            return classes, probs, torch.cat(captured).double().numpy()

        train = np.load(cache["train_path"])["arr_0"]
        cache["digits"] = (features, compute_statistics(features(train)[2]), digit_score.NOT_A_DIGIT)
    features, (mu_ref, sigma_ref), not_a_digit = cache["digits"]
    classes, probs, feats = features(np.asarray(images))
    mu, sigma = compute_statistics(feats)
    recognised = (classes != not_a_digit) & (probs >= threshold)
    return {"digit_fid": float(frechet_distance(mu, sigma, mu_ref, sigma_ref)),
            "recognisable": float(recognised.mean())}


# --------------------------------------------------------------------------- summary


def summarize(preset, records, level=0.95):
    """Per variant, step and metric: mean and t-interval over seeds; steps to target."""
    by_variant = {}
    order = {v: i for i, v in enumerate(MAIN_VARIANTS)}
    for rec in sorted(records, key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["seed"])):
        by_variant.setdefault(rec["variant"], []).append(rec)
    out = {"level": level, "steps": preset["steps"], "eval_steps": list(preset["eval_steps"]),
           "fid_steps": list(preset["fid_steps"]), "variants": {}}
    for variant, recs in by_variant.items():
        v = {"seeds": sorted(r["seed"] for r in recs), "metrics": {}}
        for metric in METRICS:
            per_step = {}
            for step in preset["eval_steps"]:
                vals = [r["evals"].get(str(step), {}).get(metric) for r in recs]
                if any(x is not None for x in vals):
                    per_step[str(step)] = mean_interval(vals, level)
            if per_step:
                v["metrics"][metric] = per_step
        out["variants"][variant] = v
    base = by_variant.get("baseline")
    if base:
        final = str(preset["steps"])
        # Paired by seed (a seed fixes the initial weights and the data order of every variant):
        # variant - baseline at the final step, mean and t-interval over the common seeds.
        base_final = {r["seed"]: r["evals"].get(final, {}) for r in base}
        for variant, recs in by_variant.items():
            for metric in METRICS:
                diffs = [r["evals"].get(final, {}).get(metric) - base_final[r["seed"]][metric]
                         for r in recs if r["seed"] in base_final
                         and r["evals"].get(final, {}).get(metric) is not None
                         and base_final[r["seed"]].get(metric) is not None]
                if diffs:
                    out["variants"][variant].setdefault("final_minus_baseline", {})[metric] = mean_interval(diffs, level)
        # Steps to reach the baseline's mean at its final step, and at the evaluation before it
        # (which faster variants can reach within the run): per-seed interpolation, t-interval.
        targets = [("steps_to_baseline_final", preset["steps"])]
        if len(preset["eval_steps"]) > 1:
            targets.append(("steps_to_baseline_previous", preset["eval_steps"][-2]))
        for key, target_step in targets:
            for metric in TARGET_METRICS:
                target = out["variants"]["baseline"]["metrics"].get(metric, {}).get(str(target_step), {}).get("mean")
                if target is None:
                    continue
                for variant, recs in by_variant.items():
                    per_seed = []
                    for r in recs:
                        steps = [s for s in preset["eval_steps"] if r["evals"].get(str(s), {}).get(metric) is not None]
                        vals = [r["evals"][str(s)][metric] for s in steps]
                        per_seed.append(steps_to_target(steps, vals, target))
                    reached = [s for s in per_seed if s is not None]
                    stt = mean_interval(reached, level) if len(reached) == len(per_seed) else dict(
                        mean=None, lo=None, hi=None, n=len(reached), sd=None)
                    stt.update(target=target, target_step=target_step, per_seed=per_seed, reached=len(reached),
                               of=len(per_seed))
                    if stt["mean"]:
                        stt["speedup"] = target_step / stt["mean"]
                        stt["speedup_lo"] = target_step / stt["hi"] if stt["hi"] else None
                        stt["speedup_hi"] = target_step / stt["lo"] if stt["lo"] and stt["lo"] > 0 else None
                    out["variants"][variant].setdefault(key, {})[metric] = stt
    return out


def _fmt(m, digits=4):
    if not m or m.get("mean") is None:
        return "-"
    if m.get("lo") is None:
        return f"{m['mean']:.{digits}g}"
    return f"{m['mean']:.{digits}g} [{m['lo']:.{digits}g}, {m['hi']:.{digits}g}]"


def _steps_and_speedup(stt):
    """The table cells "steps to target" and "speed-up" of one steps-to-target record."""
    if stt.get("mean") is None:
        return (f"not reached by {stt.get('of', 0) - stt.get('reached', 0)} of {stt.get('of', 0)} seeds"
                if stt else "-"), "-"
    interval = (f" [{stt['speedup_lo']:.2f}, {stt['speedup_hi']:.2f}]"
                if stt.get("speedup_lo") and stt.get("speedup_hi") else "")
    return _fmt(stt, 4), f"{stt['speedup']:.2f}" + interval


def markdown(summary, ema="the fixed EMA"):
    final = str(summary["steps"])
    prev = summary["eval_steps"][-2] if len(summary["eval_steps"]) > 1 else summary["steps"]
    lines = [f"Mean over seeds [95% t-interval]; final step {final}; P = {prev} (the baseline's "
             f"mean at step P is the target; speed-up = P / steps).", "",
             "| variant | seeds | held-out eps-MSE | minus baseline (paired) | held-out VLB (bits/dim) | FID | "
             "steps to baseline's step-P MSE | speed-up (MSE) |",
             "|---|---|---|---|---|---|---|---|"]
    quality = any("digit_fid" in v["metrics"] for v in summary["variants"].values())
    for variant, v in summary["variants"].items():
        m = v["metrics"]
        steps, sp = _steps_and_speedup(v.get("steps_to_baseline_previous", {}).get("heldout_mse", {}))
        diff = v.get("final_minus_baseline", {}).get("heldout_mse")
        lines.append(f"| {variant} | {len(v['seeds'])} | {_fmt(m.get('heldout_mse', {}).get(final))} | {_fmt(diff, 2)} | "
                     f"{_fmt(m.get('heldout_vlb_bpd', {}).get(final))} | {_fmt(m.get('fid', {}).get(final), 4)} | "
                     f"{steps} | {sp} |")
    if quality:
        lines += ["", "Sample quality from the digit classifier (scripts/digit_score.py), final step:", "",
                  "| variant | digit-FID | minus baseline (paired) | recognisable | minus baseline (paired) | "
                  "steps to baseline's step-P digit-FID | speed-up (digit-FID) |", "|---|---|---|---|---|---|---|"]
        for variant, v in summary["variants"].items():
            m, d = v["metrics"], v.get("final_minus_baseline", {})
            steps, sp = _steps_and_speedup(v.get("steps_to_baseline_previous", {}).get("digit_fid", {}))
            lines.append(f"| {variant} | {_fmt(m.get('digit_fid', {}).get(final), 3)} | {_fmt(d.get('digit_fid'), 2)} | "
                         f"{_fmt(m.get('recognisable', {}).get(final), 3)} | {_fmt(d.get('recognisable'), 2)} | "
                         f"{steps} | {sp} |")
    lines += ["", "Held-out eps-MSE per step:", "",
              "| variant | " + " | ".join(str(s) for s in summary["eval_steps"]) + " |",
              "|---|" + "---|" * len(summary["eval_steps"])]
    for variant, v in summary["variants"].items():
        m = v["metrics"].get("heldout_mse", {})
        lines.append(f"| {variant} | " + " | ".join(_fmt(m.get(str(s)), 3) for s in summary["eval_steps"]) + " |")
    if "claims" in summary:
        lines += ["", f"## The paper's claims at {ema}", "",
                  f"Verdicts by the rule of improved_diffusion/experiments/claims.py; final step {final}.", "",
                  claims.markdown(summary["claims"]).rstrip("\n")]
    if "posthoc" in summary:
        stds = {v: ", ".join(f"{s:g}" for s in x.get("std_by_seed", {}).values())
                for v, x in summary["posthoc"]["variants"].items()}
        lines += ["", "## At each run's best EMA", "",
                  "The EMA std of each run chosen post hoc (power-function EMA, run/posthoc_ema.py) by the "
                  "digit-FID of selection samples at the final step (not the samples reported here); the same "
                  "rule for every arm. Chosen stds by seed: " + "; ".join(f"{v} {s}" for v, s in stds.items()) + ".",
                  "", markdown(summary["posthoc"], "each run's best EMA").rstrip("\n")]
        if "claims" in summary and "claims" in summary["posthoc"]:
            lines += ["", "## The claims at both EMAs, side by side", "",
                      "Digit-FID differences only, paired over the seeds both variants ran.", "",
                      claims.side_by_side(summary["claims"], summary["posthoc"]["claims"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def plot(summary, path, variants=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: matplotlib is not installed; no plot")
        return None
    panels = [("heldout_mse", "held-out eps-MSE"), ("heldout_vlb_bpd", "held-out VLB (bits/dim)")]
    if any("digit_fid" in v["metrics"] for v in summary["variants"].values()):
        panels += [("digit_fid", "digit-FID (classifier features)"), ("recognisable", "recognisable samples")]
    cols = 2 if len(panels) == 4 else len(panels)
    fig, axes = plt.subplots(len(panels) // cols, cols, figsize=(6 * cols, 4.5 * len(panels) // cols), squeeze=False)
    axes = axes.ravel()
    for ax, (metric, label) in zip(axes, panels):
        shown = []
        for variant, v in summary["variants"].items():
            if variants and variant not in variants:
                continue
            m = v["metrics"].get(metric)
            if not m:
                continue
            steps = sorted(int(s) for s in m)
            mean = [m[str(s)]["mean"] for s in steps]
            shown += mean
            line, = ax.plot(steps, mean, label=variant, marker="o", ms=3)
            if all(m[str(s)]["lo"] is not None for s in steps):
                ax.fill_between(steps, [m[str(s)]["lo"] for s in steps], [m[str(s)]["hi"] for s in steps],
                                color=line.get_color(), alpha=0.15)
        if metric != "recognisable" and shown and min(shown) > 0 and max(shown) / min(shown) > 5:  # early steps flatten the rest
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: mean over seeds, 95% t-band")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def with_steps(preset, steps):
    """The preset for runs of `steps` steps: evaluations and the CLTS ramp keep their share of the run."""
    old = preset["steps"]

    def scale(values):
        return tuple(sorted({max(1, round(s * steps / old)) for s in values}))

    flags = list(preset["train_flags"])
    for i in range(len(flags) - 1):
        if flags[i] == "--clts_target_steps":
            flags[i + 1] = str(max(1, round(int(flags[i + 1]) * steps / old)))
    return dict(preset, steps=steps, eval_steps=scale(preset["eval_steps"]), fid_steps=scale(preset["fid_steps"]),
                quality_steps=scale(preset.get("quality_steps", ())), train_flags=flags)




# --------------------------------------------------------------------------- running it


def configure(args):
    """The preset of `args.preset` with the command line's overrides (scripts/study.py)."""
    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset = with_steps(preset, args.steps)
    if args.fid_steps:
        preset["fid_steps"] = () if args.fid_steps == "none" else tuple(int(s) for s in args.fid_steps.split(","))
        preset["eval_steps"] = tuple(sorted(set(preset["eval_steps"]) | set(preset["fid_steps"])))
    if args.fid_samples:
        preset["fid_samples"] = args.fid_samples
        preset["fid_batch"] = min(preset["fid_batch"], args.fid_samples)
    if args.quality_samples:
        preset["quality_samples"] = args.quality_samples
    if args.data:
        preset["data"] = args.data
    if args.holdout >= 0:
        preset["holdout"] = args.holdout
        preset["heldout_images"] = min(preset["heldout_images"], args.holdout)
    if args.extra_flags:
        preset["train_flags"] = preset["train_flags"] + shlex.split(args.extra_flags)
    return preset


def plan_of(args, preset):
    """(out, runs_dir, plan): where the summaries and runs go, and the runs (`run_plan`)."""
    out = args.out or os.path.join("docs", "study", args.preset)
    runs_dir = args.runs_dir or os.path.join("runs", "study", args.preset)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(preset["seeds"])
    sweep_seeds = [int(s) for s in args.sweep_seeds.split(",")] if args.sweep_seeds else list(preset["sweep_seeds"])
    sweeps = [s[0] for s in SWEEPS] if args.sweeps == "all" else [s for s in args.sweeps.split(",") if s]
    unknown = sorted(set(sweeps) - {s[0] for s in SWEEPS})
    if unknown:
        raise ValueError(f"--sweeps: unknown {', '.join(unknown)}; valid: all, {', '.join(s[0] for s in SWEEPS)}")
    variants = [v for v in args.variants.split(",") if v]
    missing = [v for v in variants if not os.path.exists(os.path.join(ROOT, "configs", f"{preset['experiment']}_{v}.json"))]
    if missing:
        print(f"study: no configs/{preset['experiment']}_VARIANT.json for {', '.join(missing)}: left out")
        variants = [v for v in variants if v not in missing]
    return out, runs_dir, run_plan(preset, variants, seeds, sweeps, sweep_seeds)


def run_all(preset, plan, out, runs_dir, preset_name, keep_checkpoints=False):
    """Train and evaluate every run of `plan` not done yet (its OUT/runs/*.json says)."""
    train_path, heldout = prepare_data(preset, os.path.join(runs_dir, "data"))
    cache = {"train_path": train_path, "networks": {}}
    ref = reference_stats(preset, train_path, os.path.join(runs_dir, "data"), cache["networks"]) if preset["fid_steps"] else None
    save_interval = math.gcd(*preset["eval_steps"])
    for i, (name, cfg, flags, seed) in enumerate(plan):
        rec_path = run_file(out, name, seed)
        record = load_json(rec_path)
        if run_done(record, preset):
            print(f"[{i + 1}/{len(plan)}] {name} seed {seed}: done, skipped", flush=True)
            continue
        same = same_as_base(cfg, flags, out, seed, preset)
        if same is not None:  # a sweep point at the base config's own value: the same run
            same.update(variant=name, flags=flags, same_as=f"{same['variant']}_seed{seed}")
            write_json(rec_path, same)
            print(f"[{i + 1}/{len(plan)}] {name} seed {seed}: identical to {same['same_as']}, reused", flush=True)
            continue
        record = record or {"variant": name, "seed": seed, "config": cfg, "flags": flags,
                            "steps": preset["steps"], "preset": preset_name, "evals": {}}
        log_dir = os.path.join(runs_dir, f"{name}_seed{seed}")
        os.makedirs(log_dir, exist_ok=True)
        t0 = time.time()
        final = os.path.join(log_dir, f"state{preset['steps']:06d}.pt")
        if not os.path.exists(final):
            train(preset, cfg, flags, seed, log_dir, train_path, save_interval)
        t1 = time.time()
        evaluate_run(preset, log_dir, record, heldout, ref, cache, rec_path)
        record["train_seconds"] = record.get("train_seconds", 0) + round(t1 - t0, 1)
        record["eval_seconds"] = record.get("eval_seconds", 0) + round(time.time() - t1, 1)
        write_json(rec_path, record)
        if not keep_checkpoints:
            for f in os.listdir(log_dir):
                if f.endswith(".pt"):
                    os.remove(os.path.join(log_dir, f))
        e = record["evals"][str(preset["steps"])]
        print(f"[{i + 1}/{len(plan)}] {name} seed {seed}: mse {e.get('heldout_mse'):.4f} "
              f"vlb {e.get('heldout_vlb_bpd'):.3f} fid {e.get('fid', float('nan')):.1f} "
              f"digit-fid {e.get('digit_fid', float('nan')):.2f} "
              f"recognisable {e.get('recognisable', float('nan')):.2f} "
              f"({t1 - t0:.0f} s train, {time.time() - t1:.0f} s eval)", flush=True)


def run_parallel(preset, plan, out, runs_dir, workers, worker_argv):
    """
    The runs of `plan` not done yet, `workers` at a time, each in its own process: `worker_argv`
    (scripts/study.py's own command line) with `--run_index i`, logged to
    RUNS_DIR/study_workerI.out. What the runs share is made here first, once: the data split,
    the FID reference, the digit classifier. A failed run is reported when all have ended.
    """
    train_path, _ = prepare_data(preset, os.path.join(runs_dir, "data"))
    if preset["fid_steps"]:
        reference_stats(preset, train_path, os.path.join(runs_dir, "data"), {})
    if preset.get("quality_steps"):
        _digit_score().load_or_train(os.path.join(ROOT, preset["data"]))  # trained once, cached beside the data
    todo = [i for i, (name, _, _, seed) in enumerate(plan) if not run_done(load_json(run_file(out, name, seed)), preset)]
    print(f"study: {len(plan) - len(todo)} of {len(plan)} runs done; {len(todo)} to go, {workers} at a time", flush=True)
    os.makedirs(runs_dir, exist_ok=True)
    running, failed = {}, []
    while todo or running:
        while todo and len(running) < workers:
            i = todo.pop(0)
            log = open(os.path.join(runs_dir, f"study_worker{i}.out"), "a")
            cmd = list(worker_argv) + ["--run_index", str(i)]
            running[i] = (subprocess.Popen(cmd, cwd=ROOT, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT), log)
            print(f"[{i + 1}/{len(plan)}] {plan[i][0]} seed {plan[i][3]}: started", flush=True)
        time.sleep(1.0)
        for i, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[i]
            state = "finished" if proc.returncode == 0 else f"FAILED ({proc.returncode}; see {log.name})"
            print(f"[{i + 1}/{len(plan)}] {plan[i][0]} seed {plan[i][3]}: {state}", flush=True)
            if proc.returncode != 0:
                failed.append(log.name)
    if failed:
        raise RuntimeError(f"study: {len(failed)} run(s) failed: {', '.join(failed)}")


def summary_of(preset, out, preset_name):
    """The summary (tables, best-EMA tables, claims) of the finished runs in OUT/runs."""
    records = [r for r in (load_json(os.path.join(out, "runs", f)) for f in sorted(os.listdir(os.path.join(out, "runs")))
                           if f.endswith(".json")) if r and run_done(r, preset)] if os.path.isdir(os.path.join(out, "runs")) else []
    summary = summarize(preset, records)
    summary["preset"] = preset_name
    best = [dict(r, evals=r["posthoc"]["evals"]) for r in records if "posthoc" in r]
    if best:  # the same tables at each run's best post-hoc EMA, and the stds chosen
        summary["posthoc"] = summarize(preset, best)
        for r in best:
            summary["posthoc"]["variants"][r["variant"]].setdefault("std_by_seed", {})[str(r["seed"])] = r["posthoc"]["std"]
    if claims.PRIMARY in summary["variants"].get("baseline", {}).get("metrics", {}):  # the claims, at both EMAs
        summary["claims"] = claims.judge(records, summary)
        if best:
            summary["posthoc"]["claims"] = claims.judge(best, summary["posthoc"])
    return summary


def write_summary(preset, out, preset_name):
    """OUT/summary.json, summary.md and the figures, from the finished runs in OUT/runs."""
    summary = summary_of(preset, out, preset_name)
    write_json(os.path.join(out, "summary.json"), summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(summary))
    # Two figures, so that the bands stay readable: the paper's modules, and the rivals beside the baseline.
    plot(summary, os.path.join(out, "curves.png"), variants=set(PAPER_VARIANTS) & set(summary["variants"]) or None)
    rivals = (set(MAIN_VARIANTS) - set(PAPER_VARIANTS)) & set(summary["variants"])
    if rivals:
        plot(summary, os.path.join(out, "rivals.png"), variants=rivals | {"baseline"})
    if "posthoc" in summary:
        plot(summary["posthoc"], os.path.join(out, "curves_posthoc.png"))
    swept = [v for v in summary["variants"] if "=" in v]
    if swept:
        plot(summary, os.path.join(out, "sweeps.png"), variants=set(swept) | {"baseline"})
    runs = sum(len(v["seeds"]) for v in summary["variants"].values())
    print(f"study: {runs} runs summarised in {out}/summary.json, summary.md and figures")
    return summary


assert set(PRESETS) == set(config.TOOLS["study"]["preset"].choices), \
    "--preset's choices (config.TOOL_OPTIONS) list PRESETS"
