#!/usr/bin/env bash
# One prepared run on one GPU: fast-path tests, then the benchmark figures docs/benchmarks.md
# records. Every step writes its log (and JSON) into the output folder; a table comes last.
set -uo pipefail

usage() {
  cat <<'USAGE'
usage: bash scripts/gpu_check.sh [--out DIR] [--budget SECONDS] [--dry_run]
       bash scripts/gpu_check.sh -h|--help

Runs, in this order, each step under its own time limit and never past --budget in all:
  1. tests/test_fast_path.py on CUDA (IDIFF_TEST_DEVICE=cuda); a failure stops the rest
  2. compare: CIFAR-10 config, batch 128, plain fp32 path vs the fast path (bf16,
     channels-last, fused AdamW), the methods' share of a step, a profile of the fast step
  3. compiled: the fast path under torch.compile
  4. ddim10k: 10k DDIM-50 samples timed through sample_images, compiled (what
     image_sample.py --compile True runs; eager took 85.6 s on an H200, compiled 25.5 s)
  5. graphs: the compiled step with CUDA graphs (--compile_mode reduce-overhead); its
     warm-up (compilation and capture) is reported apart from the steady step (warmup_s)
  6. big_bN: ImageNet-128 config at the largest batch of 96, 64, 32 that fits (eager)
Outputs in DIR (default runs/gpu_check): STEP.log, STEP.json, profile_cifar10.txt and
summary.txt (the table printed last).

  --dry_run   the same steps on the CPU at toy size (demo config, a few steps), so that the
              GPU call cannot fail on a typo; tests are only collected. About a minute.
  --budget    wall-clock seconds for the whole run (default 450)
  --skip_compile  leave out steps 3 and 5 (they compile for minutes on a CPU)
  --keep_going    run the benchmark steps even when a test failed (the summary says so)

Environment: PYTHON (python3). The GPU machine needs only torch, numpy and pytest.
USAGE
}

OUT_DIR=runs/gpu_check
BUDGET=450
DRY=0
SKIP_COMPILE=0
KEEP_GOING=0
while (( $# )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    --dry_run) DRY=1; shift ;;
    --skip_compile) SKIP_COMPILE=1; shift ;;
    --keep_going) KEEP_GOING=1; shift ;;
    *) echo "gpu_check.sh: error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: error: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2; }

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
START=$(date +%s)
STATUS=()

# step NAME LIMIT CMD...: run CMD under min(LIMIT, time left), log to OUT_DIR/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    STATUS+=("$name: skipped (budget spent)"); echo "== $name: skipped, budget spent"; return 3
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  tail -n 4 "$OUT_DIR/$name.log"
  case $rc in
    0) STATUS+=("$name: ok (${took}s)") ;;
    124|137) STATUS+=("$name: TIMED OUT after ${took}s") ;;
    *) STATUS+=("$name: FAILED rc=$rc (${took}s)") ;;
  esac
  return $rc
}

BENCH=("$PY" scripts/benchmark.py --cudnn_benchmark True)
if (( DRY )); then
  CONFIG=demo; BATCH=4; SAMPLE_BATCH=4; NSAMPLES=8; STEPS=(--steps 2 --warmup 1 --overhead_iters 20)
  BIG=demo; BIG_BATCHES=(8 4); DEVICE=(--device cpu --threads 1)
  TESTS=("$PY" -m pytest -q --collect-only tests/test_fast_path.py)
  COMPILE_SAMPLING=()  # inductor takes minutes on a CPU
else
  CONFIG=cifar10; BATCH=128; SAMPLE_BATCH=1000; NSAMPLES=10000; STEPS=(--steps 20 --warmup 5)
  BIG=imagenet128; BIG_BATCHES=(96 64 32)  # 128 ran out of 139 GiB on an H200 (session 3); DEVICE=()
  TESTS=(env IDIFF_TEST_DEVICE=cuda "$PY" -m pytest -q -rs tests/test_fast_path.py)
  COMPILE_SAMPLING=(--compile True)
  (( KEEP_GOING )) || TESTS+=(-x)
fi

{
  echo "date: $(date -u +%FT%TZ)"
  "$PY" -c 'import torch, platform; print("torch", torch.__version__, "python", platform.python_version());
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
} 2>&1 | tee "$OUT_DIR/machine.txt"

if ! step tests 150 "${TESTS[@]}" && (( ! KEEP_GOING )); then
  echo "gpu_check: the fast-path tests failed; the benchmark steps are not run (see $OUT_DIR/tests.log)"
  printf '%s\n' "${STATUS[@]}" | tee "$OUT_DIR/summary.txt"
  exit 1
fi

step compare 150 "${BENCH[@]}" "${DEVICE[@]}" --config $CONFIG --batch_size $BATCH --sample_batch_size $SAMPLE_BATCH \
  --compare True "${STEPS[@]}" --profile_steps 3 --profile_out "$OUT_DIR/profile_$CONFIG.txt" \
  --json "$OUT_DIR/compare.json"
(( SKIP_COMPILE )) || step compiled 240 "${BENCH[@]}" "${DEVICE[@]}" --config $CONFIG --batch_size $BATCH \
  --precision bf16 --channels_last True --optimizer_impl fused --compile True --parts train \
  "${STEPS[@]}" --json "$OUT_DIR/compiled.json"
step ddim10k 150 "${BENCH[@]}" "${DEVICE[@]}" --config $CONFIG --batch_size $BATCH --sample_batch_size $SAMPLE_BATCH \
  --precision bf16 --channels_last True "${COMPILE_SAMPLING[@]}" --parts sample --steps 2 --warmup 1 --sample_images $NSAMPLES \
  --json "$OUT_DIR/ddim10k.json"
(( SKIP_COMPILE )) || step graphs 240 "${BENCH[@]}" "${DEVICE[@]}" --config $CONFIG --batch_size $BATCH \
  --precision bf16 --channels_last True --optimizer_impl fused --compile True --compile_mode reduce-overhead \
  --parts train "${STEPS[@]}" --json "$OUT_DIR/graphs.json"
for b in "${BIG_BATCHES[@]}"; do
  step "big_b$b" 90 "${BENCH[@]}" "${DEVICE[@]}" --config $BIG --batch_size "$b" --sample_batch_size "$b" \
    --precision bf16 --channels_last True --optimizer_impl fused --parts train,sample --steps 5 --warmup 2 \
    --json "$OUT_DIR/big_b$b.json"
  rc=$?
  (( rc == 0 || rc == 3 )) && break
  grep -q "OutOfMemoryError\|out of memory" "$OUT_DIR/big_b$b.log" || break
  STATUS[-1]="big_b$b: out of memory, trying a smaller batch"
done

{
  echo
  echo "gpu_check summary ($(( $(date +%s) - START ))s of ${BUDGET}s budget)"
  printf '  %s\n' "${STATUS[@]}"
  "$PY" scripts/gpu_check_table.py "$OUT_DIR"
} 2>&1 | tee "$OUT_DIR/summary.txt"
