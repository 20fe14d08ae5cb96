#!/usr/bin/env bash
# Reproduce docs/analysis.md on the demo: train the contrast models and run the three
# analysis tools (consistency PSNR, 1-D loss interpolation, Hessian spectrum).
#
#   bash scripts/analysis_demo.sh [DEMO_RUN] [OUT]      # defaults: runs/demo runs/analysis
#   bash scripts/analysis_demo.sh --help                # arguments, settings and outputs; runs nothing
#
# DEMO_RUN is the output of scripts/demo.sh (model "A": demo config, seed 0). Trained here,
# each for the same number of steps: "B" the same configuration with seed 1, "C" another
# architecture (two resolution levels instead of three), "D" the same configuration on other
# data (the digits with inverted colours). About 30 minutes on 2 CPU cores.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: [STEPS=N] [SAMPLES=N] bash scripts/analysis_demo.sh [DEMO_RUN] [OUT]
       bash scripts/analysis_demo.sh -h|--help

Reproduce docs/analysis.md on the demo: train three contrast models to the demo's model "A"
(DEMO_RUN, made by scripts/demo.sh), each for STEPS steps: "B" the same configuration with
seed 1, "C" another architecture (two resolution levels), "D" the demo digits with inverted
colours; then run the three analysis tools (consistency PSNR, 1-D loss interpolation
between A and B, Hessian spectrum of A). About 30 minutes on 2 CPU cores. Needs
scripts/demo.sh to have run first (.venv, data/demo/mnist_demo.npz, DEMO_RUN's checkpoint).

Arguments (relative paths are relative to the repository root, where the script runs):
  DEMO_RUN   the OUT folder of scripts/demo.sh: model "A" is
             DEMO_RUN/train/ema_0.995_<STEPS>.pt                     (runs/demo)
  OUT        where the contrast models and the results go            (runs/analysis)

Environment variables (default):
  STEPS      training steps of B, C and D; also picks A's checkpoint, so it must equal
             the STEPS the demo was run with                         (1000)
  SAMPLES    images generated per model for the consistency PSNR     (32)

Outputs: OUT/B_seed1/, OUT/C_arch/, OUT/D_inverted/ (training runs; their logs in
OUT/NAME.log), OUT/consistency/, OUT/interpolate/, OUT/hessian/ (JSON and PNG), and
data/demo/mnist_inverted.npz (the inverted digits).
EOF
}
for arg in "$@"; do
  case "$arg" in -h|--help) usage; exit 0 ;; esac
done
for arg in "$@"; do
  if [[ "$arg" == -* ]]; then
    echo "analysis_demo.sh: error: unknown option '$arg' (the arguments are DEMO_RUN and OUT; settings are environment variables)" >&2
    usage >&2
    exit 2
  fi
done
if (( $# > 2 )); then
  echo "analysis_demo.sh: error: too many arguments ($#): expected at most DEMO_RUN OUT" >&2
  usage >&2
  exit 2
fi
fail() { echo "analysis_demo.sh: error: $*" >&2; exit 2; }

cd "$(dirname "$0")/.."
DEMO=${1:-runs/demo}
OUT=${2:-runs/analysis}
STEPS=${STEPS:-1000}
SAMPLES=${SAMPLES:-32}
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] && (( STEPS >= 5 )) || fail "STEPS must be a whole number >= 5, got '$STEPS'"
[[ "$SAMPLES" =~ ^[1-9][0-9]*$ ]] || fail "SAMPLES must be a positive whole number, got '$SAMPLES'"
DATA=data/demo/mnist_demo.npz
INVERTED=data/demo/mnist_inverted.npz
A_CKPT=$(printf "%s/train/ema_0.995_%06d.pt" "$DEMO" "$STEPS")
# Check what the demo must have made before training anything (the training takes minutes).
[[ -f .venv/bin/activate ]] || fail "no .venv: run scripts/demo.sh (or scripts/install.sh) first"
[[ -f "$DATA" ]] || fail "$DATA not found: run scripts/demo.sh first"
[[ -f "$DEMO/train/config.json" ]] || fail "$DEMO/train/config.json not found: is DEMO_RUN ($DEMO) the OUT folder of scripts/demo.sh?"
[[ -f "$A_CKPT" ]] || fail "$A_CKPT not found: model A must be trained for STEPS=$STEPS steps (set STEPS to the demo's, or run scripts/demo.sh)"
. .venv/bin/activate
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if [ ! -f "$INVERTED" ]; then
  python -c "import numpy as np; d = np.load('$DATA'); np.savez('$INVERTED', arr_0=255 - d['arr_0'], arr_1=d['arr_1'])"
fi

train() {  # name, extra flags...
  local name=$1; shift
  echo "== train $name"
  python scripts/image_train.py --config configs/demo.json --data_dir "$DATA" --log_dir "$OUT/$name" \
    --total_steps "$STEPS" --clts_target_steps $((STEPS / 5)) --save_interval "$STEPS" --log_interval 100 "$@" \
    > "$OUT/$name.log" 2>&1
}
# Two at a time, one thread each.
export OMP_NUM_THREADS=1
train B_seed1 --seed 1 &
train C_arch --channel_mult 1,2 --attention_resolutions 8 &
wait
train D_inverted --data_dir "$INVERTED" &
wait

ema() { printf "%s/ema_0.995_%06d.pt" "$1" "$STEPS"; }
FLAGS=$(python scripts/launch/config_flags.py "$DEMO/train")
export OMP_NUM_THREADS=2

echo "== consistency (same initial and per-step noise, $SAMPLES images, 100 DDPM steps)"
# shellcheck disable=SC2086
python scripts/consistency.py $FLAGS \
  --model_paths "$(ema "$DEMO/train"),$(ema "$OUT/B_seed1"),$(ema "$OUT/C_arch"),$(ema "$OUT/D_inverted")" \
  --names A_seed0,B_seed1,C_arch,D_inverted_data \
  --model_flags "" "" "--channel_mult 1,2 --attention_resolutions 8" "" \
  --num_samples "$SAMPLES" --batch_size "$SAMPLES" --timestep_respacing 100 --out "$OUT/consistency"

echo "== 1-D interpolation between A and B (fixed batch, timesteps and noise)"
# shellcheck disable=SC2086
python scripts/interpolate.py $FLAGS --model_a "$(ema "$DEMO/train")" --model_b "$(ema "$OUT/B_seed1")" \
  --data_dir "$DATA" --batch_size 128 --out "$OUT/interpolate"

echo "== Hessian spectrum of A (Lanczos and power iteration, with density)"
# shellcheck disable=SC2086
python scripts/hessian.py $FLAGS --model_path "$(ema "$DEMO/train")" --data_dir "$DATA" \
  --batch_size 64 --top_k 5 --method both --density True --out "$OUT/hessian"
echo "results: $OUT/consistency $OUT/interpolate $OUT/hessian"
