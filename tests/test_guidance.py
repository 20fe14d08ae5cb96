"""
Classifier guidance through every sampler, against float64 re-computations of
guided-diffusion's condition_mean (DDPM) and condition_score (DDIM); classifier-free guidance
(the null label, its dropout, the guided eps); and the sampling scripts end to end.
"""

import json
import math

import numpy as np
import pytest
import torch

from improved_diffusion import script_util as su
from improved_diffusion.respace import space_timesteps
from improved_diffusion.unet import ClassifierFreeGuidance

from tiny import TINY_MODEL, flags, make_npz, run_script

T = 100


# ---------------------------------------------------------------------------------------
# float64 reference of the process and the guided steps


def cosine_alphas_cumprod(steps):
    """Nichol and Dhariwal's cosine schedule (betas capped at 0.999), then the products."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])
    return np.cumprod(1.0 - betas)


def process(respacing):
    """(alphas_cumprod of the sampled steps, base timesteps of each) for a respacing."""
    base = cosine_alphas_cumprod(T)
    kept = sorted(space_timesteps(T, respacing or [T]))
    return base[kept], np.array(kept)


def toy_model(x, ts, learn_sigma):
    """A deterministic 'denoiser' of (x, timesteps seen), the same in any dtype."""
    s = ts.to(x.dtype)[:, None, None, None] / 1000.0
    eps = torch.tanh(0.7 * x) * (0.5 + s) + 0.1 * torch.sin(3 * x)
    if not learn_sigma:
        return eps
    return torch.cat([eps, torch.tanh(x * (1 - s))], dim=1)  # variance values in [-1, 1]


CENTRES = torch.tensor([-0.5, 0.2, 0.6])


def toy_grad(x, ts, y, scale):
    """'grad log p(y | x_t)' of a Gaussian class model, depending on the timestep seen."""
    mu = CENTRES.to(x.dtype)[y][:, None, None, None]
    return -(x - mu) * (1 + ts.to(x.dtype)[:, None, None, None] / 1000.0) * scale


def ref_step(x, i, y, noise, *, respacing, learn_sigma, rescale, ddim, eta, scale):
    """One guided step from sampled index i in float64: the original's formulas."""
    ab_all, base_t = process(respacing)
    ab = ab_all[i]
    ab_prev = ab_all[i - 1] if i > 0 else 1.0
    beta = 1 - ab / ab_prev
    seen = float(base_t[i]) * (1000.0 / T if rescale else 1.0)
    ts = torch.full((x.shape[0],), seen, dtype=torch.float64)
    out = toy_model(x, ts, learn_sigma)
    eps = out[:, :3]
    x0 = (math.sqrt(1 / ab) * x - math.sqrt(1 / ab - 1) * eps).clamp(-1, 1)
    grad = toy_grad(x, ts, y, scale)
    if ddim:
        eps = (math.sqrt(1 / ab) * x - x0) / math.sqrt(1 / ab - 1)
        eps = eps - math.sqrt(1 - ab) * grad
        x0 = math.sqrt(1 / ab) * x - math.sqrt(1 / ab - 1) * eps
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        mean = x0 * math.sqrt(ab_prev) + math.sqrt(1 - ab_prev - sigma**2) * eps
        return mean + (sigma * noise if i > 0 else 0), x0
    # DDPM: posterior mean of the clipped x0, shifted by variance * grad.
    coef1 = beta * math.sqrt(ab_prev) / (1 - ab)
    coef2 = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
    mean = coef1 * x0 + coef2 * x
    post_var = lambda j: (1 - ab_all[j] / (ab_all[j - 1] if j else 1.0)) * (  # noqa: E731
        (1 - (ab_all[j - 1] if j else 1.0)) / (1 - ab_all[j]))
    if learn_sigma:
        min_log = math.log(post_var(i) if i > 0 else post_var(1))
        max_log = math.log(beta)
        frac = (out[:, 3:] + 1) / 2
        variance = torch.exp(frac * max_log + (1 - frac) * min_log)
    else:  # FIXED_LARGE: beta, with the posterior variance at the last step
        variance = torch.full_like(x, post_var(1) if i == 0 else beta)
    mean = mean + variance * grad
    return mean + (torch.sqrt(variance) * noise if i > 0 else 0), x0


def make(respacing, learn_sigma, rescale):
    return su.create_gaussian_diffusion(
        steps=T, noise_schedule="cosine", learn_sigma=learn_sigma, rescale_timesteps=rescale,
        timestep_respacing=respacing,
    )


CASES = [
    # (respacing, learn_sigma, rescale_timesteps)
    ("", False, False),
    ("", True, True),
    ("10", True, False),
    ("ddim10", False, True),
    ("7,3", True, True),
]


@pytest.mark.parametrize("respacing, learn_sigma, rescale", CASES)
@pytest.mark.parametrize("ddim, eta", [(False, 0.0), (True, 0.0), (True, 0.6)])
def test_guided_step_matches_float64(respacing, learn_sigma, rescale, ddim, eta):
    diffusion = make(respacing, learn_sigma, rescale)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x)
    y = torch.tensor([0, 1, 2])
    seen = []

    def model(x_, ts, y=None):
        return toy_model(x_, ts, learn_sigma)

    def cond_fn(x_, ts, y=None):
        seen.append(ts)
        return toy_grad(x_, ts, y, scale=0.8)

    for i in (diffusion.num_timesteps - 1, diffusion.num_timesteps // 2, 1, 0):
        t = torch.full((3,), i, dtype=torch.long)
        kwargs = dict(model_kwargs={"y": y}, cond_fn=cond_fn, randn_like=lambda _: noise.float())
        if ddim:
            got = diffusion.ddim_sample(model, x.float(), t, eta=eta, **kwargs)
        else:
            got = diffusion.p_sample(model, x.float(), t, **kwargs)
        want, want_x0 = ref_step(x, i, y, noise, respacing=respacing, learn_sigma=learn_sigma,
                                 rescale=rescale, ddim=ddim, eta=eta, scale=0.8)
        torch.testing.assert_close(got["sample"].double(), want, rtol=1e-5, atol=1e-5)
        if ddim:  # condition_score changes the x_0 prediction too
            torch.testing.assert_close(got["pred_xstart"].double(), want_x0, rtol=1e-5, atol=1e-5)
        # cond_fn sees the timesteps the model sees: base timesteps, scaled when asked.
        _, base_t = process(respacing)
        expected_ts = float(base_t[i]) * (1000.0 / T if rescale else 1.0)
        assert torch.allclose(seen[-1].double(), torch.full((3,), expected_ts, dtype=torch.float64))


def test_condition_functions_match_the_formulas():
    """condition_mean: mean + variance * grad; condition_score: eps - sqrt(1 - abar) * grad."""
    diffusion = make("", True, False)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([40, 7])
    out = diffusion.p_mean_variance(lambda x_, ts, **k: toy_model(x_, ts, True), x, t)
    grad = torch.randn_like(x)
    cond_fn = lambda x_, ts, **k: grad  # noqa: E731
    torch.testing.assert_close(diffusion.condition_mean(cond_fn, out, x, t),
                               out["mean"] + out["variance"] * grad)
    ab = torch.from_numpy(cosine_alphas_cumprod(T)[t.numpy()]).float()[:, None, None, None]
    eps = (x / ab.sqrt() - out["pred_xstart"]) / (1 / ab - 1).sqrt()
    new = diffusion.condition_score(cond_fn, out, x, t)
    want_x0 = x / ab.sqrt() - (1 / ab - 1).sqrt() * (eps - (1 - ab).sqrt() * grad)
    torch.testing.assert_close(new["pred_xstart"], want_x0, rtol=1e-5, atol=1e-5)
    assert new["variance"] is out["variance"] and out["pred_xstart"] is not new["pred_xstart"]


@pytest.mark.parametrize("ddim", [False, True])
def test_guided_loops_match_float64(ddim):
    respacing = "ddim10" if ddim else "10"
    diffusion = make(respacing, True, True)
    torch.manual_seed(2)
    x_t = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    noises = [torch.randn_like(x_t) for _ in range(diffusion.num_timesteps)]
    y = torch.tensor([2, 0, 1])
    draws = iter(noises)
    loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop
    extra = {"eta": 0.0} if ddim else {"randn_like": lambda _: next(draws).float()}
    got = loop(lambda x_, ts, y=None: toy_model(x_, ts, True), (3, 3, 4, 4), noise=x_t.float(),
               model_kwargs={"y": y}, cond_fn=lambda x_, ts, y=None: toy_grad(x_, ts, y, 0.5), **extra)
    x = x_t
    for k, i in enumerate(reversed(range(diffusion.num_timesteps))):
        x, _ = ref_step(x, i, y, noises[k], respacing=respacing, learn_sigma=True, rescale=True,
                        ddim=ddim, eta=0.0, scale=0.5)
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


def test_classifier_gradient_through_the_sampling_loop():
    """A real classifier's cond_fn works inside the loops' no_grad and pulls towards its class."""
    classifier = su.create_classifier(
        image_size=8, classifier_use_fp16=False, classifier_width=32, classifier_depth=1,
        classifier_attention_resolutions="4", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="attention", classifier_channel_mult="1,2",
        classifier_num_head_channels=16, classifier_num_classes=3,
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for p in classifier.parameters():
            p.copy_(torch.randn_like(p) * 0.1)

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logp = torch.log_softmax(classifier(x_in, t), dim=-1)[torch.arange(len(y)), y]
            return torch.autograd.grad(logp.sum(), x_in)[0] * 5.0

    diffusion = make("ddim5", False, True)
    noise = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    model = lambda x, ts, y=None: torch.zeros_like(x)  # noqa: E731
    plain = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs={"y": y})
    guided = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs={"y": y}, cond_fn=cond_fn)
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)
    with torch.no_grad():
        t0 = torch.zeros(4, dtype=torch.long)
        p_plain = torch.softmax(classifier(plain, t0), -1)[torch.arange(4), y]
        p_guided = torch.softmax(classifier(guided, t0), -1)[torch.arange(4), y]
    assert (p_guided > p_plain).all()


# ---------------------------------------------------------------------------------------
# Classifier-free guidance: the null label


def cfg_model(p, learn_sigma=True):
    torch.manual_seed(0)
    model = su.create_model(8, 32, 1, channel_mult="1,2", attention_resolutions="4", num_heads=2,
                            class_cond=True, learn_sigma=learn_sigma, num_classes=5, class_dropout_prob=p)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05)
    return model


def test_null_row_only_with_dropout():
    plain, cfg = cfg_model(0.0), cfg_model(0.2)
    a, b = plain.state_dict(), cfg.state_dict()
    assert a.keys() == b.keys()
    assert plain.label_emb.weight.shape == (5, 128) and plain.null_label is None
    assert cfg.label_emb.weight.shape == (6, 128) and cfg.null_label == 5
    assert all(a[k].shape == b[k].shape for k in a if k != "label_emb.weight")
    with pytest.raises(ValueError, match="class-conditional"):
        su.create_model(8, 32, 1, channel_mult="1,2", attention_resolutions="4", class_dropout_prob=0.1)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        cfg_model(1.0)
    # The original key set of the defaults is kept; the factory takes the option.
    assert "class_dropout_prob" not in su.model_and_diffusion_defaults()
    model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), "image_size": 8,
                                                "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                                                "attention_resolutions": "4", "class_cond": True},
                                             class_dropout_prob=0.1)
    assert model.label_emb.weight.shape[0] == su.NUM_CLASSES + 1


def test_labels_drop_only_in_training_mode():
    model = cfg_model(0.5)
    x = torch.randn(64, 3, 8, 8)
    t = torch.full((64,), 10)
    y = torch.arange(64) % 5
    with torch.no_grad():
        model.eval()
        with_labels = model(x, t, y=y)
        with_null = model(x, t, y=torch.full_like(y, 5))
        assert torch.equal(model(x, t, y=y), with_labels)  # eval: never dropped
        model.train()
        torch.manual_seed(7)
        mixed = model(x, t, y=y)
    is_label = (mixed - with_labels).flatten(1).abs().amax(1) < 1e-5
    is_null = (mixed - with_null).flatten(1).abs().amax(1) < 1e-5
    assert (is_label | is_null).all()
    assert 10 < is_null.sum() < 54  # about half of 64


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_cfg_wrapper_is_the_guided_eps(learn_sigma):
    model = cfg_model(0.1, learn_sigma).eval()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([0, 3, 4])
    w = 2.5
    with torch.no_grad():
        cond = model(x, t, y=y)
        uncond = model(x, t, y=torch.full_like(y, model.null_label))
        got = ClassifierFreeGuidance(model, w)(x, t, y=y)
    torch.testing.assert_close(got[:, :3], (1 + w) * cond[:, :3] - w * uncond[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 3:], cond[:, 3:])
    with pytest.raises(ValueError, match="class_dropout_prob"):
        ClassifierFreeGuidance(cfg_model(0.0), 1.0)


# ---------------------------------------------------------------------------------------
# Scripts: image_train.py --class_dropout_prob, image_sample.py --guidance_scale,
# classifier_train.py + classifier_sample.py


CLASSES = 3
TRAIN = [*flags(TINY_MODEL), "--class_cond", "True", "--batch_size", "4", "--lr", "1e-3",
         "--total_steps", "2", "--save_interval", "2", "--log_interval", "1", "--ema_rate", "0.9"]
CLASSIFIER = ["--image_size", "8", "--classifier_width", "32", "--classifier_depth", "1",
              "--classifier_attention_resolutions", "4", "--classifier_channel_mult", "1,2",
              "--classifier_num_head_channels", "16", "--classifier_num_classes", str(CLASSES),
              "--diffusion_steps", "40", "--noise_schedule", "cosine", "--batch_size", "4",
              "--iterations", "2", "--save_interval", "2", "--log_interval", "1"]
SAMPLE = ["--num_samples", "6", "--batch_size", "3", "--timestep_respacing", "ddim4", "--use_ddim", "True",
          "--grid", "none"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A class-conditional model with a null label and a noisy classifier, on tiny data."""
    root = tmp_path_factory.mktemp("guidance")
    data = make_npz(root / "data.npz", n=24, classes=CLASSES)
    run_script("image_train.py", [*TRAIN, "--class_dropout_prob", "0.3", "--data_dir", data,
                                  "--log_dir", root / "model"])
    run_script("classifier_train.py", [*CLASSIFIER, "--data_dir", data, "--log_dir", root / "classifier"])
    return root, data


def test_class_dropout_prob_reaches_config_json_and_sampling(runs):
    root, _ = runs
    saved = json.loads((root / "model" / "config.json").read_text())
    assert saved["class_dropout_prob"] == 0.3
    state = torch.load(root / "model" / "model000002.pt", weights_only=True)
    assert state["label_emb.weight"].shape[0] == su.NUM_CLASSES + 1
    out = {}
    for w in ("0", "3"):
        proc = run_script("image_sample.py", ["--model_path", root / "model" / "ema_0.9_000002.pt", *SAMPLE,
                                              "--guidance_scale", w, "--out", root / f"cfg{w}.npz"])
        out[w] = np.load(root / f"cfg{w}.npz")
        assert out[w]["arr_0"].shape == (6, 8, 8, 3)
        assert set(out[w]["arr_1"]) <= set(range(CLASSES))
    assert "classifier-free guidance with scale 3.0" in proc.stdout
    assert np.array_equal(out["0"]["arr_1"], out["3"]["arr_1"])  # same seeds, same labels
    assert not np.array_equal(out["0"]["arr_0"], out["3"]["arr_0"])


def test_guidance_scale_needs_a_null_label(runs, tmp_path):
    root, data = runs
    run_script("image_train.py", [*TRAIN, "--total_steps", "1", "--data_dir", data, "--log_dir", tmp_path / "plain"])
    proc = run_script("image_sample.py", ["--model_path", tmp_path / "plain" / "model000001.pt", *SAMPLE,
                                          "--guidance_scale", "2", "--out", tmp_path / "x.npz"], check=False)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: classifier-free guidance needs a class-conditional model trained with --class_dropout_prob > 0 "
        "(its label embedding has no null-label row)"]


def test_classifier_sample_end_to_end(runs):
    root, _ = runs
    model = root / "model" / "ema_0.9_000002.pt"
    classifier = root / "classifier" / "model000002.pt"
    results = {}
    for scale, batch in (("0", "3"), ("10", "3"), ("10", "2")):
        out = root / f"cls{scale}_{batch}.npz"
        proc = run_script("classifier_sample.py", ["--model_path", model, "--classifier_path", classifier,
                                                   "--classifier_scale", scale, *SAMPLE, "--batch_size", batch,
                                                   "--out", out])
        results[scale, batch] = np.load(out)
    assert "classifier scale 10.0" in proc.stdout
    a, b = results["10", "3"], results["10", "2"]
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])  # batch size free
    assert not np.array_equal(results["0", "3"]["arr_0"], a["arr_0"])
    # DDPM steps (condition_mean) too.
    run_script("classifier_sample.py", ["--model_path", model, "--classifier_path", classifier,
                                        "--num_samples", "2", "--batch_size", "2", "--timestep_respacing", "4",
                                        "--grid", "none", "--out", root / "ddpm.npz"])
    assert np.load(root / "ddpm.npz")["arr_0"].shape == (2, 8, 8, 3)


def _one_error(proc, fragment):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_classifier_sample_rejects_bad_input(runs, tmp_path):
    root, data = runs
    model = root / "model" / "ema_0.9_000002.pt"
    classifier = root / "classifier" / "model000002.pt"
    base = ["--model_path", model, *SAMPLE, "--out", tmp_path / "x.npz"]
    _one_error(run_script("classifier_sample.py", base, check=False), "--classifier_path")
    _one_error(run_script("classifier_sample.py", [*base, "--classifier_path", tmp_path / "nope.pt"], check=False),
               "classifier checkpoint not found")
    _one_error(run_script("classifier_sample.py", [*base, "--classifier_path", classifier, "--num_classes", "2"],
                          check=False), "class count mismatch")
    # A classifier trained at another size.
    big = make_npz(tmp_path / "big.npz", n=8, size=16, classes=CLASSES)
    flags16 = [{"8": "16", "4": "8"}.get(f, f) for f in CLASSIFIER]
    run_script("classifier_train.py", [*flags16, "--iterations", "1", "--data_dir", big, "--log_dir", tmp_path / "c16"])
    _one_error(run_script("classifier_sample.py", [*base, "--classifier_path", tmp_path / "c16" / "model000001.pt"],
                          check=False), "wrong sizes")
    # A classifier on another diffusion.
    other = [f if f != "40" else "30" for f in CLASSIFIER]
    run_script("classifier_train.py", [*other, "--iterations", "1", "--data_dir", data, "--log_dir", tmp_path / "c30"])
    _one_error(run_script("classifier_sample.py", [*base, "--classifier_path", tmp_path / "c30" / "model000001.pt"],
                          check=False), "--diffusion_steps 30")
