# Shared helpers of the launch scripts (sourced, not run).
#
# Environment read here:
#   NGPUS     processes (one per GPU); 1 runs plain python        (default 8)
#   LAUNCHER  mpiexec or torchrun                                  (default mpiexec)
#   PYTHON    the interpreter              (default: the repo's .venv if there is one, else python)
#   MPIEXEC   the mpiexec binary                                   (default mpiexec)
#   MPI_FLAGS extra mpiexec flags, word-split (e.g. "-hosts a,b")
#   TORCHRUN  the torchrun binary                                  (default torchrun)
#   TORCHRUN_FLAGS extra torchrun flags, word-split                (default --standalone)

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$LAUNCH_DIR/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ] && [ -x "$REPO/.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
    PYTHON="$REPO/.venv/bin/python"
    export PATH="$REPO/.venv/bin:$PATH"  # its mpiexec and torchrun too
fi
PYTHON="${PYTHON:-python}"

log() { echo "[$(basename "$0")] $*"; }
die() { echo "[$(basename "$0")] error: $*" >&2; exit 2; }

# Echo a command (shell-quoted) and run it.
run() {
    local quoted
    quoted="$(printf '%q ' "$@")"
    log "+ ${quoted% }"
    "$@"
}

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

# launch SCRIPT ARGS...: run a Python script on NGPUS processes.
launch() {
    local ngpus="${NGPUS:-8}" launcher="${LAUNCHER:-mpiexec}"
    is_int "$ngpus" && (( ngpus >= 1 )) || die "NGPUS must be a positive integer, got '$ngpus'"
    if (( ngpus == 1 )); then
        run "$PYTHON" "$@"
        return
    fi
    case "$launcher" in
        mpiexec|mpirun)
            # shellcheck disable=SC2086
            run "${MPIEXEC:-$launcher}" -n "$ngpus" ${MPI_FLAGS:-} "$PYTHON" "$@" ;;
        torchrun)
            # shellcheck disable=SC2086
            run "${TORCHRUN:-torchrun}" ${TORCHRUN_FLAGS---standalone} --nproc_per_node "$ngpus" \
                --no-python "$PYTHON" "$@" ;;
        *) die "LAUNCHER must be mpiexec or torchrun, got '$launcher'" ;;
    esac
}

# load_variants EXPERIMENT [LIST]: VARIANT_NAMES, VARIANT_CONFIGS and VARIANT_FLAGS (a word list)
# of the experiment's variants, all or those of the comma-separated LIST, read from the config
# files by scripts/launch/variants.py (configs/EXPERIMENT_VARIANT.json); else exit 2.
load_variants() {
    local out name config flags
    out="$("$PYTHON" "$LAUNCH_DIR/variants.py" "$@" 2>&1)" || die "${out#error: }"
    VARIANT_NAMES=() VARIANT_CONFIGS=() VARIANT_FLAGS=()
    while IFS=$'\t' read -r name config flags; do
        VARIANT_NAMES+=("$name") VARIANT_CONFIGS+=("$config") VARIANT_FLAGS+=("$flags")
    done <<< "$out"
}

# config_get CONFIG KEY: a value of a JSON config, its "base" included ('' when absent).
config_get() {
    "$PYTHON" "$LAUNCH_DIR/config_flags.py" "$1" --get "$2"
}

# experiment_defaults EXPERIMENT: default DATA_DIR, REF_STATS, GLOBAL_BATCH (and for the demo
# NGPUS, EVAL_SAMPLES) of the paper's experiments; variables already set (even to '') win.
experiment_defaults() {
    case "$1" in
        cifar10)
            : "${DATA_DIR=$REPO/data/cifar10/train}"
            : "${REF_STATS=$REPO/data/cifar10_ref.npz}"
            : "${GLOBAL_BATCH=128}"
            DATA_HINT="python datasets/cifar10.py --archive PATH/cifar-10-python.tar.gz --out $REPO/data/cifar10/train"
            REF_HINT="python scripts/fid.py ref --source $DATA_DIR --image_size 32 --out $REPO/data/cifar10_ref.npz" ;;
        imagenet128)
            : "${DATA_DIR=$REPO/data/imagenet128/train.npz}"
            : "${REF_STATS=$REPO/data/imagenet128_ref.npz}"
            : "${GLOBAL_BATCH=256}"
            DATA_HINT="python datasets/imagenet.py --root PATH/train --out $REPO/data/imagenet128/train.npz --npz --workers 16"
            local size_flag=""
            [[ -d "$DATA_DIR" ]] && size_flag=" --image_size 128"  # a folder needs it; an .npz is used as is
            REF_HINT="python scripts/fid.py ref --source $DATA_DIR$size_flag --out $REPO/data/imagenet128_ref.npz (or guided-diffusion's VIRTUAL_imagenet128_labeled.npz)" ;;
        demo)
            : "${DATA_DIR=$REPO/data/demo/mnist_demo_grey.npz}"  # configs/demo.json trains grey digits
            if [[ -z "${REF_STATS+set}" ]]; then
                # what scripts/demo.sh writes (ref_stats_grey_N.npz; the largest N), if it has run
                REF_STATS="$(ls "$REPO"/data/demo/ref_stats_grey_*.npz 2>/dev/null | sort -V | tail -n 1 || true)"
            fi
            : "${NGPUS=1}"
            DATA_HINT="python datasets/mnist_demo.py --image_size 16 --out $REPO/data/demo"
            REF_HINT="python scripts/fid.py ref --source $DATA_DIR --max_images 500 --out $REPO/data/demo/ref_stats_500.npz" ;;
        *)
            DATA_HINT="set DATA_DIR to an image folder or .npz"
            REF_HINT="python scripts/fid.py ref --source \$DATA_DIR --out ref.npz (and --image_size N when DATA_DIR is a folder)" ;;
    esac
    : "${DATA_DIR:=}"
    : "${REF_STATS:=}"
    : "${GLOBAL_BATCH:=}"
    export DATA_DIR REF_STATS GLOBAL_BATCH
    [[ -n "${NGPUS:-}" ]] && export NGPUS
    return 0
}

# check_inputs [--note]: clear errors before any training starts. With --note (plan modes,
# which run nothing) a missing input is only reported, and the function returns 1.
check_inputs() {
    local report=die missing=0
    [[ "${1:-}" == --note ]] && report=note
    if [[ -z "$DATA_DIR" ]]; then
        "$report" "DATA_DIR is not set ($DATA_HINT)"; missing=1
    elif [[ "$DATA_DIR" != *://* && ! -e "$DATA_DIR" ]]; then
        "$report" "data not found: $DATA_DIR (prepare it: $DATA_HINT; or set DATA_DIR)"; missing=1
    fi
    if [[ -n "$REF_STATS" && ! -f "$REF_STATS" ]]; then
        "$report" "reference statistics not found: $REF_STATS (make them: $REF_HINT; or set REF_STATS= to train without FID)"
        missing=1
    fi
    return "$missing"
}
note() { log "note: $*"; }

# print_usage FILE: the comment block at the top of FILE (after the #! line), to stderr.
print_usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1" >&2
}

# show_help FILE: the usage of FILE on stdout, and exit 0 (for -h / --help).
show_help() {
    print_usage "$1" 2>&1
    exit 0
}

# check_train_flags [--sweep KEY=V1,...] [--] FLAGS...: every flag (and every swept value) is an
# image_train.py option with a valid value (scripts/launch/train_flags.py), else exit 2.
check_train_flags() {
    local message
    if ! message="$("$PYTHON" "$LAUNCH_DIR/train_flags.py" "$@" 2>&1)"; then
        die "${message#error: }"
    fi
}

# paper_experiment EXPERIMENT VARIANT [extra flags...]: one run of the paper's experiment, with
# --config configs/EXPERIMENT_VARIANT.json.
paper_experiment() {
    local exp="$1" variant="$2"
    shift 2
    [[ "$variant" != *,* ]] || die "one variant at a time, got '$variant'"
    load_variants "$exp" "$variant"
    local config="${VARIANT_CONFIGS[0]}"
    experiment_defaults "$exp"
    check_inputs
    local log_dir="${LOG_DIR:-$REPO/runs/${exp}_${variant}}"
    log "experiment $exp, variant $variant: config $config, data $DATA_DIR, log dir $log_dir," \
        "global batch ${GLOBAL_BATCH:-from config} on ${NGPUS:-8} GPU(s), FID reference ${REF_STATS:-none}"
    run bash "$LAUNCH_DIR/train.sh" "$config" "$DATA_DIR" "$log_dir" "$@"
}
