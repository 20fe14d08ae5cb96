"""
The noise-aware classifier (guided-diffusion's EncoderUNetModel) and scripts/classifier_train.py.

The expected key names, shapes and parameter counts are written out here from the structure
of guided-diffusion's `EncoderUNetModel` / `create_classifier`, and its logits are checked
against a functional re-computation (plain torch ops on the state dict, in the original's
operation order and q/k/v layouts).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from improved_diffusion import script_util as su
from improved_diffusion.unet import EncoderUNetModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")

# guided-diffusion's README flags of its 64x64 ImageNet classifier.
GUIDED_64_FLAGS = dict(
    image_size=64,
    classifier_attention_resolutions="32,16,8",
    classifier_depth=4,
    classifier_width=128,
    classifier_pool="attention",
    classifier_resblock_updown=True,
    classifier_use_scale_shift_norm=True,
)

TINY = dict(
    image_size=16,
    classifier_use_fp16=False,
    classifier_width=32,
    classifier_depth=1,
    classifier_attention_resolutions="8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
    classifier_channel_mult="1,2",
    classifier_num_head_channels=16,
    classifier_num_classes=10,
)


def tiny_classifier(**overrides):
    return su.create_classifier(**{**TINY, **overrides})


# ---------------------------------------------------------------------------------------
# Flags and factories


def test_defaults_are_guided_diffusions():
    assert su.classifier_defaults() == dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
    )
    both = su.classifier_and_diffusion_defaults()
    assert set(both) == set(su.classifier_defaults()) | {
        "learn_sigma", "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl",
        "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas",
    }
    # The diffusion values are the options table's (one source of defaults).
    for key in su.diffusion_defaults():
        assert both[key] == su.model_and_diffusion_defaults()[key]


def test_factory_builds_classifier_and_diffusion():
    classifier, diffusion = su.create_classifier_and_diffusion(
        **{**TINY, "diffusion_steps": 50, "noise_schedule": "cosine"}
    )
    assert isinstance(classifier, EncoderUNetModel)
    assert diffusion.num_timesteps == 50
    with pytest.raises(TypeError, match="not_a_flag"):
        su.create_classifier_and_diffusion(not_a_flag=1)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(classifier_pool="max"), "pool"),
        (dict(classifier_attention_resolutions="3"), "attention_resolutions"),
        (dict(classifier_num_head_channels=24), "num_head_channels"),
        (dict(classifier_channel_mult="", image_size=48), "channel_mult"),
        (dict(classifier_num_classes=0), "classifier_num_classes"),
    ],
)
def test_bad_flags_name_the_flag(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_classifier(**overrides)


# ---------------------------------------------------------------------------------------
# State-dict keys, shapes and parameter counts, derived from the original's structure


def _res_keys(prefix, cin, cout, emb, scale_shift):
    keys = {
        f"{prefix}.in_layers.0.weight": (cin,),
        f"{prefix}.in_layers.0.bias": (cin,),
        f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3),
        f"{prefix}.in_layers.2.bias": (cout,),
        f"{prefix}.emb_layers.1.weight": ((2 if scale_shift else 1) * cout, emb),
        f"{prefix}.emb_layers.1.bias": ((2 if scale_shift else 1) * cout,),
        f"{prefix}.out_layers.0.weight": (cout,),
        f"{prefix}.out_layers.0.bias": (cout,),
        f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3),
        f"{prefix}.out_layers.3.bias": (cout,),
    }
    if cin != cout:
        keys[f"{prefix}.skip_connection.weight"] = (cout, cin, 1, 1)
        keys[f"{prefix}.skip_connection.bias"] = (cout,)
    return keys


def _attn_keys(prefix, c):
    return {
        f"{prefix}.norm.weight": (c,),
        f"{prefix}.norm.bias": (c,),
        f"{prefix}.qkv.weight": (3 * c, c, 1),
        f"{prefix}.qkv.bias": (3 * c,),
        f"{prefix}.proj_out.weight": (c, c, 1),
        f"{prefix}.proj_out.bias": (c,),
    }


def test_tiny_attention_classifier_keys_and_shapes():
    """Width 32, depth 1, multipliers (1, 2), attention at 8 px, res-block downsampling."""
    expected = {
        "time_embed.0.weight": (128, 32),
        "time_embed.0.bias": (128,),
        "time_embed.2.weight": (128, 128),
        "time_embed.2.bias": (128,),
        "input_blocks.0.0.weight": (32, 3, 3, 3),
        "input_blocks.0.0.bias": (32,),
        **_res_keys("input_blocks.1.0", 32, 32, 128, True),
        **_res_keys("input_blocks.2.0", 32, 32, 128, True),  # the down-sampling res block
        **_res_keys("input_blocks.3.0", 32, 64, 128, True),
        **_attn_keys("input_blocks.3.1", 64),
        **_res_keys("middle_block.0", 64, 64, 128, True),
        **_attn_keys("middle_block.1", 64),
        **_res_keys("middle_block.2", 64, 64, 128, True),
        "out.0.weight": (64,),
        "out.0.bias": (64,),
        "out.2.positional_embedding": (64, 8 * 8 + 1),
        "out.2.qkv_proj.weight": (192, 64, 1),
        "out.2.qkv_proj.bias": (192,),
        "out.2.c_proj.weight": (10, 64, 1),
        "out.2.c_proj.bias": (10,),
    }
    state = tiny_classifier().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


@pytest.mark.parametrize(
    "pool, head",
    [
        ("adaptive", {"out.0.weight": (64,), "out.0.bias": (64,),
                      "out.3.weight": (10, 64, 1, 1), "out.3.bias": (10,)}),
        # spatial heads: the means of every input block's output and the middle block's,
        # 32 + 32 + 32 + 64 + 64 = 224 channels.
        ("spatial", {"out.0.weight": (2048, 224), "out.0.bias": (2048,),
                     "out.2.weight": (10, 2048), "out.2.bias": (10,)}),
        ("spatial_v2", {"out.0.weight": (2048, 224), "out.0.bias": (2048,),
                        "out.1.weight": (2048,), "out.1.bias": (2048,),
                        "out.3.weight": (10, 2048), "out.3.bias": (10,)}),
    ],
)
def test_other_pool_heads(pool, head):
    state = tiny_classifier(classifier_pool=pool).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items() if k.startswith("out.")} == head


def _conv(k, cin, cout):
    return k * k * cin * cout + cout


def _res_count(cin, cout, emb, scale_shift):
    n = 2 * cin + _conv(3, cin, cout) + emb * (2 if scale_shift else 1) * cout
    n += (2 if scale_shift else 1) * cout + 2 * cout + _conv(3, cout, cout)
    return n + (_conv(1, cin, cout) if cin != cout else 0)


def _attn_count(c):
    return 2 * c + _conv(1, c, 3 * c) + _conv(1, c, c)


def expected_count(size, width, depth, mult, attention_ds, out, updown, scale_shift):
    """The parameter count and state-dict entries of guided-diffusion's attention-pool
    classifier, summed block by block from its structure."""
    emb = 4 * width
    params = (width * emb + emb) + (emb * emb + emb)  # time_embed: two linears
    entries = 4
    ch = int(mult[0] * width)
    params += _conv(3, 3, ch)
    entries += 2
    ds = 1
    for level, m in enumerate(mult):
        for _ in range(depth):
            params += _res_count(ch, int(m * width), emb, scale_shift)
            entries += 10 + (2 if ch != int(m * width) else 0)
            ch = int(m * width)
            if ds in attention_ds:
                params += _attn_count(ch)
                entries += 6
        if level != len(mult) - 1:
            if updown:
                params += _res_count(ch, ch, emb, scale_shift)
                entries += 10
            else:
                params += _conv(3, ch, ch)
                entries += 2
            ds *= 2
    params += 2 * _res_count(ch, ch, emb, scale_shift) + _attn_count(ch)
    entries += 26
    spatial = size // ds
    params += 2 * ch + ch * (spatial**2 + 1) + _conv(1, ch, 3 * ch) + _conv(1, ch, out)
    entries += 7
    return params, entries


def test_guided_64px_classifier_parameter_count():
    model = su.create_classifier(**{**su.classifier_defaults(), **GUIDED_64_FLAGS})
    params, entries = expected_count(64, 128, 4, (1, 2, 3, 4), {2, 4, 8}, 1000, True, True)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == entries
    assert params == 65_438_568  # the sum above, written out
    assert model.out[2].positional_embedding.shape == (512, 8 * 8 + 1)
    assert all(b.num_heads == b.channels // 64 for b in model.modules()
               if type(b).__name__ == "AttentionBlock")


# ---------------------------------------------------------------------------------------
# Logits: the original's forward written with plain torch ops


def _t_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _gn(x, s, p):
    return F.group_norm(x.float(), 32, s[p + ".weight"], s[p + ".bias"], eps=1e-5)


def _ref_res(x, emb, s, p, down):
    h = F.silu(_gn(x, s, p + ".in_layers.0"))
    if down:
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = F.conv2d(h, s[p + ".in_layers.2.weight"], s[p + ".in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), s[p + ".emb_layers.1.weight"], s[p + ".emb_layers.1.bias"])[..., None, None]
    scale, shift = e.chunk(2, dim=1)
    h = _gn(h, s, p + ".out_layers.0") * (1 + scale) + shift
    h = F.conv2d(F.silu(h), s[p + ".out_layers.3.weight"], s[p + ".out_layers.3.bias"], padding=1)
    if p + ".skip_connection.weight" in s:
        x = F.conv2d(x, s[p + ".skip_connection.weight"], s[p + ".skip_connection.bias"])
    return x + h


def _ref_attn_block(x, s, p, head_channels):
    """guided-diffusion's AttentionBlock with QKVAttentionLegacy (heads split first)."""
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(_gn(x, s, p + ".norm"), s[p + ".qkv.weight"], s[p + ".qkv.bias"])
    heads = c // head_channels
    q, k, v = qkv.reshape(b * heads, 3 * head_channels, -1).split(head_channels, dim=1)
    scale = 1 / math.sqrt(math.sqrt(head_channels))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, x.shape[-1])
    h = F.conv1d(a, s[p + ".proj_out.weight"], s[p + ".proj_out.bias"])
    return (x + h).reshape(b, c, hh, ww)


def _ref_attention_pool(x, s, head_channels):
    """CLIP's attention pool with guided-diffusion's QKVAttention (q, k, v split first)."""
    b, c = x.shape[:2]
    x = x.reshape(b, c, -1)
    x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + s["out.2.positional_embedding"][None]
    qkv = F.conv1d(x, s["out.2.qkv_proj.weight"], s["out.2.qkv_proj.bias"])
    heads, length = c // head_channels, x.shape[-1]
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(head_channels))
    w = torch.einsum("bct,bcs->bts", (q * scale).reshape(b * heads, head_channels, length),
                     (k * scale).reshape(b * heads, head_channels, length))
    w = torch.softmax(w, dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v.reshape(b * heads, head_channels, length)).reshape(b, -1, length)
    return F.conv1d(a, s["out.2.c_proj.weight"], s["out.2.c_proj.bias"])[:, :, 0]


def reference_logits(s, x, t, pool, head_channels=16):
    """The tiny config's forward (TINY) in the original's order."""
    emb = _t_embedding(t, 32)
    emb = F.linear(F.silu(F.linear(emb, s["time_embed.0.weight"], s["time_embed.0.bias"])),
                   s["time_embed.2.weight"], s["time_embed.2.bias"])
    means = []
    h = F.conv2d(x, s["input_blocks.0.0.weight"], s["input_blocks.0.0.bias"], padding=1)
    means.append(h.mean(dim=(2, 3)))
    h = _ref_res(h, emb, s, "input_blocks.1.0", down=False)
    means.append(h.mean(dim=(2, 3)))
    h = _ref_res(h, emb, s, "input_blocks.2.0", down=True)
    means.append(h.mean(dim=(2, 3)))
    h = _ref_attn_block(_ref_res(h, emb, s, "input_blocks.3.0", down=False), s, "input_blocks.3.1", head_channels)
    means.append(h.mean(dim=(2, 3)))
    h = _ref_res(h, emb, s, "middle_block.0", down=False)
    h = _ref_attn_block(h, s, "middle_block.1", head_channels)
    h = _ref_res(h, emb, s, "middle_block.2", down=False)
    means.append(h.mean(dim=(2, 3)))
    if pool == "attention":
        return _ref_attention_pool(F.silu(_gn(h, s, "out.0")), s, head_channels)
    if pool == "adaptive":
        h = F.silu(_gn(h, s, "out.0")).mean(dim=(2, 3), keepdim=True)
        return F.conv2d(h, s["out.3.weight"], s["out.3.bias"]).flatten(1)
    feats = torch.cat(means, dim=-1)
    if pool == "spatial":
        return F.linear(F.relu(F.linear(feats, s["out.0.weight"], s["out.0.bias"])),
                        s["out.2.weight"], s["out.2.bias"])
    h = F.linear(feats, s["out.0.weight"], s["out.0.bias"])
    h = F.silu(F.group_norm(h, 32, s["out.1.weight"], s["out.1.bias"], eps=1e-5))
    return F.linear(h, s["out.3.weight"], s["out.3.bias"])


@pytest.mark.parametrize("pool", ["attention", "adaptive", "spatial", "spatial_v2"])
def test_logits_match_the_originals_forward(pool):
    torch.manual_seed(0)
    model = tiny_classifier(classifier_pool=pool).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layers: every path counts
            p.copy_(torch.randn_like(p) * 0.2)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 321, 999])
    with torch.no_grad():
        got = model(x, t)
        want = reference_logits(model.state_dict(), x, t, pool)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_strict():
    a, b = tiny_classifier(), tiny_classifier()
    b.load_state_dict(a.state_dict(), strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    with torch.no_grad():
        torch.testing.assert_close(a(x, t), b(x, t))


def test_attention_pool_rejects_another_size():
    with pytest.raises(ValueError, match="image size"):
        tiny_classifier()(torch.randn(1, 3, 32, 32), torch.tensor([1]))


# ---------------------------------------------------------------------------------------
# scripts/classifier_train.py


def write_digits(path, n=48, size=16, classes=4, seed=0):
    """Tiny labelled data: class k is a bright square in quadrant k on noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % classes
    half = size // 2
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        images[i, r * half:(r + 1) * half, c * half:(c + 1) * half] = 220
    np.savez(path, images, labels)
    return path


CLASSIFIER_FLAGS = [
    "--image_size", "16", "--classifier_width", "32", "--classifier_depth", "1",
    "--classifier_attention_resolutions", "8", "--classifier_channel_mult", "1,2",
    "--classifier_num_head_channels", "16", "--classifier_num_classes", "4",
    "--diffusion_steps", "50", "--noise_schedule", "cosine",
    "--batch_size", "8", "--lr", "1e-3", "--log_interval", "2", "--eval_interval", "2",
]


def run_script(name, args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **(env or {})}
    env.pop("IMPROVED_DIFFUSION_DEBUG", None)
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_classifier_train_runs_and_resumes_exactly(tmp_path):
    data = write_digits(tmp_path / "train.npz")
    val = write_digits(tmp_path / "val.npz", n=16, seed=1)
    common = [*CLASSIFIER_FLAGS, "--data_dir", data, "--val_data_dir", val, "--microbatch", "3",
              "--anneal_lr", "True", "--iterations", "4"]
    full = run_script("classifier_train.py", [*common, "--log_dir", tmp_path / "full", "--save_interval", "2"])
    assert full.returncode == 0, full.stderr
    files = sorted(os.listdir(tmp_path / "full"))
    assert {"model000002.pt", "opt000002.pt", "model000004.pt", "config.json"} <= set(files)
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["classifier_width"] == 32 and saved["data_num_classes"] == 4
    rows = [json.loads(line) for line in (tmp_path / "full" / "progress.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and any("train_acc@1" in r for r in rows)

    # Two steps, stop, then the same command continues to four: the same weights, bit for bit.
    half = run_script("classifier_train.py", [*common, "--stop_at", "2", "--log_dir", tmp_path / "half",
                                              "--save_interval", "2"])
    assert half.returncode == 0, half.stderr
    resumed = run_script("classifier_train.py", [*common, "--log_dir", tmp_path / "half", "--save_interval", "2"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 2" in resumed.stdout
    a = torch.load(tmp_path / "full" / "model000004.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "model000004.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The weights load into the factory's classifier with strict=True.
    model = su.create_classifier(**{k: saved[k] for k in (*su.classifier_defaults(), *su.CLASSIFIER_EXTRA_DEFAULTS)})
    model.load_state_dict(a, strict=True)


def test_microbatch_does_not_change_the_update(tmp_path):
    data = write_digits(tmp_path / "train.npz")
    outs = []
    for micro in ("-1", "3"):
        d = tmp_path / f"m{micro}"
        proc = run_script("classifier_train.py", [*CLASSIFIER_FLAGS, "--data_dir", data, "--iterations", "1",
                                                  "--microbatch", micro, "--log_dir", d])
        assert proc.returncode == 0, proc.stderr
        outs.append(torch.load(d / "model000001.pt", weights_only=True))
    # One Adam step moves each weight by about lr * g / |g|: where a gradient is at rounding
    # level, the summation order of the microbatches can change that step, nowhere else.
    diff = torch.cat([(outs[0][k] - outs[1][k]).abs().flatten() for k in outs[0]])
    assert (diff > 1e-6).float().mean() < 1e-3 and diff.max() < 0.5e-3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classifier_num_classes", "3"], "class"),
        (["--data_dir", "missing.npz"], "missing.npz"),
        (["--classifier_pool", "max"], "pool"),
        (["--iterations", "0"], "--iterations"),
    ],
)
def test_classifier_train_bad_input_is_one_error_line(tmp_path, extra, message):
    data = write_digits(tmp_path / "train.npz")
    proc = run_script("classifier_train.py", [*CLASSIFIER_FLAGS, "--data_dir", data, "--iterations", "1",
                                              "--log_dir", tmp_path / "run", *extra])
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
