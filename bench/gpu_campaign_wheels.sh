#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels bench/gpu_campaign.sh installs on a bare CUDA
# image that has torch, transformers, peft and accelerate but not the rest of mistral-tune's needs.
#
#   bench/gpu_campaign_wheels.sh DIR [PYTHON_VERSION]      # default 3.12 (the device image's Python)
#
# Writes DIR/core (26 MB: transformers 5.24 and peft 0.21.2 as pinned, trl, datasets, hydra-core,
# omegaconf, mistral-common, pydantic, jsonschema, liger-kernel, ...) and DIR/bnb (bitsandbytes, 43 MB:
# CUDA kernels for every arch), so that each fits a 64 MiB transfer on its own; gpu_campaign.sh
# installs both into one directory (--install-only for the first). Versions are the lock's
# (requirements/lock-cpu.txt); liger-kernel is the [liger] extra. antlr4-python3-runtime (hydra-core's
# parser) is published as an sdist only: it is built into a pure-Python wheel here. tokenizers, numpy,
# safetensors, huggingface-hub, tiktoken, sentencepiece, pyarrow, xxhash: the image's are used.
set -euo pipefail
DIR="$1"
PYV="${2:-3.12}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/requirements/lock-cpu.txt"
pin() { local n; n="$(grep -iE "^${1//[-_]/[-_]}==" "$LOCK" | head -1)"; [ -n "$n" ] || { echo "gpu_campaign_wheels.sh: $1 is not in $LOCK" >&2; exit 2; }; echo "$n"; }
mkdir -p "$DIR/core" "$DIR/bnb"
PKGS=(
  "$(pin transformers)" "$(pin peft)" "$(pin trl)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)"
  "$(pin hydra-core)" "$(pin omegaconf)" "$(pin mistral-common)" "$(pin pydantic)" "$(pin pydantic-core)"
  "$(pin pydantic-extra-types)" "$(pin annotated-types)" "$(pin typing-inspection)"
  "$(pin jsonschema)" "$(pin jsonschema-specifications)" "$(pin referencing)" "$(pin rpds-py)"
  "liger-kernel==0.6.4"
)
download() {
  local to="$1"; shift
  python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$to" "$@"
}
download "$DIR/core" "${PKGS[@]}"
download "$DIR/bnb" "$(pin bitsandbytes)"
python3 -m pip wheel --no-deps -w "$DIR/core" "$(pin antlr4-python3-runtime)"
du -sh "$DIR/core" "$DIR/bnb"
