#!/usr/bin/env bash
# Install axolotl into a venv of its own (never into the project's venv), CPU torch pinned.
# Usage: bench/peers/install_axolotl.sh [VENV_DIR]   (default /work/venvs/peer-axolotl)
set -euo pipefail
VENV=${1:-/work/venvs/peer-axolotl}
AXOLOTL_VERSION=0.19.0
source "$(dirname "$0")/peer_venv.sh"
install_peer "axolotl==$AXOLOTL_VERSION"
"$VENV/bin/python" -c 'import torch, axolotl; print("axolotl", axolotl.__version__, "torch", torch.__version__)'
"$VENV/bin/pip" freeze > "$VENV/freeze.txt"
