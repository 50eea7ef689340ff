#!/usr/bin/env bash
# 7B-scale memory on a CPU machine (issue #22, section 3): the streamed merge and one QLoRA step.
#
#   bench/run_7b_memory.sh WORKDIR [PYTHON]
#
# Needs ~45 GB free in WORKDIR (a 14.5 GB bf16 base, a 14.5 GB merge) and ~8 GB of RAM; slow on a
# small machine (the base alone is ~2 min of CPU). Each step runs under /usr/bin/time -v; its
# "Maximum resident set size" and "Elapsed" lines go to WORKDIR/*.log, the JSON results beside them.
# Deletes nothing: remove WORKDIR when done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
D="$1"
PY="${2:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$D"
timed() { local name="$1"; shift; /usr/bin/time -v "$@" >"$D/$name.log" 2>&1; grep -E '^\{|Maximum resident|Elapsed \(wall' "$D/$name.log"; }
[ -f "$D/base/model.safetensors.index.json" ] || timed base "$PY" "$ROOT/bench/merge_7b.py" base --workdir "$D"
[ -f "$D/adapter/adapter_model.safetensors" ] || timed adapter "$PY" "$ROOT/bench/merge_7b.py" adapter --workdir "$D"
rm -rf "$D/merged"
timed merge "$PY" -m mistral_tune export adapter="$D/adapter" base="$D/base" out="$D/merged" dtype=bfloat16 verify=false
timed check "$PY" "$ROOT/bench/merge_7b.py" check --workdir "$D"
rm -rf "$D/merged"
timed qlora_step "$PY" "$ROOT/bench/qlora_7b_step.py" --base "$D/base" --out "$D/qlora_7b_step.json" --run-dir "$D/qlora-run"
