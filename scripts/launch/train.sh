#!/usr/bin/env bash
# Train one variant, sample from its final EMA checkpoint, and score the samples with FID.
#
#   scripts/launch/train.sh VARIANT_CONFIG DATA_DIR LOG_DIR [extra image_train.py flags...]
#
#   GLOBAL_BATCH=128 REF_STATS=data/cifar10_ref.npz \
#       scripts/launch/train.sh configs/cifar10_all.json data/cifar10/train runs/cifar10_all
#
# Steps (each command is echoed before it runs):
#   1. train:  mpiexec -n $NGPUS python scripts/image_train.py --config VARIANT_CONFIG
#              --data_dir DATA_DIR --log_dir LOG_DIR [--batch_size GLOBAL_BATCH/NGPUS]
#              [--eval_interval ... --eval_ref_stats REF_STATS ...] [extra flags]
#              Re-running the same command resumes (--resume auto) and then goes on.
#   2. sample: image_sample.py on the newest intact EMA checkpoint (first EMA rate), with the
#              model flags read back from LOG_DIR/config.json, into LOG_DIR/samples/
#   3. fid:    scripts/fid.py fid against REF_STATS (skipped without REF_STATS)
# Steps 2-3 are skipped when their output exists already, with NUM_SAMPLES=0, and when the
# extra flags hold --stop_at or --dry_run True.
#
# Environment:
#   NGPUS            processes, one per GPU; 1 = plain python, no launcher     (8)
#   LAUNCHER         mpiexec or torchrun                                        (mpiexec)
#   GLOBAL_BATCH     global batch; sets the per-rank --batch_size to GLOBAL_BATCH / NGPUS
#                    (must divide); unset: the config's batch_size (per rank)
#   REF_STATS        reference statistics .npz (scripts/fid.py ref): FID during training
#                    and of the final samples; unset or empty: no FID
#   EVAL_INTERVAL    steps between FID evaluations   (the config's eval_interval, else 10000)
#   EVAL_SAMPLES     images per evaluation           (the config's eval_num_samples, else 10000)
#   EVAL_BATCH, EVAL_RESPACING   --eval_batch_size / --eval_respacing when set
#   NUM_SAMPLES      final samples; 0 skips steps 2-3                          (50000)
#   SAMPLE_RESPACING --timestep_respacing of the final samples; ddimN uses DDIM (250)
#   SAMPLE_BATCH     sampling batch per process                                 (256)
#   SAMPLE_SEED      sampling seed                                              (0)
#   SAMPLE_PRECISION fp32, bf16 or fp16 autocast while sampling                 (fp32)
#   INCEPTION        TorchScript Inception file for FID (default: the bundled one)
#   SAMPLE_FLAGS, FID_FLAGS   extra image_sample.py / fid.py flags, word-split
#   PYTHON, MPIEXEC, MPI_FLAGS, TORCHRUN, TORCHRUN_FLAGS   see scripts/launch/lib.sh
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { print_usage "${BASH_SOURCE[0]}"; exit 2; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && show_help "${BASH_SOURCE[0]}"
if (( $# < 3 )); then
    echo "[train.sh] error: missing arguments (need VARIANT_CONFIG DATA_DIR LOG_DIR)" >&2
    usage
fi
CONFIG="$1" DATA="$2" LOG_DIR="$3"
shift 3
EXTRA=("$@")

NGPUS="${NGPUS:-8}"
is_int "$NGPUS" && (( NGPUS >= 1 )) || die "NGPUS must be a positive integer, got '$NGPUS'"
export NGPUS
REF_STATS="${REF_STATS:-}"
[[ -f "$CONFIG" ]] || die "config not found: $CONFIG"
[[ "$DATA" == *://* || -e "$DATA" ]] || die "data not found: $DATA (an image folder or .npz; see datasets/README.md)"
[[ -z "$REF_STATS" || -f "$REF_STATS" ]] || die "REF_STATS not found: $REF_STATS (make it with scripts/fid.py ref)"

stop_early=""
for ((i = 0; i < ${#EXTRA[@]}; i++)); do
    case "${EXTRA[i]}" in
        --stop_at|--stop_at=*) stop_early="--stop_at" ;;
        --dry_run) [[ "${EXTRA[i+1]:-}" =~ ^([Tt]rue|1|[Yy]es|[Yy])$ ]] && stop_early="--dry_run" ;;
        --dry_run=*) [[ "${EXTRA[i]#*=}" =~ ^([Tt]rue|1|[Yy]es|[Yy])$ ]] && stop_early="--dry_run" ;;
    esac
done

# ---------------------------------------------------------------- 1. train
TRAIN_ARGS=(--config "$CONFIG" --data_dir "$DATA" --log_dir "$LOG_DIR")
if [[ -n "${GLOBAL_BATCH:-}" ]]; then
    is_int "$GLOBAL_BATCH" && (( GLOBAL_BATCH >= 1 )) || die "GLOBAL_BATCH must be a positive integer, got '$GLOBAL_BATCH'"
    (( GLOBAL_BATCH % NGPUS == 0 )) || \
        die "GLOBAL_BATCH=$GLOBAL_BATCH is not divisible by NGPUS=$NGPUS (the per-rank batch must be a whole number)"
    TRAIN_ARGS+=(--batch_size "$((GLOBAL_BATCH / NGPUS))")
    log "global batch $GLOBAL_BATCH = $NGPUS process(es) x $((GLOBAL_BATCH / NGPUS))"
fi
if [[ -n "$REF_STATS" ]]; then
    cfg_interval="$(config_get "$CONFIG" eval_interval)"
    cfg_samples="$(config_get "$CONFIG" eval_num_samples)"
    [[ "$cfg_interval" == "0" ]] && cfg_interval=""
    TRAIN_ARGS+=(--eval_interval "${EVAL_INTERVAL:-${cfg_interval:-10000}}"
                 --eval_ref_stats "$REF_STATS"
                 --eval_num_samples "${EVAL_SAMPLES:-${cfg_samples:-10000}}")
    [[ -n "${EVAL_BATCH:-}" ]] && TRAIN_ARGS+=(--eval_batch_size "$EVAL_BATCH")
    [[ -n "${EVAL_RESPACING:-}" ]] && TRAIN_ARGS+=(--eval_respacing "$EVAL_RESPACING")
fi
[[ -n "${INCEPTION:-}" ]] && TRAIN_ARGS+=(--inception "$INCEPTION")

log "== 1/3 train: $CONFIG -> $LOG_DIR ($NGPUS process(es))"
launch "$REPO/scripts/image_train.py" "${TRAIN_ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}

NUM_SAMPLES="${NUM_SAMPLES:-50000}"
is_int "$NUM_SAMPLES" || die "NUM_SAMPLES must be a whole number, got '$NUM_SAMPLES'"
if [[ -n "$stop_early" ]]; then
    log "$stop_early given: not sampling (run again without it to finish)"
    exit 0
fi
if (( NUM_SAMPLES == 0 )); then
    log "NUM_SAMPLES=0: no final samples"
    exit 0
fi

# ---------------------------------------------------------------- 2. sample
# "--model_path CKPT --image_size ..." (shell-quoted) from the run's checkpoints and config.json
flags_line="$("$PYTHON" "$LAUNCH_DIR/config_flags.py" "$LOG_DIR" --with_checkpoint --exclude timestep_respacing)"
eval "MODEL_FLAGS=($flags_line)"
CKPT="${MODEL_FLAGS[1]}"
RESPACING="${SAMPLE_RESPACING:-250}"
SAMPLE_ARGS=("${MODEL_FLAGS[@]}" --timestep_respacing "$RESPACING"
             --num_samples "$NUM_SAMPLES" --batch_size "${SAMPLE_BATCH:-256}"
             --seed "${SAMPLE_SEED:-0}" --precision "${SAMPLE_PRECISION:-fp32}")
[[ "$RESPACING" == ddim* ]] && SAMPLE_ARGS+=(--use_ddim True)
ckpt_name="$(basename "$CKPT" .pt)"
SAMPLES="$LOG_DIR/samples/${ckpt_name}_n${NUM_SAMPLES}_${RESPACING}_seed${SAMPLE_SEED:-0}.npz"
SAMPLE_ARGS+=(--out "$SAMPLES")

log "== 2/3 sample: $NUM_SAMPLES images from $CKPT, respacing $RESPACING"
if [[ -f "$SAMPLES" ]]; then
    log "samples exist already: $SAMPLES"
else
    # shellcheck disable=SC2086
    launch "$REPO/scripts/image_sample.py" "${SAMPLE_ARGS[@]}" ${SAMPLE_FLAGS:-}
fi

# ---------------------------------------------------------------- 3. fid
if [[ -z "$REF_STATS" ]]; then
    log "== 3/3 fid: skipped (REF_STATS not set)"
    log "done: samples $SAMPLES"
    exit 0
fi
FID_JSON="${SAMPLES%.npz}_fid.json"
log "== 3/3 fid: $SAMPLES vs $REF_STATS"
if [[ -f "$FID_JSON" ]]; then
    log "FID exists already: $FID_JSON"
    cat "$FID_JSON"; echo
else
    FID_ARGS=(fid --samples "$SAMPLES" --ref "$REF_STATS" --out "$FID_JSON")
    [[ -n "${INCEPTION:-}" ]] && FID_ARGS+=(--inception "$INCEPTION")
    # shellcheck disable=SC2086
    run "$PYTHON" "$REPO/scripts/fid.py" "${FID_ARGS[@]}" ${FID_FLAGS:-}
fi
log "done: samples $SAMPLES, FID $FID_JSON"
