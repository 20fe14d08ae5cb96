#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv with everything the tests and the demo need.
# Offline-friendly: torch/torchvision come from the local wheel cache where one exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.installed-$(cat requirements-dev.txt requirements-data.txt setup.py | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-dev.txt
  python -m pip install -q --no-deps -r requirements-data.txt
  python -m pip install -q --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
