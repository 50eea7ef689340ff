#!/usr/bin/env bash
# Install LLaMA-Factory into a venv of its own (never into the project's venv), CPU torch pinned.
# Usage: bench/peers/install_llamafactory.sh [VENV_DIR]   (default /work/venvs/peer-llamafactory)
set -euo pipefail
VENV=${1:-/work/venvs/peer-llamafactory}
LLAMAFACTORY_VERSION=0.9.5
source "$(dirname "$0")/peer_venv.sh"
install_peer "llamafactory==$LLAMAFACTORY_VERSION"
# llamafactory pulls torchvision/torchaudio builds compiled against another torch; under torch 2.13 importing
# them fails (undefined symbols / mismatched ops). LLaMA-Factory's text-only SFT path does not need them:
# torchvision is removed, and torchaudio (imported unconditionally by transformers' audio utilities through
# llamafactory's multimodal plugin) is replaced by an empty stub package.
$VENV/bin/pip uninstall -y torchvision torchaudio || true
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$SITE/torchaudio"
cat > "$SITE/torchaudio/__init__.py" <<'PYEOF'
# Stub written by mistral-tune's bench/peers/install_llamafactory.sh: the real torchaudio wheel does not
# load under torch 2.13 and text-only fine-tuning never uses it.
__version__ = "0.0.0+stub"
PYEOF
"$VENV/bin/python" -c 'import torch, llamafactory; print("llamafactory", llamafactory.__version__, "torch", torch.__version__)'
"$VENV/bin/pip" freeze > "$VENV/freeze.txt"
