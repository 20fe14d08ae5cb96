#!/usr/bin/env bash
# The README's first command: install, build the demo digits, train a small model with
# CLTS + MD + LRC, sample, measure FID, and write a report folder.
#
#   bash scripts/demo.sh                 # everything, about 12 minutes on 2 CPU cores (9 once .venv exists)
#   OUT=runs/my_demo STEPS=500 bash scripts/demo.sh
#
# A GPU is used automatically when there is one. Run it again and training resumes
# (or is skipped when finished); the data and reference statistics are cached in data/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-runs/demo}
STEPS=${STEPS:-1000}
EVAL_SAMPLES=${EVAL_SAMPLES:-200}
REF_IMAGES=${REF_IMAGES:-500}
DATA=data/demo

echo "== 1/6 install (.venv)"
bash scripts/install.sh
. .venv/bin/activate
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== 2/6 demo data: 5,000 real MNIST digits at 16x16 ($DATA)"
if [ ! -f "$DATA/mnist_demo.npz" ]; then
  python datasets/mnist_demo.py --out "$DATA" --image_size 16
fi

echo "== 3/6 FID reference statistics ($REF_IMAGES images)"
REF="$DATA/ref_stats_${REF_IMAGES}.npz"
if [ ! -f "$REF" ]; then
  python scripts/fid.py ref --source "$DATA/mnist_demo.npz" --out "$REF" --max_images "$REF_IMAGES"
fi

echo "== 4/6 train with CLTS + MD + LRC ($STEPS steps, FID of the EMA model every $((STEPS / 2)))"
python scripts/image_train.py --config configs/demo.json --data_dir "$DATA/mnist_demo.npz" \
  --log_dir "$OUT/train" --total_steps "$STEPS" --clts_target_steps $((STEPS / 5)) \
  --save_interval $((STEPS / 4)) --eval_interval $((STEPS / 2)) --eval_ref_stats "$REF" \
  --eval_num_samples "$EVAL_SAMPLES" --eval_batch_size 100

echo "== 5/6 sample 64 images (DDIM, 50 steps) from the EMA model"
EMA=$(printf "%s/train/ema_0.995_%06d.pt" "$OUT" "$STEPS")
# shellcheck disable=SC2046
python scripts/image_sample.py --model_path "$EMA" $(python scripts/launch/config_flags.py "$OUT/train") \
  --num_samples 64 --batch_size 64 --use_ddim True --timestep_respacing ddim50 \
  --out "$OUT/report/samples.npz" --grid "$OUT/report/samples.png"

echo "== 6/6 curves and report"
python scripts/plot_curves.py "$OUT/train" --out "$OUT/report/curves.png" --names demo
python scripts/demo_report.py "$OUT" --seconds $(( $(date +%s) - start ))
echo
echo "report: $OUT/report/report.md (samples.png, curves.png)"
