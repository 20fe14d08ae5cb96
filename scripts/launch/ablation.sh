#!/usr/bin/env bash
# Ablation runner: train several variants (or a sweep of one flag) with the same seed and step
# budget, then draw their loss and FID-vs-step curves side by side and summarise them.
#
#   scripts/launch/ablation.sh EXPERIMENT OUT_DIR [--variants LIST | --sweep KEY=V1,V2,...]
#                              [--base VARIANT] [--with_baseline] [--plan] [extra image_train.py flags...]
#
# EXPERIMENT: cifar10, imagenet128, demo or another NAME: its variants are the files
#   configs/NAME_VARIANT.json, each an overlay of the experiment's base config, trained with
#   --config that file. A config .json of your own (or a NAME with only configs/NAME.json) gets
#   the demo's variants as flags on top of it: the method switches of configs/demo_VARIANT.json.
# --variants LIST   comma-separated variants to run (default: the paper's five,
#                   baseline,md,md_lrc,clts,all; rivals such as p2,speed,lognormal,minsnr when named)
# --sweep KEY=VALS  one run per value of --KEY (clts_mu, clts_sigma, clts_target_steps, seed, any
#                   image_train.py option) on top of --base VARIANT (default all);
#                   --with_baseline adds a baseline run
# --plan            print the runs' commands and stop (nothing is run or written; the data and
#                   REF_STATS need not exist yet: what is missing is noted)
# -h, --help        print this help
# extra flags       passed to every run (after the variant's), e.g. --total_steps 300
# The sweep key and the extra flags are checked against image_train.py's options first.
#
# Each run goes to OUT_DIR/NAME (NAME = the variant, or KEY_VALUE) through train.sh, with FID
# during training when REF_STATS is set; then OUT_DIR/curves.png (scripts/plot_curves.py) and
# OUT_DIR/summary.csv, summary.md (scripts/launch/summarize.py: final loss, FID at each
# evaluation, best FID, steps to reach the baseline's final FID). Re-running resumes each run.
#
# Environment: train.sh's (NGPUS, LAUNCHER, GLOBAL_BATCH, REF_STATS, EVAL_INTERVAL, EVAL_SAMPLES,
#   EVAL_BATCH, EVAL_RESPACING, INCEPTION, ...), and
#   DATA_DIR      training data  (cifar10: data/cifar10/train, imagenet128: data/imagenet128/train.npz,
#                                 demo: data/demo/mnist_demo_grey.npz)
#   REF_STATS     FID reference  (cifar10: data/cifar10_ref.npz, imagenet128: data/imagenet128_ref.npz,
#                                 demo: data/demo/ref_stats_N.npz of scripts/demo.sh if present);
#                 empty: no FID
#   GLOBAL_BATCH  (cifar10: 128, imagenet128: 256; demo: the config's batch_size)
#   SEED          the seed of every run (0)
#   NUM_SAMPLES   final samples per run with FID (0: none; the curves come from training)
#   KEEP_GOING=1  go on with the other runs when one fails (exit status 1 at the end)
#
#   NGPUS=1 REF_STATS=data/demo/ref_stats_500.npz \
#       scripts/launch/ablation.sh demo runs/ablation --total_steps 300 --eval_interval 100
#   scripts/launch/ablation.sh cifar10 runs/cifar10_ablation --total_steps 200000
#   scripts/launch/ablation.sh cifar10 runs/cifar10_mu --sweep clts_mu=0.1,0.3,0.5,0.7,0.9 --with_baseline
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { print_usage "${BASH_SOURCE[0]}"; exit 2; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && show_help "${BASH_SOURCE[0]}"
if (( $# < 2 )); then
    echo "[ablation.sh] error: missing arguments (need EXPERIMENT OUT_DIR)" >&2
    usage
fi
EXPERIMENT="$1" OUT_DIR="$2"
shift 2

VARIANT_LIST="" SWEEP="" BASE="" WITH_BASELINE=0 PLAN=0 EXTRA=()
while (( $# )); do
    case "$1" in
        --variants) (( $# >= 2 )) || die "--variants needs a value"; VARIANT_LIST="$2"; shift 2 ;;
        --variants=*) VARIANT_LIST="${1#*=}"; shift ;;
        --sweep) (( $# >= 2 )) || die "--sweep needs KEY=V1,V2,..."; SWEEP="$2"; shift 2 ;;
        --sweep=*) SWEEP="${1#*=}"; shift ;;
        --base) (( $# >= 2 )) || die "--base needs a variant"; BASE="$2"; shift 2 ;;
        --base=*) BASE="${1#*=}"; shift ;;
        --with_baseline) WITH_BASELINE=1; shift ;;
        --plan) PLAN=1; shift ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
[[ -n "$VARIANT_LIST" && -n "$SWEEP" ]] && die "give --variants or --sweep, not both"
[[ -n "$BASE" && -z "$SWEEP" ]] && die "--base only goes with --sweep"
(( WITH_BASELINE )) && [[ -z "$SWEEP" ]] && die "--with_baseline only goes with --sweep"

# ------------------------------------------------------------ the experiment and its defaults
if [[ "$EXPERIMENT" == *.json || -f "$EXPERIMENT" ]]; then
    EXP_NAME="$(basename "$EXPERIMENT" .json)"
else
    EXP_NAME="$EXPERIMENT"
fi

NAMES=() CONFIGS=() FLAGS=()
add_run() {  # NAME CONFIG FLAGS
    NAMES+=("$1") CONFIGS+=("$2") FLAGS+=("$3")
}
if [[ -n "$SWEEP" ]]; then
    [[ "$SWEEP" =~ ^([A-Za-z0-9_]+)=([^=]+)$ ]] || die "--sweep must be KEY=V1,V2,... (e.g. clts_mu=0.1,0.3,0.5), got '$SWEEP'"
    KEY="${BASH_REMATCH[1]}" VALUES="${BASH_REMATCH[2]}"
    BASE="${BASE:-all}"
    [[ "$BASE" != *,* ]] || die "--base takes one variant, got '$BASE'"
    if (( WITH_BASELINE )); then
        load_variants "$EXPERIMENT" "baseline,$BASE"
        add_run baseline "${VARIANT_CONFIGS[0]}" "${VARIANT_FLAGS[0]}"
    else
        load_variants "$EXPERIMENT" "$BASE"
    fi
    base_config="${VARIANT_CONFIGS[-1]}" base_flags="${VARIANT_FLAGS[-1]}"
    if [[ "$KEY" == clts_* && "$BASE" != clts && "$BASE" != all ]]; then
        log "warning: sweeping $KEY on top of '$BASE', which does not use CLTS: the values change nothing"
    fi
    IFS=',' read -r -a values <<< "$VALUES"
    for v in "${values[@]}"; do
        [[ -n "$v" ]] || continue
        [[ "$v" =~ ^[A-Za-z0-9_.+-]+$ ]] || die "sweep value '$v' has characters that cannot name a run folder"
        add_run "${KEY}_$v" "$base_config" "${base_flags:+$base_flags }--$KEY $v"
    done
else
    load_variants "$EXPERIMENT" "$VARIANT_LIST"
    for i in "${!VARIANT_NAMES[@]}"; do
        add_run "${VARIANT_NAMES[i]}" "${VARIANT_CONFIGS[i]}" "${VARIANT_FLAGS[i]}"
    done
fi
(( ${#NAMES[@]} )) || die "nothing to run"

experiment_defaults "$EXP_NAME"
export NUM_SAMPLES="${NUM_SAMPLES:-0}"
SEED="${SEED:-0}"
if [[ -n "$REF_STATS" && -z "${EVAL_SAMPLES:-}" && "$EXP_NAME" == demo ]]; then
    # the demo runs on a CPU: keep each evaluation small unless the config or EVAL_SAMPLES says otherwise
    [[ -n "$(config_get "${CONFIGS[0]}" eval_num_samples 2>/dev/null || true)" ]] || export EVAL_SAMPLES=200
fi

# Typos in the sweep key or the extra flags fail here, before anything runs (also with --plan).
if [[ -n "$SWEEP" ]]; then
    check_train_flags --sweep "$SWEEP" -- ${EXTRA[@]+"${EXTRA[@]}"}
elif (( ${#EXTRA[@]} )); then
    check_train_flags -- "${EXTRA[@]}"
fi
if (( PLAN )); then
    check_inputs --note || log "note: --plan runs nothing, so it goes on; the runs will need them"
else
    check_inputs
fi

# ------------------------------------------------------------ the runs
if (( PLAN )); then
    log "plan: ${#NAMES[@]} run(s) into $OUT_DIR (seed $SEED, data $DATA_DIR, global batch ${GLOBAL_BATCH:-from the config} on ${NGPUS:-8} process(es), FID reference ${REF_STATS:-none})"
    for i in "${!NAMES[@]}"; do
        read -r -a run_flags <<< "${FLAGS[i]}"
        cmd="$(printf '%q ' bash "$LAUNCH_DIR/train.sh" "${CONFIGS[i]}" "$DATA_DIR" "$OUT_DIR/${NAMES[i]}" \
            --seed "$SEED" ${run_flags[@]+"${run_flags[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})"
        echo "${NAMES[i]}: ${cmd% }"
    done
    exit 0
fi
mkdir -p "$OUT_DIR"
{
    printf '# name\tconfig and flags (common: --seed %s %s)\n' "$SEED" "${EXTRA[*]:-}"
    for i in "${!NAMES[@]}"; do
        printf '%s\t%s %s\n' "${NAMES[i]}" "${CONFIGS[i]#"$REPO"/}" "${FLAGS[i]}"
    done
} > "$OUT_DIR/runs.tsv"
log "${#NAMES[@]} run(s) into $OUT_DIR: ${NAMES[*]} (seed $SEED, data $DATA_DIR, global batch ${GLOBAL_BATCH:-from the config} on ${NGPUS:-8} process(es), FID reference ${REF_STATS:-none})"

failed=()
for i in "${!NAMES[@]}"; do
    name="${NAMES[i]}"
    read -r -a run_flags <<< "${FLAGS[i]}"
    log "== run $((i + 1))/${#NAMES[@]}: $name"
    if ! run bash "$LAUNCH_DIR/train.sh" "${CONFIGS[i]}" "$DATA_DIR" "$OUT_DIR/$name" \
            --seed "$SEED" ${run_flags[@]+"${run_flags[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}; then
        [[ "${KEEP_GOING:-0}" == 1 ]] || die "run $name failed (KEEP_GOING=1 goes on with the others)"
        log "run $name failed; going on (KEEP_GOING=1)"
        failed+=("$name")
    fi
done

# ------------------------------------------------------------ curves and summary
dirs=() names=()
for name in "${NAMES[@]}"; do
    if [[ -f "$OUT_DIR/$name/progress.csv" ]]; then
        dirs+=("$OUT_DIR/$name") names+=("$name")
    fi
done
if (( ${#dirs[@]} )); then
    log "== curves and summary"
    run "$PYTHON" "$REPO/scripts/plot_curves.py" "${dirs[@]}" --names "$(IFS=,; echo "${names[*]}")" \
        --out "$OUT_DIR/curves.png"
    run "$PYTHON" "$LAUNCH_DIR/summarize.py" "$OUT_DIR"
    log "done: $OUT_DIR/curves.png, $OUT_DIR/summary.md"
else
    log "no run wrote a progress.csv: nothing to plot or summarise"
fi
if (( ${#failed[@]} )); then
    log "failed runs: ${failed[*]}"
    exit 1
fi
