#!/usr/bin/env bash
# The paper's ImageNet-128 experiment (Guided-Diffusion settings, SPEC section 3): one variant.
#
#   scripts/launch/imagenet128.sh VARIANT [extra image_train.py flags...]
#
# VARIANT: baseline, md, md_lrc, clts or all (configs/imagenet128_VARIANT.json): 128x128,
# class-conditional, linear schedule with T = 1000, 256 channels, 2 res blocks, attention at
# 32,16,8 with 4 heads, resblock up/down, scale-shift norm, learned sigmas, AdamW lr 1e-4,
# global batch 256 (32 per GPU on 8 GPUs), EMA 0.9999; CLTS mu 0.3, K_target 100k.
# Trains with FID of the EMA model every EVAL_INTERVAL steps, then samples NUM_SAMPLES images
# with 250 respaced steps and computes their FID (scripts/launch/train.sh does the work).
#
# Environment (besides train.sh's: NGPUS, LAUNCHER, EVAL_*, NUM_SAMPLES, SAMPLE_*, ...):
#   DATA_DIR      training images                          (data/imagenet128/train.npz)
#   REF_STATS     FID reference statistics; empty: no FID  (data/imagenet128_ref.npz)
#   GLOBAL_BATCH  global batch size                        (256)
#   LOG_DIR       run directory                            (runs/imagenet128_VARIANT)
#
#   NGPUS=8 scripts/launch/imagenet128.sh all
#   NGPUS=4 LAUNCHER=torchrun scripts/launch/imagenet128.sh baseline --total_steps 500000
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && show_help "${BASH_SOURCE[0]}"
if (( $# < 1 )); then
    echo "[imagenet128.sh] error: missing VARIANT" >&2
    print_usage "${BASH_SOURCE[0]}"
    exit 2
fi
paper_experiment imagenet128 "$@"
