#!/usr/bin/env bash
# The GPU campaign of issue #22 in one command (bench/gpu_campaign.py says what it measures).
#
#   bench/gpu_campaign.sh [--wheels DIR] [--install-only] [--out FILE] [--budget SECONDS] [--device cpu --tiny] ...
#
# --wheels DIR: install every *.whl in DIR first (pip, no index, no dependency resolution) into a
#   private target directory put first on PYTHONPATH: what a bare CUDA image with torch,
#   transformers, peft and accelerate lacks (trl, datasets, hydra-core, omegaconf, mistral-common,
#   bitsandbytes, liger-kernel, ...; bench/gpu_campaign_wheels.sh downloads them). Nothing is fetched.
#   The target directory (CAMPAIGN_SITE, default /tmp/mistral-tune-campaign-site) is kept, so wheels
#   can arrive in two calls: --wheels .whl/bnb --install-only, then --wheels .whl/core (the campaign).
# Everything else goes to bench/gpu_campaign.py. Exit status: 0 when every section ran and the packed
# loss equals the unpacked loss; the speed and memory goals are reported in the results file.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS=""
INSTALL_ONLY=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --wheels=*) WHEELS="${1#--wheels=}"; shift ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
SITE="${CAMPAIGN_SITE:-/tmp/mistral-tune-campaign-site}"
if [ -n "$WHEELS" ]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then echo "gpu_campaign.sh: no .whl files in $WHEELS" >&2; exit 2; fi
  echo "installing ${#wheels[@]} wheels from $WHEELS into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
fi
if [ "$INSTALL_ONLY" = 1 ]; then echo "installed into $SITE"; exit 0; fi
if [ -d "$SITE" ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PY" "$ROOT/bench/gpu_campaign.py" ${ARGS[@]+"${ARGS[@]}"}
