#!/usr/bin/env bash
# Reproduce docs/analysis.md on the demo: train the contrast models (diffusion and DCGAN) and
# run the three analysis tools (consistency PSNR, 1-D loss interpolation, Hessian spectrum),
# diffusion beside GAN as in the paper's Table 1 and Figs. 3-4.
#
#   bash scripts/analysis_demo.sh [DEMO_RUN] [OUT]      # defaults: runs/demo runs/analysis
#   bash scripts/analysis_demo.sh --help                # arguments, settings and outputs; runs nothing
#
# DEMO_RUN is the output of scripts/demo.sh (model "A": demo config, seed 0). Trained here,
# each for the same number of steps: "B" the same configuration with seed 1, "C" another
# architecture (two resolution levels instead of three), "D" the same configuration on other
# data (the digits with inverted colours); and three DCGANs (scripts/gan_train.py): seeds 0
# and 1, and seed 0 at half the width. About 20 minutes on 2 CPU cores (docs/analysis.md);
# run it again and the models already trained are reused.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: [STEPS=N] [GAN_STEPS=N] [SAMPLES=N] [INVERTED=0|1] [DATA=NPZ] [THREADS=N] bash scripts/analysis_demo.sh [DEMO_RUN] [OUT]
       bash scripts/analysis_demo.sh -h|--help

Reproduce docs/analysis.md on the demo: train three contrast models to the demo's model "A"
(DEMO_RUN, made by scripts/demo.sh), each for STEPS steps: "B" the same configuration with
seed 1, "C" another architecture (two resolution levels), "D" the demo digits with inverted
colours; and three DCGANs for GAN_STEPS steps each (scripts/gan_train.py, batch 64):
"GAN_seed0", "GAN_seed1" and "GAN_w32" (seed 0, generator and discriminator width 32 instead
of 64). Then run the three analysis tools: consistency PSNR of all models (same noise for the
diffusion models, same latents for the GANs); 1-D loss interpolation between A and B, between
the first and last checkpoint of one run (A's model at STEPS/4 and STEPS; GAN_seed0's at
GAN_STEPS/4 and GAN_STEPS) and between the two GAN seeds; Hessian spectra of A and of
GAN_seed0's generator and discriminator losses; side-by-side figures and the Table-1 style
table (OUT/contrast_table.md). About 20 minutes on 2 CPU cores (20.2 measured, see
docs/analysis.md); run it again and models already trained are reused. Needs scripts/demo.sh to have run first (.venv, the demo
digits, DEMO_RUN's checkpoints); A's steps, EMA rate and data are read from
DEMO_RUN/train/config.json, so B, C and D are trained exactly as A was.

Arguments (relative paths are relative to the repository root, where the script runs):
  DEMO_RUN   the OUT folder of scripts/demo.sh: model "A" is
             DEMO_RUN/train/ema_<RATE>_<STEPS>.pt                    (runs/demo)
  OUT        where the contrast models and the results go            (runs/analysis)

Environment variables (default):
  STEPS      training steps of B, C and D; also picks A's checkpoint
                                        (the demo run's total_steps)
  GAN_STEPS  training steps of each DCGAN                            (1000)
  SAMPLES    images generated per model for the consistency PSNR     (32)
  INVERTED   1: train and compare D (other data); 0: leave it out    (1)
  DATA       the digits B, C, D and the GANs train on, and the analyses use
                                        (the demo run's data_dir)
  THREADS    threads of each analysis step (training: one per run)   (2)

Outputs: OUT/B_seed1/, OUT/C_arch/, OUT/D_inverted/, OUT/GAN_seed0/, OUT/GAN_seed1/,
OUT/GAN_w32/ (training runs; their logs in OUT/NAME.log), OUT/consistency/,
OUT/interpolate/ (A vs B), OUT/interp_*/, OUT/hessian/ (A), OUT/hessian_gan_*/ (JSON and
PNG), OUT/compare/ (side-by-side figures), OUT/contrast_table.md, OUT/timing.txt, and
DATA's inverted digits beside DATA (NAME_inverted.npz).
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
# Check what the demo must have made before training anything (the training takes minutes).
[[ -f .venv/bin/activate ]] || fail "no .venv: run scripts/demo.sh (or scripts/install.sh) first"
[[ -f "$DEMO/train/config.json" ]] || fail "$DEMO/train/config.json not found: is DEMO_RUN ($DEMO) the OUT folder of scripts/demo.sh?"
# What model A was trained with: its steps, its (first) EMA rate and its data, from its config.json.
demo_option() {
  python3 -c "import json, sys; print(str(json.load(open(sys.argv[1])).get(sys.argv[2], '')).split(',')[0])" \
    "$DEMO/train/config.json" "$1" || fail "cannot read $DEMO/train/config.json"
}
STEPS=${STEPS:-$(demo_option total_steps)}
EMA_RATE=$(demo_option ema_rate)
GAN_STEPS=${GAN_STEPS:-1000}
SAMPLES=${SAMPLES:-32}
INVERTED=${INVERTED:-1}
THREADS=${THREADS:-2}
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] && (( STEPS >= 5 )) || fail "STEPS must be a whole number >= 5, got '$STEPS'"
[[ "$GAN_STEPS" =~ ^[1-9][0-9]*$ ]] && (( GAN_STEPS >= 4 )) || fail "GAN_STEPS must be a whole number >= 4, got '$GAN_STEPS'"
[[ "$SAMPLES" =~ ^[1-9][0-9]*$ ]] || fail "SAMPLES must be a positive whole number, got '$SAMPLES'"
[[ "$INVERTED" == 0 || "$INVERTED" == 1 ]] || fail "INVERTED must be 0 or 1, got '$INVERTED'"
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || fail "THREADS must be a positive whole number, got '$THREADS'"
DATA=${DATA:-$(demo_option data_dir)}
INVERTED_DATA=${DATA%.npz}_inverted.npz
A_CKPT=$(printf "%s/train/ema_%s_%06d.pt" "$DEMO" "$EMA_RATE" "$STEPS")
A_EARLY=$(printf "%s/train/model%06d.pt" "$DEMO" $((STEPS / 4)))
A_LATE=$(printf "%s/train/model%06d.pt" "$DEMO" "$STEPS")
[[ -n "$EMA_RATE" ]] || fail "$DEMO/train/config.json names no ema_rate: is it a run of scripts/image_train.py?"
[[ -f "$DATA" ]] || fail "$DATA not found: run scripts/demo.sh first"
[[ -f "$A_CKPT" ]] || fail "$A_CKPT not found: model A must be trained for STEPS=$STEPS steps (set STEPS to the demo's, or run scripts/demo.sh)"
[[ -f "$A_EARLY" ]] || fail "$A_EARLY not found: the demo saves every STEPS/4 steps; is STEPS the demo's?"
. .venv/bin/activate
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "$1: $(( $(date +%s) - start )) s" | tee -a "$OUT/timing.txt"; }
: > "$OUT/timing.txt"

if (( INVERTED )) && [ ! -f "$INVERTED_DATA" ]; then
  python -c "import numpy as np; d = np.load('$DATA'); np.savez('$INVERTED_DATA', arr_0=255 - d['arr_0'], arr_1=d['arr_1'])"
fi

train() {  # name, extra flags... (skipped when its last checkpoint exists)
  local name=$1; shift
  if [ -f "$(printf "%s/%s/ema_%s_%06d.pt" "$OUT" "$name" "$EMA_RATE" "$STEPS")" ]; then echo "== $name: trained"; return; fi
  echo "== train $name"
  python scripts/image_train.py --config configs/demo.json --data_dir "$DATA" --log_dir "$OUT/$name" \
    --total_steps "$STEPS" --clts_target_steps $((STEPS / 5)) --save_interval "$STEPS" --log_interval 100 "$@" \
    > "$OUT/$name.log" 2>&1
}
train_gan() {  # name, extra flags... (continues, or is skipped, when checkpoints exist)
  local name=$1; shift
  echo "== train $name (DCGAN)"
  python scripts/gan_train.py --data_dir "$DATA" --log_dir "$OUT/$name" --total_steps "$GAN_STEPS" \
    --save_interval $((GAN_STEPS / 4)) --log_interval 250 "$@" > "$OUT/$name.log" 2>&1
}
gans() {
  train_gan GAN_seed0 --seed 0
  train_gan GAN_seed1 --seed 1
  train_gan GAN_w32 --seed 0 --g_width 32 --d_width 32
}
# Two at a time, one thread each: B and C, then D beside the three GANs.
export OMP_NUM_THREADS=1
train B_seed1 --seed 1 &
train C_arch --channel_mult 1,2 --attention_resolutions 8 &
wait
stamp "B and C trained"
if (( INVERTED )); then train D_inverted --data_dir "$INVERTED_DATA" & fi
gans &
wait
stamp "D and the GANs trained"

ema() { printf "%s/ema_%s_%06d.pt" "$1" "$EMA_RATE" "$STEPS"; }
ganckpt() { printf "%s/gan%06d.pt" "$1" "$2"; }
FLAGS=$(python scripts/launch/config_flags.py "$DEMO/train")
export OMP_NUM_THREADS=$THREADS

echo "== consistency (diffusion: same initial and per-step noise, 100 DDPM steps; GANs: same latents; $SAMPLES images)"
PATHS="$(ema "$DEMO/train"),$(ema "$OUT/B_seed1"),$(ema "$OUT/C_arch")"
NAMES=A_seed0,B_seed1,C_arch
MODEL_FLAGS=("" "" "--channel_mult 1,2 --attention_resolutions 8")
if (( INVERTED )); then
  PATHS="$PATHS,$(ema "$OUT/D_inverted")"; NAMES="$NAMES,D_inverted_data"; MODEL_FLAGS+=("")
fi
PATHS="$PATHS,$(ganckpt "$OUT/GAN_seed0" "$GAN_STEPS"),$(ganckpt "$OUT/GAN_seed1" "$GAN_STEPS"),$(ganckpt "$OUT/GAN_w32" "$GAN_STEPS")"
NAMES="$NAMES,GAN_seed0,GAN_seed1,GAN_w32"
MODEL_FLAGS+=("" "" "")
# shellcheck disable=SC2086
python scripts/consistency.py $FLAGS --model_paths "$PATHS" --names "$NAMES" --model_flags "${MODEL_FLAGS[@]}" \
  --num_samples "$SAMPLES" --batch_size "$SAMPLES" --timestep_respacing 100 --out "$OUT/consistency"
stamp "consistency"

echo "== 1-D interpolation between A and B (fixed batch, timesteps and noise)"
# shellcheck disable=SC2086
python scripts/interpolate.py $FLAGS --model_a "$(ema "$DEMO/train")" --model_b "$(ema "$OUT/B_seed1")" \
  --data_dir "$DATA" --batch_size 128 --out "$OUT/interpolate"


echo "== 1-D interpolation within one run: A at step $((STEPS / 4)) -> $STEPS; GAN_seed0 at $((GAN_STEPS / 4)) -> $GAN_STEPS"
# shellcheck disable=SC2086
python scripts/interpolate.py $FLAGS --model_a "$A_EARLY" --model_b "$A_LATE" \
  --data_dir "$DATA" --batch_size 128 --out "$OUT/interp_run_diffusion"
python scripts/interpolate.py --model_a "$(ganckpt "$OUT/GAN_seed0" $((GAN_STEPS / 4)))" \
  --model_b "$(ganckpt "$OUT/GAN_seed0" "$GAN_STEPS")" --data_dir "$DATA" --batch_size 128 --out "$OUT/interp_run_gan"
echo "== 1-D interpolation between the two GAN seeds"
python scripts/interpolate.py --model_a "$(ganckpt "$OUT/GAN_seed0" "$GAN_STEPS")" \
  --model_b "$(ganckpt "$OUT/GAN_seed1" "$GAN_STEPS")" --data_dir "$DATA" --batch_size 128 --out "$OUT/interp_seeds_gan"
stamp "interpolation"

echo "== Hessian spectrum of A (Lanczos and power iteration, with density)"
# shellcheck disable=SC2086
python scripts/hessian.py $FLAGS --model_path "$(ema "$DEMO/train")" --data_dir "$DATA" \
  --batch_size 64 --top_k 5 --method both --density True --out "$OUT/hessian"
for player in generator discriminator; do
  echo "== Hessian spectrum of GAN_seed0's $player loss"
  python scripts/hessian.py --model_path "$(ganckpt "$OUT/GAN_seed0" "$GAN_STEPS")" --gan_loss "$player" \
    --data_dir "$DATA" --batch_size 64 --top_k 5 --method both --density True --out "$OUT/hessian_gan_$player"
done
stamp "hessian"

echo "== side-by-side figures and the table"
python scripts/interpolate.py --compare "$OUT/interp_run_diffusion/interpolation.json,$OUT/interp_run_gan/interpolation.json" \
  --names "diffusion A,DCGAN seed 0" --out "$OUT/compare/run"
python scripts/interpolate.py --compare "$OUT/interpolate/interpolation.json,$OUT/interp_seeds_gan/interpolation.json" \
  --names "diffusion A-B,DCGAN seed 0-1" --out "$OUT/compare/seeds"
python scripts/hessian.py --compare "$OUT/hessian/hessian.json,$OUT/hessian_gan_generator/hessian.json,$OUT/hessian_gan_discriminator/hessian.json" \
  --names "diffusion A,DCGAN L_G,DCGAN L_D" --out "$OUT/compare"
python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
load = lambda *p: json.load(open(os.path.join(out, *p)))
cons = load("consistency", "consistency.json")
psnr = {(p["name_i"], p["name_j"]): p["psnr"] for p in cons["pairs"]}
rows = [("diffusion (demo UNet)", "A_seed0", "B_seed1", "C_arch", "seeds 0/1; C: channel_mult 1,2"),
        ("DCGAN", "GAN_seed0", "GAN_seed1", "GAN_w32", "seeds 0/1; w32: width 32 instead of 64")]
lines = ["| model | PSNR, 2 seeds (dB) | PSNR, other architecture (dB) | mean of the 3 pairs (dB) | models |",
         "|---|---:|---:|---:|---|"]
for label, a, b, c, what in rows:
    pairs = [psnr[(a, b)], psnr[(a, c)], psnr[(b, c)]]
    lines.append(f"| {label} | {pairs[0]:.2f} | {pairs[1]:.2f} / {pairs[2]:.2f} | {sum(pairs) / 3:.2f} | {what} |")
lines += ["", "| loss landscape | lambda_1 | lambda_1 / lambda_5 | loss | lambda_1 / loss "
          "| run: range / ends | run: largest step / ends | run: slope sign changes "
          "| seeds: barrier / ends | seeds: slope sign changes |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
run = {"diffusion": load("interp_run_diffusion", "interpolation.json"), "gan": load("interp_run_gan", "interpolation.json")}
seeds = {"diffusion": load("interpolate", "interpolation.json"), "gan": load("interp_seeds_gan", "interpolation.json")}
for label, hess, kind, curve in (("diffusion A, L_simple", "hessian", "diffusion", "loss"),
                                 ("DCGAN seed 0, L_G", "hessian_gan_generator", "gan", "generator"),
                                 ("DCGAN seed 0, L_D", "hessian_gan_discriminator", "gan", "discriminator")):
    h = load(hess, "hessian.json")
    r, s = run[kind]["roughness"][curve], seeds[kind]["roughness"][curve]
    lines.append(f"| {label} | {h['eigenvalues'][0]:.4g} | {h['ratio_1_k']:.3g} | {h['loss']:.4g} | "
                 f"{h['eigenvalues'][0] / h['loss']:.4g} | {r['rel_range_0_1']:.3g} | {r['rel_max_jump']:.3g} | "
                 f"{r['direction_changes']} | {s['barrier']:.3g} | {s['direction_changes']} |")
open(os.path.join(out, "contrast_table.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
stamp "done"
echo "results: $OUT/consistency $OUT/interpolate $OUT/interp_* $OUT/hessian* $OUT/compare $OUT/contrast_table.md"
