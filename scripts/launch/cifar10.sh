#!/usr/bin/env bash
# The paper's CIFAR-10 experiment (Improved-Diffusion settings, SPEC section 3): one variant.
#
#   scripts/launch/cifar10.sh VARIANT [extra image_train.py flags...]
#
# VARIANT: baseline, md, md_lrc, clts or all (configs/cifar10_VARIANT.json): 32x32, cosine
# schedule with T = 4000, 128 channels, 3 res blocks, learned sigmas, dropout 0.3, AdamW lr 1e-4,
# global batch 128 (16 per GPU on 8 GPUs), EMA 0.9999; CLTS mu 0.3, K_target 100k.
# Trains with FID of the EMA model every EVAL_INTERVAL steps, then samples NUM_SAMPLES images
# with 250 respaced steps and computes their FID (scripts/launch/train.sh does the work).
#
# Environment (besides train.sh's: NGPUS, LAUNCHER, EVAL_*, NUM_SAMPLES, SAMPLE_*, ...):
#   DATA_DIR      training images                          (data/cifar10/train)
#   REF_STATS     FID reference statistics; empty: no FID  (data/cifar10_ref.npz)
#   GLOBAL_BATCH  global batch size                        (128)
#   LOG_DIR       run directory                            (runs/cifar10_VARIANT)
#
#   NGPUS=8 scripts/launch/cifar10.sh all
#   NGPUS=4 LAUNCHER=torchrun scripts/launch/cifar10.sh baseline --total_steps 200000
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && show_help "${BASH_SOURCE[0]}"
if (( $# < 1 )); then
    echo "[cifar10.sh] error: missing VARIANT" >&2
    print_usage "${BASH_SOURCE[0]}"
    exit 2
fi
paper_experiment cifar10 "$@"
