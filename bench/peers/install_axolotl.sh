#!/usr/bin/env bash
# Install axolotl into a venv of its own (never into the project's venv), CPU torch pinned.
# Usage: bench/peers/install_axolotl.sh [VENV_DIR]   (default /work/venvs/peer-axolotl)
set -euo pipefail
VENV=${1:-/work/venvs/peer-axolotl}
AXOLOTL_VERSION=0.19.0
TORCH_PIN=torch==2.13.0          # the CPU wheel; an unpinned torch would pull multi-GB CUDA wheels
PY=${PYTHON:-python3.11}
$PY -m venv "$VENV"
PIP="$VENV/bin/pip install --disable-pip-version-check"
CONSTRAINTS="$VENV/constraints.txt"
echo "$TORCH_PIN" > "$CONSTRAINTS"
$PIP "$TORCH_PIN"
$PIP -c "$CONSTRAINTS" "axolotl==$AXOLOTL_VERSION"
"$VENV/bin/python" -c 'import torch, axolotl; print("axolotl", axolotl.__version__, "torch", torch.__version__)'
"$VENV/bin/pip" freeze > "$VENV/freeze.txt"
