#!/usr/bin/env bash
# Install the pinned environment into .venv and run the whole test suite on CPU.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: bash scripts/test.sh [PYTEST ARGUMENTS...]
       bash scripts/test.sh -h|--help

Install the pinned environment into .venv (scripts/install.sh) and run the test suite in
tests/ with pytest on the CPU (what CI runs: about 900 tests, about 15 minutes on a 2-core
machine after the install, e.g. 781 s in a clean-clone CI run;
-m "not slow" runs the quick ~700 without the end-to-end training runs).
Arguments are passed on to pytest after `tests`, e.g.
  bash scripts/test.sh -x -k fid     # stop at the first failure; only tests matching "fid"
  bash scripts/test.sh -m "not slow" # the quick tests, without end-to-end training runs
(`.venv/bin/python -m pytest --help` lists pytest's own options; for one file, run
`.venv/bin/python -m pytest tests/test_launch.py` after the install.)

Environment variables (default):
  OMP_NUM_THREADS      CPU threads per test process                          (2)
  PYTHON               the interpreter that creates .venv (scripts/install.sh) (python3)
  IDIFF_TEST_DEVICE    device of tests/test_fast_path.py, e.g. cuda          (cpu)
  IDIFF_TEST_INDUCTOR  1 also runs the torch.compile (inductor) test there   (off)
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q -rs tests "$@"
