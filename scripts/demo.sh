#!/usr/bin/env bash
# The README's first command: install, build the demo digits, train a small model with
# CLTS + MD + LRC, sample, score the samples (recognisable digits, FID) and write a report.
#
#   bash scripts/demo.sh                 # everything, about 10-12 minutes on 2 CPU cores (9 once .venv exists)
#   OUT=runs/my_demo STEPS=2000 bash scripts/demo.sh
#   bash scripts/demo.sh --help          # the settings (environment variables) and outputs; runs nothing
#
# A GPU is used automatically when there is one. Run it again and training resumes
# (or is skipped when finished); the data and reference statistics are cached in data/demo.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: [OUT=DIR] [STEPS=N] [EVAL_SAMPLES=N] [REF_IMAGES=N] bash scripts/demo.sh [-h|--help]

The README's first command: install the environment (.venv), build the demo data (5,000 real
MNIST digits, 16x16 grey), compute FID reference statistics, train a small model with
CLTS + MD + LRC (configs/demo.json), sample EVAL_SAMPLES images from its EMA model (DDPM,
100 steps), score them (the fraction a digit classifier recognises, scripts/digit_score.py;
FID against the training digits) and write a report whose grid shows the first 64 beside
real digits. About 10-12 minutes on 2 CPU cores (9 once .venv exists); a GPU is used when
there is one. Run it again and training resumes (or is skipped when finished); the report
keeps the time of the first full run. It takes no arguments; the settings are environment
variables:

  OUT           output folder                                        (runs/demo)
  STEPS         training steps (at least 5); checkpoints every STEPS/4,
                CLTS K_target STEPS/5                                (2500)
  EVAL_SAMPLES  images sampled at the end for the grid, the recognisable
                fraction and FID                                     (200)
  REF_IMAGES    training images in the FID reference statistics      (300)
  PYTHON        the interpreter that creates .venv (scripts/install.sh) (python3)

Outputs (relative paths are relative to the repository root, where the script runs):
  .venv/                                  the virtual environment (scripts/install.sh)
  data/demo/mnist_demo_grey.npz           the demo digits (made once, then reused)
  data/demo/ref_stats_grey_REF_IMAGES.npz the FID reference statistics (made once, then reused)
  data/demo/digit_classifier_16px_1ch.pt  the digit classifier (trained once, then reused)
  OUT/train/                              training log, progress.csv, config.json, checkpoints
  OUT/report/                             report.md, samples_vs_real.png, curves.png,
                                          samples.npz, samples.png, digits.json, fid.json
  OUT/timing.json                         the time of each stage of the first full run
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
STEPS=${STEPS:-2500}
EVAL_SAMPLES=${EVAL_SAMPLES:-200}
REF_IMAGES=${REF_IMAGES:-300}
DATA=data/demo
DIGITS=$DATA/mnist_demo_grey.npz
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
# Seconds of each stage, for the report: NAME=SECONDS,...
STAGES="" stage_start=$start
stage_done() {
  local now; now=$(date +%s)
  STAGES="$STAGES${STAGES:+,}$1=$((now - stage_start))"
  stage_start=$now
}

echo "== 1/6 install (.venv)"
bash scripts/install.sh
. .venv/bin/activate
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stage_done install

echo "== 2/6 demo data: 5,000 real MNIST digits, 16x16 grey ($DIGITS)"
if [ ! -f "$DIGITS" ]; then
  python datasets/mnist_demo.py --out "$DATA" --image_size 16 --channels 1
fi
stage_done data

echo "== 3/6 FID reference statistics ($REF_IMAGES training digits)"
REF="$DATA/ref_stats_grey_${REF_IMAGES}.npz"
if [ ! -f "$REF" ]; then
  python scripts/fid.py ref --source "$DIGITS" --out "$REF" --max_images "$REF_IMAGES"
fi
stage_done reference

echo "== 4/6 train with CLTS + MD + LRC ($STEPS steps)"
# The first full run (training from step 0 here) records its time; a rerun keeps it.
record=--record_time
if compgen -G "$OUT/train/state*.pt" > /dev/null; then record=""; fi
python scripts/image_train.py --config configs/demo.json --data_dir "$DIGITS" \
  --log_dir "$OUT/train" --total_steps "$STEPS" --clts_target_steps $((STEPS / 5)) \
  --save_interval $((STEPS / 4))
stage_done train

echo "== 5/6 sample $EVAL_SAMPLES images (DDPM, 100 steps) from the EMA model"
EMA=$(python scripts/launch/config_flags.py "$OUT/train" --ema_checkpoint)
python scripts/image_sample.py --model_path "$EMA" --num_samples "$EVAL_SAMPLES" --batch_size 100 \
  --timestep_respacing 100 --out "$OUT/report/samples.npz" --grid "$OUT/report/samples.png"
stage_done sample

echo "== 6/6 score (recognisable digits, FID) and report"
python scripts/digit_score.py --data "$DIGITS" --samples "$OUT/report/samples.npz" --json "$OUT/report/digits.json"
python scripts/fid.py fid --samples "$OUT/report/samples.npz" --ref "$REF" --metrics fid --out "$OUT/report/fid.json"
stage_done score
python scripts/demo_report.py "$OUT" --data "$DIGITS" --seconds $(( $(date +%s) - start )) --stages "$STAGES" $record
echo
echo "report: $OUT/report/report.md (samples_vs_real.png, curves.png)"
