#!/usr/bin/env bash
# Install the pinned environment into .venv and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q -rs tests "$@"
