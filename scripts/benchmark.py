"""
Benchmark training and sampling throughput, FLOPs and MFU of the real training step.

Times `TrainLoop.run_step`, built from the options table by `improved_diffusion/run/training.py`
exactly as `image_train.py` builds it (schedules, diffusion loss, backward, gradient check,
AdamW, EMA), on synthetic in-memory uint8 data already on the device, and the model forward used by sampling (one DDIM step = one forward). Prints one
JSON document, then a table. Nothing here is a test: run it by hand on the machine you
care about (docs/benchmarks.md holds the numbers measured so far).

    # one GPU (H100): the SPEC's targets, bf16 + channels-last + fused AdamW
    python scripts/benchmark.py --config cifar10 --batch_size 128 --channels_last True \
        --sample_batch_size 500 --json runs/bench_cifar10.json
    python scripts/benchmark.py --config imagenet128 --batch_size 32 --channels_last True \
        --sample_batch_size 64 --json runs/bench_imagenet128.json
    # plain fp32 path vs fast path in one process (speed-up ratio), optionally compiled
    python scripts/benchmark.py --config cifar10 --batch_size 128 --compare True --compile True
    # pin the attention kernel (auto, math, flash, efficient, cudnn)
    python scripts/benchmark.py --config cifar10 --batch_size 128 --attention_backend flash

    # CPU (docs/benchmarks.md used 1 thread on a shared 2-core machine); MFU needs --peak_tflops
    python scripts/benchmark.py --config demo --threads 1 --compare True --steps 40
    python scripts/benchmark.py --config cifar10 --batch_size 8 --threads 1 --steps 3 --warmup 1
    python scripts/benchmark.py --config imagenet128 --parts flops   # FLOPs only

`--config` is cifar10, imagenet128 or demo (their all-methods variants configs/cifar10_all.json,
configs/imagenet128_all.json, configs/demo_all.json), any name in configs/ (e.g.
cifar10_baseline), or a path to a JSON config; the table's flags (`--num_channels 64`,
`--precision bf16`, `--cudnn_benchmark True`, ...) override it. FLOPs are counted with
`torch.utils.flop_counter.FlopCounterMode` on one forward of batch 1 (convolutions,
matmuls, and the attention itself: the CPU SDPA kernels, which the counter does not know,
are added here). MFU = 3 x forward FLOPs x images/s / --peak_tflops (default on CUDA 989, the dense
bf16 peak of an H100 SXM and of the H200 without sparsity; give your card's for another GPU,
e.g. about 756 for an H100 PCIe or 312 for an A100; on CPU give your own or MFU is null).
The table's first line names the peak it used.

The timed step reads nothing back to the host with fused AdamW (the default where torch has
it): the skip of a non-finite step is decided on the device, timesteps are drawn there, and
metrics stay there until a log interval (`dump_logs` is not part of the timed step). The
tests check this (tests/test_fast_path.py, `HostReads`; on a GPU also CUDA's sync detector).
With --optimizer_impl foreach or single, the skip decision needs one host read per step.
"""

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from improved_diffusion.options import config  # noqa: E402
from improved_diffusion.run import precision, training
from improved_diffusion.image_datasets import ImageDataset  # noqa: E402
from improved_diffusion.logger import Logger  # noqa: E402
from improved_diffusion.resample import UniformSampler  # noqa: E402
from improved_diffusion.script_util import (  # noqa: E402
    NUM_CLASSES,
    create_diffusion_from_options,
    create_model_and_diffusion,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's configs with all of its methods on (CLTS + MD + LRC), so that the timed step
# pays what they cost; name any other config (e.g. cifar10_baseline) for another variant.
NAMED_CONFIGS = {"cifar10": "cifar10_all", "imagenet128": "imagenet128_all", "demo": "demo_all"}
# The table's options the benchmark takes: model, training, methods and speed settings.
TABLE_GROUPS = ("model", "diffusion", "train", "methods", "gpu")
SPEC_CIFAR10_FORWARD_GFLOP = 16.8  # SPEC section 6
# Dense bf16 tensor-core peak of one H100 SXM and of one H200 (NVIDIA's datasheets give 1,979
# TFLOP/s "with sparsity", twice the dense figure); SPEC section 6. Sessions before 2026-12
# divided by 790, which overstated every MFU by a quarter.
DENSE_BF16_PEAK_TFLOPS = 989.0
DDIM_STEPS = 50


# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    config.add_options(parser, config.TOOLS["benchmark"], table=config.TOOLS["benchmark"])
    for group in TABLE_GROUPS:
        config.add_options(parser, [n for n in config.names(group) if n not in ("data_dir",)],
                           title=f"{group} options (improved_diffusion/options/config.py)")
    return parser


def resolve_config_path(name):
    candidates = []
    if name in NAMED_CONFIGS:
        candidates.append(os.path.join(ROOT, "configs", NAMED_CONFIGS[name] + ".json"))
    candidates += [os.path.join(ROOT, "configs", name + ".json"), name]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise SystemExit(f"--config {name}: no such config (tried {', '.join(candidates)})")


def parse_args(argv=None):
    """The table's layering (defaults < --config < flags), with named configs resolved first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = create_argparser()
    name = parser.parse_known_args(argv)[0].config
    path = resolve_config_path(name)
    args, _ = config.parse(parser, argv + ["--config", path])
    args.config_name, args.config = name, path
    for key, value in config.defaults("eval", "run").items():  # no evaluation, no log dir
        if key not in vars(args):
            setattr(args, key, value)
    # Logging, saving and timers stay out of the timed step.
    args.log_interval = args.save_interval = 10**9
    return args


# ---------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """(bytes, what was measured)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    # Linux reports ru_maxrss in KiB: the peak resident set of the whole process so far.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS (ru_maxrss)"


def sdpa_context(name, device):
    """Pin the scaled_dot_product_attention kernel (torch >= 2.3 API)."""
    if name == "auto":
        return nullcontext()
    if device.type == "cpu" and name not in ("math", "flash"):
        raise SystemExit(f"--attention_backend {name} has no CPU kernel; use auto, math or flash on CPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "math": "MATH",
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
    }
    backend = getattr(SDPBackend, backends[name], None)
    if backend is None:
        raise SystemExit(f"--attention_backend {name} is not available in torch {torch.__version__}")
    return sdpa_kernel(backend)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def group_norm_keeps_channels_last(device):
    """Whether GroupNorm returns channels-last for channels-last input on this device.

    If not (CUDA in some torch versions), every GroupNorm of a --channels_last model pays a
    layout copy on the way in and the next convolution one on the way out.
    """
    norm = torch.nn.GroupNorm(4, 8).to(device)
    x = torch.randn(2, 8, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return bool(norm(x).is_contiguous(memory_format=torch.channels_last))


def summarize(seconds):
    """Median and interquartile range of per-call times, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "min_ms": ms[0], "n": len(ms)}


class StepTimer:
    """Per-call wall times, the device synchronised before and after each call."""

    def __init__(self, device):
        self.device = device
        self.seconds = []

    def __call__(self, fn):
        synchronize(self.device)
        start = time.perf_counter()
        fn()
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    b, h, lq, dq = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * (dq + dv)  # q k^T and attn v


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return 2 * _sdpa_forward_flops(query_shape, key_shape, value_shape)  # dq, dk, dv, d(attn)


def sdpa_flop_mapping():
    """FLOP formulas for the CPU SDPA kernels, which FlopCounterMode does not count itself."""
    ops = torch.ops.aten
    mapping = {}
    for name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_forward_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward_flops),
    ):
        packet = getattr(ops, name, None)
        if packet is not None:
            mapping[packet] = fn
    return mapping


def count_flops(fn):
    """(total FLOPs, {op name: FLOPs}) of running fn() once."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping())
    with counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def model_inputs(model_opts, batch, device, generator=None):
    size = model_opts["image_size"]
    x = torch.randn(batch, model_opts.get("image_channels", 3), size, size, device=device, generator=generator)
    t = torch.randint(0, model_opts["diffusion_steps"], (batch,), device=device, generator=generator)
    kwargs = {}
    if model_opts["class_cond"]:
        kwargs["y"] = torch.randint(0, NUM_CLASSES, (batch,), device=device, generator=generator)
    return x, t, kwargs


def forward_flops(model, model_opts, device):
    """FLOPs of one fp32 forward of batch 1 on `device` (the kernels the benchmark runs)."""
    x, t, kwargs = model_inputs(model_opts, 1, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return count_flops(lambda: model(x, t, **kwargs))
    finally:
        model.train(was_training)


def train_step_flops_meta(model_opts):
    """FLOPs of forward + backward of batch 1, counted on the meta device (no compute)."""
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**model_opts)
        x, t, kwargs = model_inputs(model_opts, 1, torch.device("meta"))
    model.train()

    def step():
        model(x, t, **kwargs).float().square().mean().backward()

    return count_flops(step)


# ---------------------------------------------------------------------------------------
# Training and sampling
# ---------------------------------------------------------------------------------------


def build(opts, device):
    """A TrainLoop over synthetic uint8 data, built as image_train.py builds it (training.py)."""
    training.apply_device_settings(opts, device)
    model, diffusion = training.build_model(opts, device)
    rng = np.random.default_rng(opts["seed"])
    n_images, size = opts["batch_size"] * 4, opts["image_size"]
    images = rng.integers(0, 256, size=(n_images, size, size, opts["image_channels"]), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=n_images) if opts["class_cond"] else None
    logger = Logger(None, stdout=False, tensorboard=False)
    return training.build_loop(opts, model, diffusion, ImageDataset(images, labels), device, logger=logger,
                               progress=False)


class Candidate:
    """
    One configuration under test: its TrainLoop, a few batches already on the device, and
    the sampling forward. Several candidates are timed step by step in turn (interleaved),
    so that a machine whose load changes (a shared CPU) treats them alike.
    """

    def __init__(self, label, settings, opts, device):
        self.label, self.device = label, device
        self.opts = {**opts, **settings}
        self.settings = {**settings, "precision": self.opts["precision"]}
        self.memory_before = self._allocated()
        reset_peak_memory(device)
        self.loop = build(self.opts, device)
        self.settings["precision"] = self.loop.config.precision  # "auto" resolved
        self.result = {"label": label, "settings": dict(self.settings)}
        defaults = self.loop.opt.defaults  # the kernel "auto" resolved to, for the table
        kernel = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "single"
        self.result["settings"]["optimizer_kernel"] = kernel
        data_seconds, self.batches = [], []
        for _ in range(4):
            start = time.perf_counter()
            batch, cond = next(self.loop.data)
            data_seconds.append(time.perf_counter() - start)
            self.batches.append((batch.to(device), {k: v.to(device) for k, v in cond.items()}))
        self.data_ms = statistics.median(data_seconds) * 1e3

    def _allocated(self):
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def _peak_since(self, baseline):
        memory, kind = peak_memory(self.device)
        if self.device.type == "cuda":
            return memory - baseline, kind + " (this configuration's share)"
        return memory, kind

    # -------------------------------------------------------------- training

    def train_step(self):
        batch, cond = self.batches[self.loop.step % len(self.batches)]
        self.loop.run_step(batch, cond)
        self.loop.step += 1

    def warm_up_training(self, steps):
        start = time.perf_counter()
        for _ in range(steps):
            self.train_step()
        synchronize(self.device)
        self.train_warmup_s = time.perf_counter() - start
        self.train_memory = self._peak_since(self.memory_before)

    def train_result(self, seconds):
        stats = summarize(seconds)
        batch_size = self.loop.config.batch_size
        return {
            "batch_size": batch_size,
            "ms_per_step": stats["median_ms"],
            "ms_per_step_q1": stats["q1_ms"],
            "ms_per_step_q3": stats["q3_ms"],
            "ms_per_step_iqr": stats["iqr_ms"],
            "ms_per_step_min": stats["min_ms"],
            "images_per_s": batch_size / (stats["median_ms"] / 1e3),
            "images_per_s_mean": batch_size * len(seconds) / sum(seconds),
            "timed_steps": len(seconds),
            "warmup_s": self.train_warmup_s,
            "skipped_steps": self.loop.nonfinite_counts(reset=False)[0],
            "data_ms_per_batch": self.data_ms,
            "peak_memory_bytes": self.train_memory[0],
            "peak_memory_kind": self.train_memory[1],
        }

    # -------------------------------------------------------------- sampling

    def prepare_sampling(self, batch_size, seed):
        """The sampling forward (eval, no_grad, autocast) and one full DDIM step."""
        opts, device, mode = self.opts, self.device, self.settings["precision"]
        model = self.loop.train_model  # the compiled module with --compile (recompiles for eval)
        self.sample_batch = batch_size
        generator = torch.Generator(device=device).manual_seed(seed)
        x, _, kwargs = model_inputs(opts, batch_size, device, generator)
        if self.settings["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        ddim = create_diffusion_from_options(training.model_options(opts), timestep_respacing=f"ddim{DDIM_STEPS}")
        mid = DDIM_STEPS // 2
        t_model = torch.full((batch_size,), ddim.timestep_map[mid], device=device, dtype=torch.long)
        if opts["rescale_timesteps"]:
            t_model = t_model.float() * (1000.0 / opts["diffusion_steps"])
        t_spaced = torch.full((batch_size,), mid, device=device, dtype=torch.long)

        def forward():
            with torch.no_grad(), precision.autocast(mode, device):
                model(x, t_model, **kwargs)

        def ddim_step():
            with torch.no_grad(), precision.autocast(mode, device):
                ddim.ddim_sample(model, x, t_spaced, clip_denoised=True, model_kwargs=kwargs)

        self.forward, self.ddim_step, self.ddim = forward, ddim_step, ddim

    def warm_up_sampling(self, steps):
        self.loop.model.eval()
        baseline = self._allocated()
        reset_peak_memory(self.device)
        start = time.perf_counter()
        for _ in range(max(1, steps)):
            self.forward()
            self.ddim_step()
        synchronize(self.device)
        self.sample_warmup_s = time.perf_counter() - start
        memory, kind = self._peak_since(baseline)
        if self.device.type == "cuda":  # activations above what was resident, plus the weights
            memory += sum(p.numel() * p.element_size() for p in self.loop.model.parameters())
            kind = "torch.cuda.max_memory_allocated (weights + sampling activations)"
        self.sample_memory = (memory, kind)

    def sample_result(self, forward_seconds, ddim_seconds):
        self.loop.model.train()
        fwd, step = summarize(forward_seconds), summarize(ddim_seconds)
        batch_size = self.sample_batch
        per_s = batch_size / (DDIM_STEPS * fwd["median_ms"] / 1e3)
        return {
            "batch_size": batch_size,
            "forward_ms": fwd["median_ms"],
            "forward_ms_iqr": fwd["iqr_ms"],
            "forward_ms_min": fwd["min_ms"],
            "ddim_step_ms": step["median_ms"],
            "ddim_step_ms_iqr": step["iqr_ms"],
            "ddim50_images_per_s": per_s,
            "ddim50_images_per_s_full_step": batch_size / (DDIM_STEPS * step["median_ms"] / 1e3),
            "ddim50_seconds_for_10k_images": 10000 / per_s,
            "warmup_s": self.sample_warmup_s,
            "peak_memory_bytes": self.sample_memory[0],
            "peak_memory_kind": self.sample_memory[1],
        }


def time_sample_images(candidate, num_samples, seed):
    """Wall time of sample_images (per-sample seeds, uint8 out) for num_samples DDIM-50 images."""
    from improved_diffusion.evaluation.sampling import sample_images

    opts, device = candidate.opts, candidate.device
    dtype = precision.DTYPES[candidate.settings["precision"]]
    kwargs = dict(batch_size=candidate.sample_batch, image_size=opts["image_size"], device=device, seed=seed,
                  use_ddim=True, class_cond=opts["class_cond"], num_classes=NUM_CLASSES, progress=False,
                  rank=0, world_size=1, autocast_dtype=dtype)
    model = candidate.loop.train_model  # compiled with --compile (the warm-up call compiles it)
    sample_images(model, candidate.ddim, num_samples=min(num_samples, candidate.sample_batch), **kwargs)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    images, _ = sample_images(model, candidate.ddim, num_samples=num_samples, **kwargs)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"num_samples": int(images.shape[0]), "batch_size": candidate.sample_batch, "steps": DDIM_STEPS,
            "seconds": seconds, "images_per_s": images.shape[0] / seconds}


def profile_training(candidate, steps, out_path):
    """Where a training step's time goes: kernel count, device-busy time and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    device = candidate.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            candidate.train_step()
        synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / steps if kernels else None  # us -> ms
    table = ""
    for sort in (("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)):
        try:  # the key's name differs between torch versions
            table = prof.key_averages().table(sort_by=sort, row_limit=30)
            break
        except (KeyError, AttributeError, ValueError):
            continue
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            f.write(f"{steps} training steps of {candidate.label}; wall {wall_ms:.2f} ms/step (profiled)\n\n{table}\n")
    return {
        "steps": steps,
        "wall_ms_per_step_profiled": wall_ms,
        "kernels_per_step": len(kernels) / steps if kernels else None,
        "device_busy_ms_per_step": busy_ms,
        "device_busy_share": busy_ms / wall_ms if busy_ms else None,
        "table": out_path or None,
    }


def time_interleaved(candidates, method, n, device):
    """n timed calls of `method` per candidate, taking turns (A B, B A, ...); {label: [seconds]}."""
    timers = {c.label: StepTimer(device) for c in candidates}
    for i in range(n):
        for c in candidates if i % 2 == 0 else candidates[::-1]:
            timers[c.label](getattr(c, method))
    return {label: timer.seconds for label, timer in timers.items()}


def measure(runs, args, opts, device, parts):
    """
    Benchmark each (label, settings) of `runs`; all are built first, then timed in turn.

    :return: {label: result dict}, and the candidates (the last one serves the overhead).
    """
    candidates = []
    with sdpa_context(args.attention_backend, device):
        for label, settings in runs:
            c = Candidate(label, settings, opts, device)
            if "train" in parts:
                c.warm_up_training(args.warmup)
            candidates.append(c)
        if "train" in parts:
            seconds = time_interleaved(candidates, "train_step", args.steps, device)
            for c in candidates:
                c.result["train"] = c.train_result(seconds[c.label])
        if "sample" in parts:
            for c in candidates:
                c.prepare_sampling(args.sample_batch_size or opts["batch_size"], args.seed)
                c.warm_up_sampling(args.warmup)
            forward = time_interleaved(candidates, "forward", args.steps, device)
            ddim = time_interleaved(candidates, "ddim_step", max(1, args.steps // 2), device)
            for c in candidates:
                c.result["sample"] = c.sample_result(forward[c.label], ddim[c.label])
        if args.sample_images and "sample" in parts:  # the last (fast) configuration only
            c = candidates[-1]
            c.result["sample_images"] = time_sample_images(c, args.sample_images, args.seed)
        if args.profile_steps and "train" in parts:
            try:  # a profiler problem must not cost the timings above
                candidates[-1].result["profile"] = profile_training(candidates[-1], args.profile_steps, args.profile_out)
            except Exception as err:  # noqa: BLE001
                candidates[-1].result["profile"] = {"error": f"{type(err).__name__}: {err}"}
        if "overhead" in parts:
            last = candidates[-1]
            last.result["overhead"] = bench_method_overhead(last.loop, opts, device, args.overhead_iters)
    return {c.label: c.result for c in candidates}


def bench_method_overhead(loop, opts, device, iters):
    """
    Per-step cost of the paper's methods, as run_step pays it: CLTS set_step + sample(batch)
    and MDLRC beta1 / lr_factor + writing AdamW's param_groups; uniform sampling (which the
    baseline pays anyway) for reference. Both methods are timed whatever the config says.
    """
    diffusion, opt, batch = loop.diffusion, loop.opt, loop.config.batch_size
    clts = training.schedule_sampler({**opts, "schedule_sampler": "clts"}, diffusion)
    uniform = UniformSampler(diffusion)
    schedule = training.momentum_schedule({**opts, "momentum_decay": True, "lr_compensation": True,
                                           "total_steps": opts["total_steps"] or 500000})
    saved = [(g["lr"], g["betas"]) for g in opt.param_groups]

    def clts_call(k):
        clts.set_step(k)  # lam changes every step before K_target: the distribution is rebuilt
        clts.sample(batch, device)

    def uniform_call(k):
        uniform.sample(batch, device)

    def mdlrc_call(k):
        beta1, lr = schedule.beta1(k), loop.config.lr * schedule.lr_factor(k)
        for group in opt.param_groups:
            group["lr"] = lr
            group["betas"] = (beta1, group["betas"][1])

    def per_call_us(fn):
        fn(1)
        synchronize(device)
        start = time.perf_counter()
        for k in range(1000, 1000 + iters):
            fn(k)
        synchronize(device)
        return (time.perf_counter() - start) / iters * 1e6

    result = {
        "clts_us": per_call_us(clts_call),
        "mdlrc_us": per_call_us(mdlrc_call),
        "uniform_sampler_us": per_call_us(uniform_call),
        "iters": iters,
        "batch_size": batch,
        "num_timesteps": diffusion.num_timesteps,
    }
    for group, (lr, betas) in zip(opt.param_groups, saved):
        group["lr"], group["betas"] = lr, betas
    result["total_us"] = result["clts_us"] + result["mdlrc_us"]
    return result


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------


def fast_settings(device, compile_model):
    """The fast path: what is fastest on this kind of device (see docs/benchmarks.md)."""
    if device.type == "cuda":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return {"precision": precision, "channels_last": True, "optimizer_impl": "fused", "compile": compile_model}
    # CPU (measured, docs/benchmarks.md): bf16 autocast is several times slower on CPUs
    # without native bf16 convolutions, channels-last convolutions were slower for these
    # models, and fused AdamW is 5x faster than foreach / single-tensor.
    return {"precision": "fp32", "channels_last": False, "optimizer_impl": "auto", "compile": compile_model}


def plain_settings():
    """The plain fp32 path of the original code: fp32, NCHW, single-tensor AdamW, eager."""
    return {"precision": "fp32", "channels_last": False, "optimizer_impl": "single", "compile": False}


def add_rates(result, fwd_flops, peak_tflops):
    train = result.get("train")
    if train:
        tflops = 3 * fwd_flops * train["images_per_s"] / 1e12
        train["achieved_tflops"] = tflops
        train["mfu"] = tflops / peak_tflops if peak_tflops else None
        overhead = result.get("overhead")
        if overhead:
            overhead["step_ms"] = train["ms_per_step"]
            overhead["percent_of_step"] = 100.0 * overhead["total_us"] / 1e3 / train["ms_per_step"]
            overhead["percent_of_step_vs_uniform_only"] = (
                100.0 * (overhead["clts_us"] + overhead["mdlrc_us"] - overhead["uniform_sampler_us"])
                / 1e3 / train["ms_per_step"]
            )
    sample = result.get("sample")
    if sample:
        sample["achieved_tflops"] = fwd_flops * sample["batch_size"] / (sample["forward_ms"] / 1e3) / 1e12
        sample["mfu"] = sample["achieved_tflops"] / peak_tflops if peak_tflops else None


def benchmark_device(args):
    """The --device (default: CUDA when there is one), made current; --threads set."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index in torch 2.11
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    # TF32 stays at torch's defaults (convolutions yes, matmuls no), as in training.
    return device


def parts_of(args):
    """The --parts to time (FLOPs are always counted), checked with --steps and --warmup."""
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"train", "sample", "overhead", "flops"}
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {sorted(unknown)}; choose from train, sample, overhead, flops")
    parts.discard("flops")  # FLOPs are always counted
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    return parts


def describe(args, opts, model_opts, device, peak):
    """The result's header: the model, the machine and the FLOPs of the forward and the training step."""
    # FLOPs: the forward on the benchmark device (its attention kernels), fwd+bwd on meta.
    torch.manual_seed(args.seed)
    model, _ = create_model_and_diffusion(**model_opts)
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    fwd_flops, fwd_by_op = forward_flops(model, model_opts, device)
    del model
    train_flops, train_by_op = train_step_flops_meta(model_opts)
    result = {
        "benchmark": "scripts/benchmark.py",
        "config": args.config_name,
        "config_path": os.path.relpath(args.config, ROOT) if os.path.abspath(args.config).startswith(ROOT) else args.config,
        "model": {k: model_opts[k] for k in sorted(model_opts)},
        "params": params,
        "methods": {k: opts[k] for k in config.names("methods")},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "attention_backend": args.attention_backend,
        "cudnn_benchmark": bool(args.cudnn_benchmark) if device.type == "cuda" else None,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "group_norm_keeps_channels_last": group_norm_keeps_channels_last(device),
        "peak_tflops": peak or None,
        "flops": {
            "forward_per_image": fwd_flops,
            "forward_gflop_per_image": fwd_flops / 1e9,
            "forward_by_op": fwd_by_op,
            "train_step_per_image_counted": train_flops,
            "train_step_gflop_per_image_counted": train_flops / 1e9,
            "train_step_by_op": train_by_op,
            "train_step_per_image_3x_forward": 3 * fwd_flops,
            "spec_cifar10_forward_gflop": SPEC_CIFAR10_FORWARD_GFLOP,
            "ratio_to_spec_cifar10": fwd_flops / 1e9 / SPEC_CIFAR10_FORWARD_GFLOP,
        },
    }
    return result, fwd_flops


def time_runs(result, args, opts, device, parts, fwd_flops, peak):
    """Time the plain and fast settings (--compare) or the flags' own, into `result`; the labels."""
    settings = {k: opts[k] for k in ("precision", "channels_last", "compile", "compile_mode", "optimizer_impl")}
    if not parts:
        runs = []
    elif args.compare:
        runs = [("plain", plain_settings()), ("fast", fast_settings(device, args.compile))]
    else:
        runs = [("run", settings)]
    for label, run in (measure(runs, args, opts, device, parts) if runs else {}).items():
        add_rates(run, fwd_flops, peak)
        result[label] = run
    if args.compare and runs:
        # fast / plain from the medians, and from the fastest call of each (what a
        # shared, noisy machine distorts least: contention only ever adds time)
        result["speedup"], result["speedup_from_min"] = {}, {}
        for part, key in (("train", "ms_per_step"), ("sample", "forward_ms")):
            if part in result["plain"] and part in result["fast"]:
                plain, fast = result["plain"][part], result["fast"][part]
                result["speedup"][part] = plain[key] / fast[key]
                result["speedup_from_min"][part] = plain[key + "_min"] / fast[key + "_min"]
    return [label for label, _ in runs]


def main(argv=None):
    args = parse_args(argv)
    opts = vars(args)
    device = benchmark_device(args)
    parts = parts_of(args)
    model_opts = training.model_options(opts)
    peak = args.peak_tflops or (DENSE_BF16_PEAK_TFLOPS if device.type == "cuda" else 0.0)
    result, fwd_flops = describe(args, opts, model_opts, device, peak)
    labels = time_runs(result, args, opts, device, parts, fwd_flops, peak)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print()
    print(format_table(result, labels))
    return result


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or math.isfinite(value) and abs(value) >= 0.01:
            return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{value:.2e}"
    return str(value)


def compile_label(settings):
    """False, True, or the mode when it is not torch.compile's default."""
    mode = settings.get("compile_mode", "default")
    return str(settings["compile"]) if not settings["compile"] or mode == "default" else mode


def format_table(result, labels):
    flops = result["flops"]
    lines = [
        f"config {result['config']} ({result['config_path']}), {result['params']:,} parameters, "
        f"device {result['device']} ({result['device_name']}), torch {result['torch']}, "
        f"{result['threads']} threads",
        f"MFU against a peak of {result['peak_tflops']:g} TFLOP/s (--peak_tflops)" if result["peak_tflops"]
        else "MFU: none (no peak on this device: give --peak_tflops)",
        f"FLOPs per image: forward {flops['forward_gflop_per_image']:.2f} GFLOP "
        f"(SPEC CIFAR-10: {SPEC_CIFAR10_FORWARD_GFLOP} GFLOP), train step counted "
        f"{flops['train_step_gflop_per_image_counted']:.2f} GFLOP (3x forward: "
        f"{3 * flops['forward_gflop_per_image']:.2f})",
    ]
    rows = [("run", "precision", "ch-last", "compile", "adamw", "batch", "ms/step (IQR)", "img/s", "TFLOP/s",
             "MFU", "peak mem MiB", "DDIM-50 img/s", "fwd ms")]
    for label in labels:
        run = result[label]
        s, train, sample = run["settings"], run.get("train", {}), run.get("sample", {})
        rows.append((
            label, s["precision"], str(s["channels_last"]), compile_label(s), s.get("optimizer_kernel", s["optimizer_impl"]),
            str(train.get("batch_size", "-")),
            f"{_fmt(train.get('ms_per_step'))} ({_fmt(train.get('ms_per_step_iqr'), 2)})" if train else "-",
            _fmt(train.get("images_per_s")), _fmt(train.get("achieved_tflops")),
            f"{100 * train['mfu']:.1f}%" if train.get("mfu") is not None else "-",
            _fmt(train["peak_memory_bytes"] / 2**20) if train else "-",
            _fmt(sample.get("ddim50_images_per_s")), _fmt(sample.get("forward_ms")),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows if labels else []:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    if "speedup" in result:
        lines.append(
            "fast / plain: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedup"].items())
            + " (medians); "
            + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedup_from_min"].items())
            + " (fastest calls)"
        )
    for label in labels:
        timed = result[label].get("sample_images")
        if timed:
            lines.append(
                f"sample_images ({label}): {timed['num_samples']:,} DDIM-{timed['steps']} images in "
                f"{timed['seconds']:.1f} s ({timed['images_per_s']:,.0f} img/s, batch {timed['batch_size']})"
            )
        prof = result[label].get("profile")
        if prof and prof.get("kernels_per_step"):
            lines.append(
                f"profile ({label}): {prof['kernels_per_step']:,.0f} kernels per step, device busy "
                f"{prof['device_busy_ms_per_step']:.1f} of {prof['wall_ms_per_step_profiled']:.1f} ms "
                f"({100 * prof['device_busy_share']:.0f}%)"
            )
        overhead = result[label].get("overhead")
        if overhead and "percent_of_step" in overhead:
            lines.append(
                f"paper's methods per step ({label}): CLTS {overhead['clts_us']:.1f} us + MDLRC "
                f"{overhead['mdlrc_us']:.1f} us = {overhead['percent_of_step']:.3f}% of a "
                f"{overhead['step_ms']:.1f} ms step (uniform sampler alone: {overhead['uniform_sampler_us']:.1f} us)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
