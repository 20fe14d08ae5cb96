"""
The one table of options: every flag of training (and the model flags every script shares)
is defined here once, with its default, type, help text, group and check.

Everything else is derived from `OPTIONS`: the command line and `--help` (`add_options`),
`--config` files and a run's `config.json` (`read_options_file`, `load_config`), the checks
made before any work (`validate`), the original API (`model_and_diffusion_defaults()` in
`script_util`), the launch helpers and `docs/train-help.txt`. Adding an option is adding one
`Option(...)` line below (docs/design.md shows an example).

Groups: model and diffusion (what a checkpoint needs to be rebuilt; every script that loads
a checkpoint reads them from the run), train, methods (the paper's and its rivals'), eval
(FID during training), gpu (speed settings that do not change what is computed), run (where
and how a run starts and stops: not saved in config.json).
"""

import argparse
import json
import os
import signal

from .. import methods
from .option import Option, non_negative, open_unit_interval, positive, str2bool  # noqa: F401  (their home was here)

GROUPS = ("model", "diffusion", "train", "methods", "eval", "gpu", "run")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp64")
IMAGE_CHANNELS = (1, 3, 4)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "single")
# Values that a constructor checks (TrainConfig, MomentumSchedule, CLTSSampler) have no check
# here: image_train.py builds those before reading data, so they still fail early, once.
# Facts about a run written to config.json for other tools (image_sample.py reads
# data_num_classes); not options, so skipped when the file is read back as --config.
RUN_FACTS = ("data_num_classes",)
# A --config file may name another one to start from: {"base": "cifar10_baseline.json", ...}.
BASE_KEY = "base"


def _o(name, default, help, group, **kw):
    return Option(name, default, help, group, **kw)


def _relative_stds(text):
    """--phema_stds: what is wrong with a list of relative stds, or None (run/ema.py's range)."""
    try:
        stds = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        return "must be a comma-separated list of numbers"
    if not all(0.0 < x <= 0.3 for x in stds):
        return "values must be in (0, 0.3] (0.3003 is the widest power-function profile)"
    if len(set(stds)) != len(stds):
        return "lists a value twice"
    return None


def signal_name(name):
    """'term', 'TERM' or 'SIGTERM' -> 'SIGTERM' (--stop_signals)."""
    name = name.strip().upper()
    return name if name.startswith("SIG") else "SIG" + name


def _stop_signals(text):
    """--stop_signals: what is wrong with a list of signal names, or None (run/preemption.py)."""
    for name in filter(str.strip, str(text).split(",")):
        if signal_name(name) not in signal.Signals.__members__:
            return f"names no signal: {name.strip()!r} (e.g. TERM, USR1, INT)"
        if signal_name(name) in ("SIGKILL", "SIGSTOP"):
            return f"cannot catch {name.strip()}"
    return None


OPTIONS = [
    # ---- model and diffusion: improved-diffusion's keys and defaults (their order is the
    # original dict's), plus guided-diffusion's model keys at values that keep the
    # improved-diffusion architecture
    _o("image_size", 64, "image side length in pixels", "model", check=positive),
    _o("image_channels", 3, "channels of the images: 1 (grey), 3 (RGB) or 4 (RGBA); the data, the model's "
       "input and output and the samples all have this many", "model", choices=IMAGE_CHANNELS, in_defaults=False),
    _o("num_channels", 128, "base channel count of the UNet", "model", check=positive),
    _o("num_res_blocks", 2, "residual blocks per resolution", "model", check=positive),
    _o("num_heads", 4, "attention heads (used when num_head_channels is -1)", "model", check=positive),
    _o("num_heads_upsample", -1, "attention heads in the decoder; -1 = num_heads", "model"),
    _o("attention_resolutions", "16,8", "comma-separated resolutions (in pixels) with attention", "model"),
    _o("dropout", 0.0, "dropout probability in residual blocks", "model", check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
    _o("learn_sigma", False, "also predict the variance (doubles the output channels)", "diffusion"),
    _o("sigma_small", False, "fixed variance: posterior (small) instead of beta (large)", "diffusion"),
    _o("class_cond", False, "class-conditional model", "model"),
    _o("class_dropout_prob", 0.0, "classifier-free guidance: train with each label replaced by a learned null "
       "label with this probability (adds the null row to the label embedding; 0: off)", "model",
       check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)", in_defaults=False),
    _o("diffusion_steps", 1000, "number of diffusion steps T", "diffusion", check=positive),
    _o("noise_schedule", "linear", "beta schedule: linear or cosine", "diffusion", choices=("linear", "cosine")),
    _o("timestep_respacing", "", 'sampling steps, e.g. "250", "ddim50" or "10,15,20"; empty = all', "diffusion"),
    _o("use_kl", False, "train with the variational bound (rescaled KL) loss", "diffusion"),
    _o("predict_xstart", False, "predict x_0 instead of the noise", "diffusion"),
    _o("rescale_timesteps", True, "feed timesteps to the model scaled to [0, 1000)", "diffusion"),
    _o("rescale_learned_sigmas", True, "use the rescaled MSE (hybrid) loss with learned sigmas", "diffusion"),
    _o("use_checkpoint", False, "gradient checkpointing (less memory, more compute)", "model"),
    _o("use_scale_shift_norm", True, "FiLM-like scale/shift timestep conditioning", "model"),
    _o("num_head_channels", -1, "fixed channels per attention head; -1 = use num_heads", "model"),
    _o("channel_mult", "", "comma-separated channel multipliers per level; empty = by image_size", "model"),
    _o("resblock_updown", False, "use residual blocks for up/downsampling", "model"),
    _o("use_fp16", False, "the original's fp16 flag: fp16 autocast with loss scaling (= --precision fp16)", "model"),
    _o("use_new_attention_order", False, "split q/k/v before heads in attention", "model"),
    # ---- training: the original's flags first
    _o("data_dir", "", "image folder (recursive) or .npz of uint8 images to train on", "train"),
    methods.sampler_option(),
    _o("lr", 1e-4, "base learning rate", "train", check=positive, uses=(("classifier_train", 3e-4),)),
    _o("weight_decay", 0.0, "AdamW weight decay", "train", check=non_negative),
    _o("lr_anneal_steps", 0, "linear decay of the lr to 0 over this many steps (0: constant)", "train", check=non_negative),
    _o("lr_warmup_steps", 0, "linear lr warm-up: step k has lr x min(1, (k+1)/this) (0: off)", "train", check=non_negative),
    _o("ema_warmup", False, "ramp each EMA decay up as min(rate, (1+k)/(10+k)) at step k", "train"),
    _o("batch_size", 1, "images per rank per step (global batch = this x ranks)", "train",
       uses=(("classifier_train", 4),)),
    _o("microbatch", -1, "split each batch into pieces of this size to save memory (-1: off)", "train"),
    _o("ema_rate", "0.9999", "comma-separated EMA rates, one EMA checkpoint per rate", "train"),
    _o("phema_stds", "", "comma-separated relative stds of power-function EMAs (EDM2), each in (0, 0.3], "
       "tracked beside --ema_rate, e.g. 0.05,0.1 (empty: off; docs/methods.md)", "train", check=_relative_stds),
    _o("phema_snapshot_interval", 0, "steps between power-function EMA snapshots for scripts/posthoc_ema.py, "
       "never pruned (0: every --save_interval)", "train", check=non_negative),
    _o("log_interval", 10, "steps between metric dumps", "train"),
    _o("save_interval", 10000, "steps between checkpoints", "train"),
    _o("fp16_scale_growth", 1e-3, "fp16: the loss scale doubles after 1/this clean steps", "train"),
    _o("total_steps", 0, "stop after this many optimizer steps (0: --lr_anneal_steps, or never)", "train"),
    _o("precision", "auto", "fp32, bf16, fp16 or auto (training: bf16 on GPUs that have it, else fp32; "
       "sampling: fp32); fp64: a slow float64 reference run whose numbers do not depend on the CPU's kernels", "train", choices=PRECISIONS),
    _o("seed", 0, "seed of weights, data order, timesteps and noise", "train"),
    _o("grad_clip", 0.0, "clip the global gradient norm to this (0: off)", "train", check=non_negative),
    _o("keep_checkpoints", 0, "keep only the newest N checkpoints (0: all)", "train", check=non_negative),
    _o("max_nonfinite_steps", 20, "stop after this many non-finite steps in a row (checked at log intervals)",
       "train", check=positive),
    _o("random_flip", True, "random horizontal flips of training images", "train"),
    _o("adam_beta2", 0.999, "Adam's beta2", "train", check=open_unit_interval),
    # ---- the paper's methods and their rivals: each method declares its own options
    # (improved_diffusion/methods/, docs/methods.md)
    *methods.options(),
    # ---- FID during training
    _o("eval_interval", 0, "steps between FID evaluations of the first EMA (0: off)", "eval", check=non_negative),
    _o("eval_num_samples", 1000, "images sampled for each evaluation", "eval", check=positive),
    _o("eval_batch_size", 250, "sampling batch size per rank during evaluation", "eval", check=positive),
    _o("eval_ref_stats", "", "reference statistics .npz (scripts/fid.py ref) for --eval_interval", "eval"),
    _o("eval_respacing", "ddim50", "sampling steps during evaluation (e.g. ddim50, 100)", "eval"),
    _o("eval_metrics", "fid", "comma-separated metrics of each evaluation: fid, sfid, precision, recall, kid", "eval",
       check=lambda v: None if {m.strip() for m in v.split(",")} <= {"fid", "sfid", "precision", "recall", "kid"} else "must list only fid, sfid, precision, recall, kid"),
    _o("pr_mode", "adm", "precision and recall: adm (guided-diffusion's evaluator's float16 distances, as "
       "published numbers) or exact (float32)", "eval", choices=("adm", "exact")),
    _o("inception", "", "path of the Inception-v3 FID network (default: the bundled one)", "eval"),
    # ---- speed settings: what is computed stays the same
    _o("data_on_device", False, "copy the data set to the GPU once; batches are gathered and flipped there", "gpu"),
    _o("channels_last", False, "channels-last memory format (faster convolutions on GPUs)", "gpu"),
    _o("compile", False, "torch.compile the model", "gpu"),
    _o("compile_mode", "default", "torch.compile mode with --compile: default, reduce-overhead (CUDA graphs: "
       "fewer kernel launches), max-autotune-no-cudagraphs, max-autotune", "gpu", choices=COMPILE_MODES),
    _o("optimizer_impl", "auto", "AdamW kernel: auto (fused where torch has it, else foreach), fused, foreach, single",
       "gpu", choices=OPTIMIZER_IMPLS),
    _o("cudnn_benchmark", False, "let cuDNN time its convolution algorithms for each shape (CUDA; "
       "faster, not bitwise reproducible)", "gpu"),
    # ---- where and how this run starts and stops, not what it trains: left out of
    # LOG_DIR/config.json, so that file reused as --config starts a new run
    _o("config", "", "JSON file of option values; command-line flags override it", "run"),
    _o("log_dir", "", "where logs and checkpoints go (default $OPENAI_LOGDIR, else runs/<time>)", "run"),
    _o("resume", "auto", "auto (newest intact checkpoint in --log_dir), none, or a checkpoint path", "run"),
    _o("resume_checkpoint", "", "a modelNNNNNN.pt to resume from (same as --resume PATH)", "run"),
    _o("stop_at", 0, "leave this run at this step with a checkpoint; schedules keep --total_steps (0: off)", "run",
       check=non_negative),
    _o("dry_run", False, "print the effective options and exit", "run"),
    _o("stop_signals", "TERM,USR1", "signals that make every rank save a checkpoint at one agreed step and exit "
       "with code 75 (EX_TEMPFAIL; scripts/launch/slurm.sbatch requeues on it; docs/multinode.md); '': off",
       "run", check=_stop_signals),
    _o("save_minutes", 0.0, "also save a checkpoint every this many minutes (rank 0's clock; 0: off)", "run",
       check=non_negative),
    _o("dist_timeout", 1800, "seconds a collective waits for the other ranks before the job stops with an error "
       "naming the timeout (gloo and NCCL; also the wait for all ranks to join)", "run", check=positive),
]

BY_NAME = {o.name: o for o in OPTIONS}
assert len(BY_NAME) == len(OPTIONS), "an option is defined twice"
assert all(o.group in GROUPS for o in OPTIONS)

# Options of the other scripts (evaluation, study, benchmarks, reports, the classifier, the GAN
# and super-resolution), not of a diffusion training run: a table of their own, so that
# image_train.py's flags and config.json stay as they are. A group is one script's (the
# classifier's: classifier_train.py's and classifier_sample.py's), so a name may come back in
# another group with another meaning: a tool's --batch_size is not the training one.
# add_options(..., table=TOOLS["fid"]).
TOOL_GROUPS = ("fid", "study", "summarize", "benchmark", "benchmark_metrics", "classifier", "classifier_train",
               "config_flags", "demo_report", "digit_score", "gan_train", "plot_curves", "soak_kill", "super_res",
               "posthoc_ema")
TOOL_OPTIONS = [
    _o("batch_size", 64, "images per forward pass", "fid"),
    _o("device", "", "cpu, cuda, cuda:1 (default: cuda if present)", "fid"),
    _o("image_size", None, "resize/center-crop images read from a folder to this size (needed for a folder; a "
       "reference .npz is used as is without it, a samples .npz always)", "fid", argparse_kw=(("type", int),)),
    _o("max_images", 0, "use a fixed random subset of this many images (0: all)", "fid"),
    _o("metrics", "", "comma-separated metrics among fid, sfid, precision, recall, kid (default: every one the "
       "reference file allows)", "fid"),
    _o("num_samples", 0, "use only the first N samples (0: all)", "fid"),
    _o("ref_source", "", "reference images (folder or .npz): precision, recall and KID against their features "
       "instead of the reference file's pool_features", "fid"),
    _o("logits_network", "", "classifier for the Inception Score: TorchScript, or a torchvision inception_v3 state "
       "dict, fed as the Inception network (299x299, [-1, 1])", "fid", argparse_kw=(("metavar", "PATH"),)),
    _o("out", "", "also write the JSON result to this file", "fid"),
    _o("kid_subsets", 100, "KID: number of subsets", "fid", check=positive),
    _o("kid_subset_size", 1000, "KID: subset size", "fid", check=positive),
    _o("keep_features", 10000, "pooled feature rows stored for precision, recall and KID, a fixed random subset "
       "of the images (0: all; float16, 4 KB a row)", "fid", check=non_negative),
    _o("pr_mode", "adm", "precision and recall: adm (guided-diffusion's evaluator's float16 distances, as "
       "published numbers) or exact (float32)", "fid", choices=("adm", "exact")),
    _o("adm_compatible", False, "also store the images as arr_0, so that guided-diffusion's evaluations/"
       "evaluator.py reads the file as a reference batch", "fid"),
    _o("preset", "cpu", "the study's setting (improved_diffusion/experiments/study.py PRESETS)", "study",
       choices=("cpu", "digits", "digits_paper", "gpu", "paper", "paper_imagenet128")),
    _o("out", "", "summaries (default docs/study/PRESET)", "study"),
    _o("runs_dir", "", "training runs (default runs/study/PRESET)", "study"),
    _o("variants", ",".join(methods.variants()), "comma-separated; empty: none", "study"),
    _o("seeds", "", "comma-separated seeds (default: the preset's)", "study"),
    _o("sweep_seeds", "", "seeds of the sweeps (default: the preset's)", "study"),
    _o("steps", 0, "override the preset's steps (eval steps scale along)", "study", check=non_negative),
    _o("fid_steps", "", "comma-separated steps with FID (default: the preset's; 'none': no FID)", "study"),
    _o("fid_samples", 0, "samples per FID (default: the preset's)", "study", check=non_negative),
    _o("quality_samples", 0, "samples per digit-classifier evaluation (default: the preset's)", "study",
       check=non_negative),
    _o("data", "", "the data .npz (default: the preset's)", "study"),
    _o("holdout", -1, "images held out at the end of --data (default: the preset's)", "study"),
    _o("extra_flags", "", "extra image_train.py flags for every run (tests)", "study"),
    _o("parallel", 1, "runs at once, each trained and evaluated by its own process on one thread (a 2-core "
       "machine: 2; a GPU: as many small runs as fit)", "study", check=positive),
    _o("run_index", -1, "run only this entry of the plan (--plan's order); what --parallel's workers do", "study"),
    _o("sweeps", "", "also run sweeps: all, or comma-separated of clts_sigma, clts_mu, md_beta_min, baseline_lr",
       "study",
       argparse_kw=(("nargs", "?"), ("const", "all"))),
    _o("baseline", "baseline", "the run whose final FID the others are measured against", "summarize"),
    _o("runs", "", "comma-separated run names (default: runs.tsv, else every sub-folder with a progress.csv)",
       "summarize"),
    _o("config", "cifar10", "cifar10, imagenet128, demo (their _all variants), a name in configs/, or a JSON path; "
       "the table's flags below override it", "benchmark"),
    _o("sample_batch_size", 0, "images per sampling forward (0: --batch_size)", "benchmark"),
    _o("device", "", "cuda, cuda:1, cpu, ... (default: cuda when available)", "benchmark"),
    _o("attention_backend", "auto", "SDPA kernel via torch.nn.attention.sdpa_kernel; on CPU only auto, math, flash",
       "benchmark", choices=("auto", "math", "flash", "efficient", "cudnn")),
    _o("steps", 20, "timed steps (training) and timed forwards (sampling)", "benchmark"),
    _o("warmup", 3, "untimed steps first (compilation, allocator, autotuning)", "benchmark"),
    _o("overhead_iters", 2000, "calls timed for the CLTS / MDLRC overhead", "benchmark"),
    _o("parts", "train,sample,overhead", "comma-separated subset of train,sample,overhead; 'flops' alone only "
       "counts FLOPs", "benchmark"),
    _o("peak_tflops", 0.0, "peak TFLOP/s for MFU (0: 989 on CUDA, the H100 SXM / H200 dense bf16 peak; none on CPU)", "benchmark"),
    _o("threads", 0, "torch.set_num_threads (0: leave torch's default)", "benchmark"),
    _o("compare", False, "run the plain fp32 path and the fast path in one process and print the ratio (their "
       "settings replace --precision, --channels_last, --optimizer_impl and --compile)", "benchmark"),
    _o("json", "", "also write the JSON result to this file", "benchmark"),
    _o("sample_images", 0, "also time improved_diffusion.evaluation.sampling.sample_images (what image_sample.py "
       "runs) for this many DDIM-50 images at --sample_batch_size, end to end (0: off)", "benchmark"),
    _o("profile_steps", 0, "profile this many training steps of the last run with torch.profiler: kernels per "
       "step, device-busy share of the step, top kernels (0: off)", "benchmark"),
    _o("profile_out", "", "write the profiler's kernel table to this text file", "benchmark"),
    _o("num", 50000, "feature rows in each set", "benchmark_metrics"),
    _o("dim", 2048, "feature dimension", "benchmark_metrics"),
    _o("block_size", 4096, "rows and columns of each block of distances", "benchmark_metrics"),
    _o("device", "cpu", "where the distances are computed", "benchmark_metrics"),
    _o("pr_mode", "exact", "exact (float32) or adm (guided-diffusion's evaluator's float16 arithmetic)",
       "benchmark_metrics", choices=("adm", "exact")),
    # the noise-aware classifier: guided-diffusion's keys and values (script_util.classifier_defaults,
    # with the table's --image_size), then three of ours (CLASSIFIER_EXTRA_DEFAULTS)
    _o("classifier_use_fp16", False, "fp16 autocast with loss scaling (= --precision fp16)", "classifier"),
    _o("classifier_width", 128, "base channel count of the classifier", "classifier"),
    _o("classifier_depth", 2, "residual blocks per resolution", "classifier"),
    _o("classifier_attention_resolutions", "32,16,8", "comma-separated resolutions (in pixels) with attention",
       "classifier"),
    _o("classifier_use_scale_shift_norm", True, "FiLM-like scale/shift timestep conditioning", "classifier"),
    _o("classifier_resblock_updown", True, "downsample with residual blocks", "classifier"),
    _o("classifier_pool", "attention", "the head: attention, adaptive, spatial or spatial_v2", "classifier"),
    _o("classifier_channel_mult", "", "channel multipliers per level; empty = by image size (64, 128, 256, 512; "
       "32)", "classifier", in_defaults=False),
    _o("classifier_num_head_channels", 64, "channels per attention head", "classifier", in_defaults=False),
    _o("classifier_num_classes", 1000, "number of logits (at least the number of classes in the data)",
       "classifier", in_defaults=False),
    _o("data_dir", "", "labelled training images: a folder (class = file-name prefix) or an .npz with arr_1",
       "classifier_train"),
    _o("val_data_dir", "", "labelled validation images; one batch every --eval_interval steps", "classifier_train"),
    _o("noised", True, "train on images noised by the diffusion at uniformly drawn timesteps (False: clean, t = 0)",
       "classifier_train"),
    _o("iterations", 150000, "total optimizer steps", "classifier_train"),
    _o("anneal_lr", False, "decay the lr linearly to 0 over --iterations", "classifier_train"),
    _o("microbatch", -1, "split each batch into pieces of this size (-1: off); the update is the same",
       "classifier_train"),
    _o("schedule_sampler", "uniform", "timestep sampler for --noised: uniform (the original's), ...",
       "classifier_train"),
    _o("resume_checkpoint", "", "a modelNNNNNN.pt to start from (its optNNNNNN.pt too, when beside it)",
       "classifier_train"),
    _o("eval_interval", 5, "steps between validation batches", "classifier_train"),
    _o("log_dir", "", "where logs and checkpoints go (default $OPENAI_LOGDIR, else runs/classifier)",
       "classifier_train"),
    _o("resume", "auto", "auto: continue from the newest intact checkpoint in --log_dir; none: start afresh",
       "classifier_train"),
    _o("precision", "auto", "fp32, bf16, fp16 or auto (bf16 on GPUs that have it, else fp32)", "classifier_train"),
    _o("random_flip", False, "random horizontal flips of training images (the original flipped; off by default "
       "here, as flips change some classes, e.g. digits)", "classifier_train"),
    _o("stop_at", 0, "leave the run at this step with a checkpoint; --anneal_lr keeps --iterations (0: off)",
       "classifier_train"),
    _o("exclude", "", "comma-separated keys to leave out", "config_flags"),
    _o("get", "", "print the value of one key of the config ('' when absent)", "config_flags",
       argparse_kw=(("metavar", "KEY"),)),
    _o("sampling", "DDPM, 100 steps", "how the samples were drawn, for the titles", "demo_report"),
    _o("seconds", None, "wall-clock time of this invocation of the demo", "demo_report",
       argparse_kw=(("type", float),)),
    _o("stages", "", "NAME=SECONDS,... per stage of this invocation", "demo_report"),
    _o("samples", None, "a sample .npz to score (arr_0 uint8 NHWC)", "digit_score", argparse_kw=(("type", str),)),
    _o("threshold", 0.9, "top-class probability that counts as recognisable", "digit_score"),
    _o("json", None, "also write the result to this JSON file", "digit_score", argparse_kw=(("type", str),)),
    _o("data_dir", "", "image folder or .npz of uint8 images (the demo: data/demo/mnist_demo.npz)", "gan_train"),
    _o("log_dir", "", "run folder: checkpoints, gan_config.json, progress, samples.png (run again to continue)",
       "gan_train"),
    _o("image_size", 0, "image side, a power of two >= 8 (0: the .npz's own size)", "gan_train"),
    _o("seed", 0, "seed of the initial weights, the data order and the latents", "gan_train"),
    _o("total_steps", 1000, "training steps (one discriminator and one generator update each)", "gan_train"),
    _o("batch_size", 64, "images per step", "gan_train"),
    _o("lr", 2e-4, "Adam learning rate of both networks", "gan_train"),
    _o("beta1", 0.5, "Adam beta1 (DCGAN: 0.5)", "gan_train"),
    _o("beta2", 0.999, "Adam beta2", "gan_train"),
    _o("latent_dim", 64, "dimension of the latent z", "gan_train"),
    _o("g_width", 64, "generator width (channels of its last hidden layer)", "gan_train"),
    _o("d_width", 64, "discriminator width (channels of its first layer)", "gan_train"),
    _o("save_interval", 250, "steps between checkpoints (the last step is always saved)", "gan_train"),
    _o("log_interval", 100, "steps between progress rows", "gan_train"),
    _o("grid_images", 64, "images in samples.png", "gan_train"),
    _o("grid_seed", 0, "latent seed of samples.png", "gan_train"),
    _o("out", "", "output PNG (default: curves.png in the first run's folder)", "plot_curves"),
    _o("names", "", "comma-separated run names (default: directory names)", "plot_curves"),
    _o("smooth", 0.9, "EMA factor for the loss curve, in [0, 1)", "plot_curves"),
    _o("loss_key", "loss", "progress.csv column for the loss", "plot_curves"),
    _o("fid_key", "fid", "progress.csv column for FID", "plot_curves"),
    _o("kills", 20, "SIGKILLs to deliver before letting the run finish", "soak_kill"),
    _o("steps", 200, "training steps of the run", "soak_kill"),
    _o("out", "runs/soak", "work folder (emptied first)", "soak_kill"),
    _o("seed", 0, "seed of the kill moments", "soak_kill"),
    # super-resolution (super_res_train.py; script_util.sr_model_and_diffusion_defaults)
    _o("large_size", 256, "side of the generated (high-resolution) images", "super_res"),
    _o("small_size", 64, "side of the low-resolution condition", "super_res"),
    # post-hoc EMA (scripts/posthoc_ema.py; improved_diffusion/run/posthoc_ema.py)
    _o("run", "", "the run folder (--log_dir of a run trained with --phema_stds)", "posthoc_ema",
       check=lambda v: None if v else "is required"),
    _o("std", None, "relative std of the EMA to rebuild, in (0, 0.3]", "posthoc_ema", argparse_kw=(("type", float),),
       check=lambda v: "is required" if v is None else None if 0 < v <= 0.3 else "must be in (0, 0.3]"),
    _o("step", None, "the saved step to rebuild it at (a snapshot's or a checkpoint's; default: the newest)",
       "posthoc_ema", argparse_kw=(("type", int),), check=lambda v: None if v is None or v > 0 else "must be positive"),
    _o("out", "", "the .pt to write (default RUN/ema_std{STD}_{STEP}.pt); its folder gets the run's config.json",
       "posthoc_ema"),
]
TOOLS = {group: {o.name: o for o in TOOL_OPTIONS if o.group == group} for group in TOOL_GROUPS}
assert sum(map(len, TOOLS.values())) == len(TOOL_OPTIONS), "a tool option is defined twice, or has no group"

# Options of the scripts that use a trained model: sampling (image_sample.py,
# classifier_sample.py, super_res_sample.py) and analysis (consistency.py, image_nll.py,
# hessian.py, interpolate.py). A table of their own, like the tools': a sampling --batch_size
# (images per forward pass) is not the training one. Where a script's default differs, the
# option says so in `uses` (`add_options(..., table=SAMPLING, use="consistency")`).
SAMPLE_GROUPS = ("sample", "analysis")
_FOR_ANALYSIS = (("hessian", "hessian_out"), ("interpolate", "interpolation_out"), ("consistency", "consistency_out"))
SAMPLE_OPTIONS = [
    _o("model_path", "", "checkpoint to load (modelNNNNNN.pt, ema_RATE_NNNNNN.pt or released weights)", "sample"),
    _o("num_samples", 10000, "images to generate over all processes (image_nll.py: data images to score, 0: all)",
       "sample", uses=(("consistency", 32), ("image_nll", 1000))),
    _o("batch_size", 16, "images per forward pass in each process (hessian.py, interpolate.py: the fixed batch)",
       "sample", uses=(("image_nll", 1), ("interpolate", 64))),
    _o("use_ddim", False, "sample with DDIM (use with --timestep_respacing ddimN)", "sample"),
    _o("eta", 0.0, "DDIM eta (0 = deterministic DDIM)", "sample"),
    _o("clip_denoised", True, "clip the predicted x_0 to [-1, 1] at every step", "sample"),
    _o("seed", 0, "sampling seed: sample i gets its own seed derived from it (analysis: the fixed batch's "
       "timesteps and noise)", "sample"),
    _o("num_classes", 0, "classes to draw labels from (class_cond); 0: data_num_classes of the run's "
       "config.json, else 1000", "sample"),
    _o("out", "", "output: the samples' .npz or a folder for samples_NxHxWxC.npz (default: the checkpoint's "
       "folder); analysis: the result folder (image_nll.py: the JSON result, default OUT_DIR/nll.json)",
       "sample", uses=_FOR_ANALYSIS),
    _o("grid", "", "PNG grid path; 'none': no grid; empty: next to the .npz", "sample"),
    _o("grid_size", 64, "number of images in the grid", "sample"),
    _o("log_dir", "", "folder for the default output; empty: $OPENAI_LOGDIR, else the checkpoint's folder", "sample"),
    _o("device", "", "cpu, cuda, cuda:1; empty: this rank's GPU if any, else cpu", "sample"),
    _o("guidance_scale", 0.0, "classifier-free guidance w: eps = (1 + w) eps(x, y) - w eps(x, null) (a model "
       "trained with --class_dropout_prob > 0; 0: off, -1: unconditional)", "sample"),
    _o("classifier_path", "", "classifier checkpoint (classifier_train.py's modelNNNNNN.pt, or a released one)",
       "sample"),
    _o("classifier_scale", 1.0, "the guidance scale s: the gradient of s log p(y | x_t) is added", "sample"),
    _o("base_samples", "", ".npz of low-resolution uint8 images (arr_0) and labels (arr_1, class_cond)", "sample"),
    _o("large_size", 0, "side of the output images; 0: the run's (config.json), else 256", "sample"),
    _o("small_size", 0, "side of the base samples; 0: the run's (config.json), else 64", "sample"),
    # ---- analysis of trained models (paper section 3; docs/analysis.md)
    _o("data_dir", "", "image folder or .npz (arr_0 uint8 NHWC): the images scored (image_nll.py), or whose "
       "first --batch_size form the fixed batch (hessian.py, interpolate.py)", "analysis"),
    _o("out_dir", "", "where image_nll.py writes nll.json and the *_terms.npz files; empty: $OPENAI_LOGDIR, "
       "else the checkpoint's folder", "analysis"),
    _o("timestep", -1, "use this timestep for every image (-1: uniform random, fixed by --seed)", "analysis"),
    _o("model_paths", "", "comma-separated checkpoints, one per model (at least two); GANs: ganNNNNNN.pt or "
       "gan:PATH", "analysis"),
    _o("model_a", "", "checkpoint at alpha = 0 (diffusion, or a GAN: ganNNNNNN.pt or gan:PATH)", "analysis"),
    _o("model_b", "", "checkpoint at alpha = 1 (same architecture)", "analysis"),
    _o("names", "", "comma-separated labels of the models or of the --compare files (default: file or "
       "folder names)", "analysis"),
    _o("compare", "", "comma-separated result .json files to plot side by side (nothing else runs)", "analysis"),
    _o("alphas", "", "explicit comma-separated alphas (write --alphas=-0.5,0,...); overrides the grid", "analysis"),
    _o("alpha_min", -0.5, "first alpha of the default grid", "analysis"),
    _o("alpha_max", 1.5, "last alpha of the default grid", "analysis"),
    _o("num_alphas", 21, "number of points of the default grid", "analysis"),
    _o("top_k", 5, "number of top eigenvalues (lambda_1 .. lambda_k)", "analysis"),
    _o("iters", 0, "Lanczos steps, at least top_k (0: max(3 top_k, 20))", "analysis"),
    _o("method", "both", "lanczos, power or both", "analysis"),
    _o("power_iters", 200, "maximum power-iteration steps", "analysis"),
    _o("tol", 1e-6, "power iteration stops when the eigenvalue changes by less than tol (relative)", "analysis"),
    _o("density", False, "also estimate the spectral density by stochastic Lanczos quadrature", "analysis"),
    _o("density_iters", 50, "Lanczos steps per SLQ probe", "analysis"),
    _o("density_runs", 1, "number of SLQ probe vectors", "analysis"),
    _o("lanczos_dtype", "float64", "float64 or float32 for the Lanczos / power vectors", "analysis"),
    _o("gan_loss", "generator", "for a GAN checkpoint: generator (L_G, generator parameters) or discriminator "
       "(L_D, its parameters)", "analysis"),
    _o("cap_db", 100.0, "cap for the PSNR of identical images (infinite otherwise)", "analysis"),
    _o("grid_images", 8, "images per model shown in consistency.png", "analysis"),
    _o("model_flags", [], "per-model flag overrides, one quoted string or .json file per model (or one for all); "
       'e.g. --model_flags "--num_channels 64" "--num_channels 32"', "analysis",
       argparse_kw=(("nargs", "+"), ("type", str))),
]
SAMPLING = {o.name: o for o in SAMPLE_OPTIONS}
assert len(SAMPLING) == len(SAMPLE_OPTIONS) and all(o.group in SAMPLE_GROUPS for o in SAMPLE_OPTIONS)


def names(*groups):
    """Option names of `groups` (all when none given), in table order."""
    return [o.name for o in OPTIONS if not groups or o.group in groups]


def defaults(*groups):
    """{name: default} of `groups` (all when none given), in table order; options marked
    `in_defaults=False` are left out."""
    return {o.name: o.default for o in OPTIONS if (not groups or o.group in groups) and o.in_defaults}


MODEL_GROUPS = ("model", "diffusion")


def add_options(parser, option_names, title=None, table=None, use=None):
    """One `--name` flag per option of `table` (default: the training table), typed, with
    the table's help text and choices, and its default for `use` (a script's name, see
    `Option.uses`)."""
    target = parser.add_argument_group(title) if title else parser
    for name in option_names:
        o = (BY_NAME if table is None else table)[name]
        kwargs = dict(o.argparse_kw, default=o.default_for(use), type=o.parse, help=f"{o.help} (default: %(default)r)")
        if o.choices:
            kwargs["choices"] = o.choices
        target.add_argument(f"--{name}", **kwargs)



def add_model_options(parser, weights_flag="model_path"):
    """The model and diffusion flags of a script that loads trained weights; `parse` fills
    the ones not given from the run's config.json beside `--weights_flag`."""
    add_options(parser, names(*MODEL_GROUPS), "model and diffusion (default: the training run's config.json "
                f"beside --{weights_flag})")

def validate(values):
    """Each option's own check, for every known key of `values`; ValueError naming the flag."""
    for name, value in values.items():
        if name in BY_NAME:
            BY_NAME[name].validate(value)


def coerce(name, value, where):
    """A JSON value as the option's type (ints for floats are fine), else ValueError naming `where`."""
    o = BY_NAME[name]
    try:
        if isinstance(o.default, bool):
            if not isinstance(value, bool):
                value = str2bool(value)
        elif isinstance(o.default, float):
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
        elif isinstance(o.default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = int(value)
        else:
            value = "" if value is None else str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{where}: {name} must be a {type(o.default).__name__}, got {value!r}") from None
    return value


def read_options_file(path, _seen=()):
    """
    A JSON object of option values from `path` (a --config file or a run's config.json).
    A `"base": "other.json"` entry (relative to this file) is read first and overlaid by
    this file's values, so an experiment variant lists only what differs from its base.
    ValueError naming the file when it is missing, not JSON, not an object, or loops.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of option values")
    base = values.pop(BASE_KEY, None)
    if base is None:
        return values
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), str(base))
    if os.path.abspath(base_path) in _seen:
        raise ValueError(f"{path}: its \"base\" chain comes back to {base_path}")
    merged = read_options_file(base_path, _seen + (os.path.abspath(path),))
    merged.update(values)
    return merged


def load_config(path, allowed):
    """The options of a --config file (or config.json), checked against `allowed` names and types."""
    values = {k: v for k, v in read_options_file(path).items() if k not in RUN_FACTS}
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return {k: coerce(k, v, path) for k, v in values.items()}


def run_config_path(checkpoint_path):
    """The training run's config.json: image_train.py writes it beside its checkpoints (a
    run folder's own, when `checkpoint_path` is the folder)."""
    if os.path.isdir(checkpoint_path):
        return os.path.join(os.path.abspath(checkpoint_path), "config.json")
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "config.json")


def parse(parser, argv=None, checkpoint_flag=None, inherit=MODEL_GROUPS):
    """
    Parse `argv` with layered defaults: the table's < the run's config.json beside the
    checkpoint named by `checkpoint_flag` (its `inherit` groups only) < the `--config` file <
    the command line. A --config file may hold any option of the table (a run's config.json
    works); those this parser lacks are ignored, names the table does not know are an error.
    Every known option is validated.

    :return: (args, run_config): run_config is the checkpoint's config.json as read, or None.
    """
    pre, _ = parser.parse_known_args(argv)
    known = {a.dest for a in parser._actions}
    run_config = None
    layered = {}
    checkpoint = getattr(pre, checkpoint_flag, "") if checkpoint_flag else ""
    if checkpoint and os.path.isfile(run_config_path(checkpoint)):
        run_config = read_options_file(run_config_path(checkpoint))
        inherited = set(names(*inherit)) & known
        layered.update({k: coerce(k, v, run_config_path(checkpoint)) for k, v in run_config.items() if k in inherited})
    if getattr(pre, "config", ""):
        values = load_config(pre.config, BY_NAME)
        layered.update({k: v for k, v in values.items() if k in known})
    if layered:
        parser.set_defaults(**layered)
    args = parser.parse_args(argv)
    validate(vars(args))
    return args, run_config


def explicit_flags(argv):
    """Option names given on a command line (`--name value` or `--name=value`)."""
    return {w[2:].split("=", 1)[0] for w in (argv or []) if w.startswith("--") and len(w) > 2}


def saved_options(values):
    """What config.json keeps of a run's options: everything but the run group."""
    return {k: v for k, v in values.items() if not (k in BY_NAME and BY_NAME[k].group == "run")}


def help_text(names_):
    """`--name (default): help` lines by group, for docs/train-help.txt and the launch helpers."""
    lines = []
    for group in GROUPS:
        rows = [BY_NAME[n] for n in names_ if BY_NAME[n].group == group]
        if rows:
            lines.append(f"{group}:")
            lines += [f"  --{o.name} ({o.default!r}): {o.help}" for o in rows]
    return "\n".join(lines)
