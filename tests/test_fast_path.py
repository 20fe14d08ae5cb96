"""
The fast path (SPEC section 6) computes what the plain fp32 path computes.

Each part is checked on the CPU against fp32 eager on a tiny UNet, through the real
`TrainLoop.run_step`: bf16 and fp16 autocast (within their precision), channels-last
(same numbers), fused / foreach / single-tensor AdamW (same numbers after a few steps with
the paper's beta1 and lr schedules moving), `torch.compile` (aot_eager always; inductor
only when asked, it takes minutes on 2 cores), bf16 sampling, the FLOP counter (it counts
the attention), and `scripts/benchmark.py` itself. No test here times anything: speed is
measured by the benchmark script (docs/benchmarks.md).

The training step reads no value back to the host (no `.item()`, `bool(tensor)` or
`float(tensor)`): counted with a dispatch mode, which also sees the one read a non-fused
optimizer needs, so the count can fail. On a GPU, `tests/test_fast_path.py::test_cuda_step_has_no_host_sync`
checks the same with CUDA's own sync detector (device copies included).
"""

import copy
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from improved_diffusion.image_datasets import BatchStream, ImageDataset
from improved_diffusion.logger import Logger
from improved_diffusion.methods.clts import CLTSSampler
from improved_diffusion.methods.momentum import MomentumSchedule
from improved_diffusion.evaluation.sampling import sample_images
from improved_diffusion.script_util import (
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from improved_diffusion.train_util import TrainConfig, TrainLoop
from tiny import PYTHON, ROOT, TINY_MODEL, env

BATCH = 4
# The comparisons run on the CPU here; on a GPU machine run them there with
#   IDIFF_TEST_DEVICE=cuda python -m pytest tests/test_fast_path.py
# (TF32 is switched off, so fp32 is fp32 on both sides of each comparison).
DEVICE = torch.device(os.environ.get("IDIFF_TEST_DEVICE", "cpu"))

# Tolerances of the comparisons between two kernels that compute the same float32 function
# in another order (no test here compares them bitwise: which kernel runs, and how it rounds,
# depends on the CPU: ATEN_CPU_CAPABILITY, oneDNN's and MKL's own dispatch).
# - Gradients (channels-last, compiled): a conv gradient is a float32 sum of up to 576
#   products (3x3 x 64 channels); summed in another order it moves by a few roundoffs of its
#   largest terms. Measured: at most 2e-7 absolute, 1e-6 of the largest gradient (0.2), under
#   ATEN_CPU_CAPABILITY=default and avx512. GRAD_ATOL = 1e-5 leaves 50x; GRAD_RTOL = 1e-4
#   covers large entries.
# - AdamW (fused / foreach / single): Adam moves every entry by about lr per step, and its
#   m / sqrt(v) turns a rounding difference of a small gradient into a visible one (up to
#   1.3e-6 after 3 steps on an AVX-512 Xeon, 5e-6 on an H200). ADAM_ATOL = 1e-2 * lr, 1% of
#   one step: test_adamw_implementations_agree_with_moving_beta1_and_lr also checks that a
#   5% change of lr, a small change of behaviour, fails it.
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5
LR = 1e-3
ADAM_ATOL = 1e-2 * LR


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads that wait on
    each other are several times slower than one. On CUDA: no TF32 in fp32 references."""
    before = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_num_threads(before[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1:]


def tiny_options(**overrides):
    opts = model_and_diffusion_defaults()
    opts.update(TINY_MODEL)
    opts["dropout"] = 0.0  # deterministic steps, so two loops can be compared
    opts.update(overrides)
    return opts


def trained_like_model(opts, seed=0):
    """The tiny model with every weight moved off its initial value.

    At initialisation the zero-initialised output convolutions block the gradient of
    everything before them; perturbed weights make every gradient non-trivial.
    """
    torch.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**opts)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(DEVICE), diffusion


def make_loop(model, diffusion, methods=True, data_on_device=False, **config):
    images = np.random.default_rng(0).integers(0, 256, size=(4 * BATCH, 8, 8, 3), dtype=np.uint8)
    device = next(model.parameters()).device if data_on_device else None
    data = BatchStream(ImageDataset(images), BATCH, seed=0, device=device)
    momentum = MomentumSchedule(momentum_decay=True, lr_compensation=True, total_steps=10) if methods else MomentumSchedule()
    sampler = CLTSSampler(diffusion, mu=0.3, sigma=0.2, target_steps=5) if methods else None
    defaults = dict(batch_size=BATCH, lr=LR, log_interval=10**6, save_interval=10**6, momentum=momentum, progress=False)
    defaults.update(config)
    return TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        config=TrainConfig(**defaults),
        schedule_sampler=sampler,
        log_dir=None,
        resume="none",
        logger=Logger(None, stdout=False, tensorboard=False),
    )


def twin_loops(configs, opts=None, methods=True):
    """One loop per config dict, all over identical copies of one perturbed model."""
    model, diffusion = trained_like_model(opts or tiny_options())
    return [make_loop(copy.deepcopy(model), diffusion, methods=methods, **c) for c in configs]


def run_steps(loop, steps, seed=0):
    """`steps` real training steps; timesteps and noise are the same for every loop."""
    for _ in range(steps):
        batch, cond = next(loop.data)
        torch.manual_seed(seed + loop.step)
        np.random.seed(seed + loop.step)
        loop.run_step(batch, cond)
        loop.step += 1


def step_loss(loop):
    return loop.logger._reduced_means()["loss"]


def grads(loop):
    return [p.grad.detach().float().clone() for p in loop.params]


def rel_err(a, b):
    """||a - b|| / ||b|| over a list of tensors."""
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / den


def assert_lists_close(a, b, rtol, atol):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"tensor {i}: {m}")


# ---------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, tol", [("bf16", 3e-2), ("fp16", 1e-2)])
def test_autocast_training_step_matches_fp32(precision, tol):
    fp32, low = twin_loops([dict(precision="fp32"), dict(precision=precision)])
    run_steps(fp32, 1)
    run_steps(low, 1)
    assert low.nonfinite_counts(reset=False)[0] == 0  # fp16: the first loss scale (2**16) does not overflow here
    loss32, loss_low = step_loss(fp32), step_loss(low)
    assert abs(loss_low - loss32) <= tol * abs(loss32), (loss32, loss_low)
    g32, g_low = grads(fp32), grads(low)
    assert all(float(g.abs().max()) > 0 for g in g32), "every gradient should be non-trivial"
    assert rel_err(g_low, g32) < tol, rel_err(g_low, g32)
    # Parameters, gradients and the optimizer stay float32 under autocast.
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in low.params)
    # Per tensor too: no single layer is far off (small tensors are noisier: looser).
    # Conv biases right before a GroupNorm with one channel per group get no gradient
    # (the norm removes any per-channel constant): fp32 says ~1e-9, so skip them.
    largest = max(float(g.norm()) for g in g32)
    for name, a, b in zip(fp32.param_names, g_low, g32):
        if float(b.norm()) > 1e-4 * largest:
            assert rel_err([a], [b]) < 5 * tol, name


def test_fp64_reference_step_matches_fp32_and_stays_float64():
    """--precision fp64 computes the fp32 step's function in float64 (the pinned-weights run)."""
    model, diffusion = trained_like_model(tiny_options())
    x, noise, t = fixed_inputs()
    loss32, g32 = _loss_and_grads(model, diffusion, x, t, noise)
    loss64, g64 = _loss_and_grads(copy.deepcopy(model).double(), diffusion, x.double(), t, noise.double())
    # float32 against float64 of the same weights and inputs: float32 rounding (GRAD_* below).
    assert abs(loss32 - loss64) <= 1e-5 * abs(loss64)
    assert rel_err(g32, g64) < 1e-4
    # The loop keeps weights, gradients and Adam's moments in float64 (its noise is drawn in
    # float64 too, so its losses are not the fp32 loop's).
    (loop,) = twin_loops([dict(precision="fp64")])
    run_steps(loop, 1)
    assert all(p.dtype == torch.float64 and p.grad.dtype == torch.float64 for p in loop.params)
    assert all(s[k].dtype == torch.float64 for s in loop.opt.state.values() for k in ("exp_avg", "exp_avg_sq"))


def test_fp64_is_refused_for_sampling():
    from improved_diffusion.run import precision

    assert precision.resolve("fp64", "cpu") == "fp64"
    with pytest.raises(ValueError, match="--precision fp64"):
        precision.resolve("fp64", "cpu", purpose="sample")


def test_fp64_is_refused_with_evaluation_during_training():
    from improved_diffusion.options import config
    from improved_diffusion.run import training

    opts = {**{o.name: o.default for o in config.OPTIONS}, "precision": "fp64"}
    training.check(opts, "cpu")
    with pytest.raises(ValueError, match="--eval_interval"):
        training.check({**opts, "eval_interval": 10}, "cpu")


# ---------------------------------------------------------------------------------------
# Memory format and optimizer kernels
# ---------------------------------------------------------------------------------------


def run_steps_masked(loops, steps):
    """
    Step every loop in turn; return masks of the parameter entries whose gradient (in
    loops[0]) was well above rounding noise at every step: at least 1e-3 of the largest.

    Adam moves an entry by about lr * m / sqrt(v), so a difference d in a gradient g moves
    the update by about lr * d / |g|. Two kernels' gradients differ by up to ~1e-6 of the
    largest one (GRAD_* above), so on these entries the updates differ by at most ~1e-3 of
    lr per step, well inside ADAM_ATOL. Smaller gradients are left out: those that are zero in
    exact arithmetic (the key bias of attention, conv biases right before a GroupNorm with
    one channel per group: rounding noise of ~1e-10 that Adam normalises into moves in
    random directions) and the small ones whose relative rounding error Adam amplifies the
    same way. About 70% of the tiny model's entries remain.
    """
    masks = None
    for _ in range(steps):
        for loop in loops:
            run_steps(loop, 1)
        ref = grads(loops[0])
        top = max(float(g.abs().max()) for g in ref)
        real = [g.abs() > 1e-3 * top for g in ref]
        masks = real if masks is None else [m & r for m, r in zip(masks, real)]
    assert sum(int(m.sum()) for m in masks) > 0.5 * sum(m.numel() for m in masks)
    return masks


def assert_params_close(loop, ref, masks, rtol, atol):
    for name, p, q, m in zip(ref.param_names, loop.params, ref.params, masks):
        torch.testing.assert_close(p.detach()[m], q.detach()[m], rtol=rtol, atol=atol, msg=lambda e: f"{name}: {e}")


def fixed_inputs():
    """x, noise and t of a batch, the same on every call, on DEVICE."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 8, 8, generator=gen)
    noise = torch.randn(BATCH, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 5, 20, 39])
    return x.to(DEVICE), noise.to(DEVICE), t.to(DEVICE)


def channels_last_loss_and_grads(model, diffusion, channels_last):
    model = copy.deepcopy(model)
    x, noise, t = fixed_inputs()
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x, noise))
    loss = diffusion.training_losses(model, x, t, noise=noise)["loss"].mean()
    loss.backward()
    return float(loss.detach()), [p.grad for p in model.parameters()]


def test_channels_last_forward_backward_equals_contiguous():
    model, diffusion = trained_like_model(tiny_options())
    loss, g = channels_last_loss_and_grads(model, diffusion, channels_last=False)
    loss_cl, g_cl = channels_last_loss_and_grads(model, diffusion, channels_last=True)
    assert abs(loss_cl - loss) <= 1e-5 * abs(loss)
    assert_lists_close(g_cl, g, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_channels_last_training_step_equals_contiguous():
    plain, cl = twin_loops([dict(channels_last=False), dict(channels_last=True)])
    assert cl.model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    # The first step starts from the same weights: gradients agree to summation order (GRAD_*).
    first = run_steps_masked([plain, cl], 1)
    assert abs(step_loss(cl) - step_loss(plain)) <= 1e-5 * abs(step_loss(plain))
    assert_lists_close(grads(cl), grads(plain), rtol=GRAD_RTOL, atol=GRAD_ATOL)
    # The second starts from the first update, where AdamW turned rounding differences of
    # tiny gradients into different moves; where gradients are real, they agree (ADAM_*).
    second = run_steps_masked([plain, cl], 1)
    assert abs(step_loss(cl) - step_loss(plain)) <= 1e-5 * abs(step_loss(plain))
    masks = [a & b for a, b in zip(first, second)]
    assert_params_close(cl, plain, masks, rtol=1e-5, atol=ADAM_ATOL)
    # The checkpointed state dict is the same whatever the memory format.
    assert list(cl.model.state_dict()) == list(plain.model.state_dict())


def _cpu_fused_adamw_available():
    p = torch.nn.Parameter(torch.zeros(2))
    try:
        opt = torch.optim.AdamW([p], fused=True)
        p.grad = torch.ones(2)
        opt.step()
    except (RuntimeError, TypeError, ValueError) as err:
        return str(err).splitlines()[0]
    return None


def test_adamw_implementations_agree_with_moving_beta1_and_lr():
    impls = ["single", "foreach"]
    reason = _cpu_fused_adamw_available()
    if reason is None:
        impls.append("fused")
    configs = [dict(optimizer_impl=i) for i in impls] + [dict(optimizer_impl="single", lr=1.05 * LR)]
    *loops, faster = twin_loops(configs)
    masks = run_steps_masked(loops + [faster], 3)
    for loop in loops:
        assert loop.opt.param_groups[0]["betas"][0] < 0.9  # MD moved beta1 at every step
    single = loops[0]
    with pytest.raises(AssertionError):  # the tolerance sees a 5% change of the learning rate
        assert_params_close(faster, single, masks, rtol=1e-5, atol=ADAM_ATOL)
    for other in loops[1:]:
        assert_params_close(other, single, masks, rtol=1e-5, atol=ADAM_ATOL)
        for e, f, m in zip(other.ema_params[0], single.ema_params[0], masks):
            torch.testing.assert_close(e[m], f[m], rtol=1e-5, atol=ADAM_ATOL)
    if reason is not None:
        pytest.skip(f"single == foreach checked; fused AdamW unavailable on CPU in torch {torch.__version__}: {reason}")


def test_auto_optimizer_is_fused_where_torch_has_it():
    """auto = the fused AdamW kernel when this torch has one for the device (6x faster than
    foreach on this CPU for the CIFAR-10 model), else foreach."""
    from improved_diffusion.train_util import _fused_adamw_works

    (loop,) = twin_loops([dict(optimizer_impl="auto")], methods=False)
    if _fused_adamw_works(DEVICE):
        assert loop.opt.defaults.get("fused") is True
    else:
        assert loop.opt.defaults.get("foreach") is True


# ---------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------


def _loss_and_grads(model, diffusion, x, t, noise):
    model.zero_grad(set_to_none=True)
    loss = diffusion.training_losses(model, x, t, noise=noise)["loss"].mean()
    loss.backward()
    return float(loss.detach()), [p.grad.detach().clone() for p in model.parameters()]


def _check_compiled_matches_eager(backend):
    torch._dynamo.reset()
    model, diffusion = trained_like_model(tiny_options())
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    x, noise, t = fixed_inputs()
    loss_e, grads_e = _loss_and_grads(model, diffusion, x, t, noise)
    loss_c, grads_c = _loss_and_grads(compiled, diffusion, x, t, noise)
    assert abs(loss_c - loss_e) <= 1e-5 * abs(loss_e)
    assert_lists_close(grads_c, grads_e, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    with torch.no_grad():
        model.eval()
        compiled.eval()
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-5, atol=1e-5)


def test_compile_aot_eager_matches_eager():
    """Dynamo capture plus AOTAutograd (no code generation): cheap, about 10 s on 2 cores."""
    try:
        _check_compiled_matches_eager("aot_eager")
    except torch._dynamo.exc.BackendCompilerFailed as err:  # pragma: no cover
        pytest.skip(f"torch.compile unavailable here: {err}")


@pytest.mark.skipif(
    os.environ.get("IDIFF_TEST_INDUCTOR", "") != "1",
    reason="inductor compilation of the tiny UNet takes over 2 minutes on 2 CPU cores; "
    "set IDIFF_TEST_INDUCTOR=1 to run it",
)
def test_compile_inductor_matches_eager():
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("gcc") is None:
        pytest.skip("inductor on CPU needs a C++ compiler")
    _check_compiled_matches_eager("inductor")


def test_compiled_loop_checkpoints_plain_state_dict():
    """--compile never leaks `_orig_mod.` into the state dicts that checkpoints hold."""
    (loop,) = twin_loops([dict(compile=True)], methods=False)
    assert loop.train_model is not loop.model
    assert not any(k.startswith("_orig_mod") for k in loop.model.state_dict())
    assert not any(k.startswith("_orig_mod") for k in loop.ema_state_dict())


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def test_bf16_sampling_close_to_fp32():
    opts = tiny_options()
    model, _ = trained_like_model(opts)
    diffusion = create_gaussian_diffusion(
        steps=opts["diffusion_steps"],
        learn_sigma=opts["learn_sigma"],
        noise_schedule=opts["noise_schedule"],
        rescale_timesteps=opts["rescale_timesteps"],
        rescale_learned_sigmas=opts["rescale_learned_sigmas"],
        timestep_respacing="ddim10",
    )
    common = dict(num_samples=6, batch_size=3, image_size=8, device=DEVICE, seed=3, use_ddim=True, progress=False)
    ref, _ = sample_images(model, diffusion, **common)
    low, _ = sample_images(model, diffusion, autocast_dtype=torch.bfloat16, **common)
    diff = np.abs(ref.astype(np.int32) - low.astype(np.int32))
    assert ref.std() > 10  # the images are not constant, so the comparison means something
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 12, (diff.mean(), diff.max())


# ---------------------------------------------------------------------------------------
# FLOPs and the benchmark script
# ---------------------------------------------------------------------------------------


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_counter_counts_cpu_attention():
    bench = _benchmark_module()
    opts = tiny_options()
    model, _ = create_model_and_diffusion(**opts)
    total, by_op = bench.forward_flops(model, opts, torch.device("cpu"))
    # The attention itself: one block at 4x4 in the encoder, the middle one at 4x4, two
    # in the decoder at 4x4, each 2 * 2 * T^2 * C with T = 16 tokens and C = 64 channels.
    attention = 4 * (2 * 2 * 16 * 16 * 64)
    sdpa = sum(n for op, n in by_op.items() if "scaled_dot_product" in op)
    assert sdpa == attention, by_op
    # The 1x1 qkv / proj_out convolutions run as matmuls and are counted too.
    assert any(("mm" in op) for op in by_op), by_op
    # The meta device runs the math attention (bmm) and must agree exactly.
    with torch.device("meta"):
        meta_model, _ = create_model_and_diffusion(**opts)
    meta_total, _ = bench.forward_flops(meta_model, opts, torch.device("meta"))
    assert total == meta_total


def test_cifar10_forward_flops_match_spec():
    """SPEC section 6: the CIFAR-10 model costs 16.8 GFLOP per image forward."""
    bench = _benchmark_module()
    with open(os.path.join(ROOT, "configs", "cifar10_baseline.json")) as f:
        config = json.load(f)
    opts = model_and_diffusion_defaults()
    opts.update({k: v for k, v in config.items() if k in opts})
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**opts)
    total, _ = bench.forward_flops(model, opts, torch.device("meta"))
    assert abs(total / 1e9 - 16.8) < 0.1, total / 1e9


def test_benchmark_script_compare_on_demo_config(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        PYTHON, os.path.join(ROOT, "scripts", "benchmark.py"), "--config", "demo", "--batch_size", "4",
        "--steps", "2", "--warmup", "1", "--overhead_iters", "20", "--threads", "1", "--compare", "True",
        "--device", str(DEVICE), "--json", str(out),
    ]
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed, end = json.JSONDecoder().raw_decode(proc.stdout)  # JSON first, then the table
    assert "fast / plain" in proc.stdout[end:]
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(printed))
    assert result["config_path"] == os.path.join("configs", "demo_all.json")  # demo = its all-methods variant
    on_cpu = DEVICE.type == "cpu"
    assert result["device"].split(":")[0] == DEVICE.type and result["threads"] == 1
    assert (result["peak_tflops"] is None) == on_cpu  # MFU needs a peak; CUDA has a default one
    flops = result["flops"]
    assert flops["forward_per_image"] > 0 and flops["train_step_per_image_counted"] > 2 * flops["forward_per_image"]
    for label in ("plain", "fast"):
        run = result[label]
        train, sample = run["train"], run["sample"]
        for key in ("images_per_s", "ms_per_step", "ms_per_step_iqr", "peak_memory_bytes", "achieved_tflops"):
            assert train[key] > 0, (label, key)
        assert (train["mfu"] is None) == on_cpu and train["batch_size"] == 4 and train["timed_steps"] == 2
        assert train["skipped_steps"] == 0
        for key in ("forward_ms", "ddim_step_ms", "ddim50_images_per_s", "peak_memory_bytes"):
            assert sample[key] > 0, (label, key)
    assert result["plain"]["settings"] == {
        "precision": "fp32", "channels_last": False, "optimizer_impl": "single", "compile": False,
        "optimizer_kernel": "single",
    }
    assert result["fast"]["settings"]["optimizer_kernel"] == ("fused" if _cpu_fused_adamw_available() is None else "foreach")
    overhead = result["fast"]["overhead"]
    for key in ("clts_us", "mdlrc_us", "uniform_sampler_us", "percent_of_step"):
        assert overhead[key] > 0, key
    assert set(result["speedup"]) == set(result["speedup_from_min"]) == {"train", "sample"}
    assert all(v > 0 for v in result["speedup"].values())


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host: the op behind `.item()`, `bool()` and
    `float()`, and the calls that bypass the dispatcher on a CPU (`.tolist()`, `.numpy()`,
    `.cpu()`, wrapped here; the real methods still run)."""

    BYPASSING = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.count = 0
        self.saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in self.BYPASSING:
            method = self.saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _counted(self, method):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return method(tensor, *args, **kwargs)

        return counted


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(precision="bf16", channels_last=True, data_on_device=True),
        dict(precision="fp16"),
        dict(microbatch=2, grad_clip=1.0),
    ],
    ids=["fp32", "bf16-channels-last", "fp16", "microbatch-clip"],
)
def test_training_step_reads_nothing_back_to_the_host(config):
    (loop,) = twin_loops([dict(optimizer_impl="fused", **config)])
    run_steps(loop, 1)  # optimizer state is created on the first step
    with HostReads() as reads:
        run_steps(loop, 3)
    assert reads.count == 0
    with HostReads() as reads:
        loop.dump_logs()  # log intervals are where values come back
    assert reads.count > 0


def test_the_counter_sees_a_non_fused_optimizer_read_the_host():
    """The positive control: foreach AdamW reads its step counts (and the skip flag) on the host."""
    (loop,) = twin_loops([dict(optimizer_impl="foreach")])
    run_steps(loop, 1)
    with HostReads() as reads:
        run_steps(loop, 3)
    assert reads.count >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA's sync detector")
def test_cuda_step_has_no_host_sync():
    model, diffusion = trained_like_model(tiny_options())
    loop = make_loop(model.cuda(), diffusion, precision="bf16", channels_last=True, data_on_device=True)
    run_steps(loop, 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # without the per-step seeding of run_steps, which is not the loop's
            loop.run_step(*next(loop.data))
            loop.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
