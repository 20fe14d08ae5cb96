#!/usr/bin/env bash
# Reproduce docs/analysis.md on the demo: train the contrast models and run the three
# analysis tools (consistency PSNR, 1-D loss interpolation, Hessian spectrum).
#
#   bash scripts/analysis_demo.sh [DEMO_RUN] [OUT]      # defaults: runs/demo runs/analysis
#
# DEMO_RUN is the output of scripts/demo.sh (model "A": demo config, seed 0). Trained here,
# each for the same number of steps: "B" the same configuration with seed 1, "C" another
# architecture (two resolution levels instead of three), "D" the same configuration on other
# data (the digits with inverted colours). About 30 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${1:-runs/demo}
OUT=${2:-runs/analysis}
STEPS=${STEPS:-1000}
SAMPLES=${SAMPLES:-32}
. .venv/bin/activate
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA=data/demo/mnist_demo.npz
INVERTED=data/demo/mnist_inverted.npz
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
