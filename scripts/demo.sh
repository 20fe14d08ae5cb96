#!/usr/bin/env bash
# The README's first command: install, build the demo digits, train a small model with
# CLTS + MD + LRC, sample, measure FID, and write a report folder.
#
#   bash scripts/demo.sh                 # everything, about 12 minutes on 2 CPU cores (9 once .venv exists)
#   OUT=runs/my_demo STEPS=500 bash scripts/demo.sh
#   bash scripts/demo.sh --help          # the settings (environment variables) and outputs; runs nothing
#
# A GPU is used automatically when there is one. Run it again and training resumes
# (or is skipped when finished); the data and reference statistics are cached in data/demo.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: [OUT=DIR] [STEPS=N] [EVAL_SAMPLES=N] [REF_IMAGES=N] bash scripts/demo.sh [-h|--help]

The README's first command: install the environment (.venv), build the demo data (5,000 real
MNIST digits at 16x16), compute FID reference statistics, train a small model with
CLTS + MD + LRC (configs/demo.json) with FID of the EMA model during training, sample 64
images (DDIM, 50 steps) and write a report. About 12 minutes on 2 CPU cores (9 once .venv
exists); a GPU is used when there is one. Run it again and training resumes (or is skipped
when finished). It takes no arguments; the settings are environment variables:

  OUT           output folder                                        (runs/demo)
  STEPS         training steps (at least 5); checkpoints every STEPS/4, FID every STEPS/2,
                CLTS K_target STEPS/5                                (1000)
  EVAL_SAMPLES  images sampled for each FID evaluation during training (200)
  REF_IMAGES    training images in the FID reference statistics      (500)
  PYTHON        the interpreter that creates .venv (scripts/install.sh) (python3)

Outputs (relative paths are relative to the repository root, where the script runs):
  .venv/                               the virtual environment (scripts/install.sh)
  data/demo/mnist_demo.npz             the demo digits (made once, then reused)
  data/demo/ref_stats_REF_IMAGES.npz   the FID reference statistics (made once, then reused)
  OUT/train/                           training log, progress.csv, config.json, checkpoints
  OUT/report/                          report.md, samples.png, samples.npz, curves.png
EOF
}
for arg in "$@"; do
  case "$arg" in -h|--help) usage; exit 0 ;; esac
done
if (( $# )); then
  echo "demo.sh: error: unknown argument '$1' (the demo takes no arguments; its settings are environment variables)" >&2
  usage >&2
  exit 2
fi

cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-runs/demo}
STEPS=${STEPS:-1000}
EVAL_SAMPLES=${EVAL_SAMPLES:-200}
REF_IMAGES=${REF_IMAGES:-500}
DATA=data/demo
for var in STEPS EVAL_SAMPLES REF_IMAGES; do
  if [[ ! "${!var}" =~ ^[1-9][0-9]*$ ]]; then
    echo "demo.sh: error: $var must be a positive whole number, got '${!var}'" >&2
    exit 2
  fi
done
if (( STEPS < 5 )); then
  echo "demo.sh: error: STEPS must be at least 5 (CLTS ramps over STEPS/5 steps), got $STEPS" >&2
  exit 2
fi

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
