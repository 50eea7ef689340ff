# Sourced by install_<peer>.sh: make the venv $VENV with CPU torch pinned, then pip-install "$@" under that
# pin (never into the project's venv). Sets PIP for the caller's own extra steps.
TORCH_PIN=torch==2.13.0          # the CPU wheel; an unpinned torch would pull multi-GB CUDA wheels
PY=${PYTHON:-python3.11}
PIP="$VENV/bin/pip install --disable-pip-version-check"

install_peer() {
  $PY -m venv "$VENV"
  local constraints="$VENV/constraints.txt"
  echo "$TORCH_PIN" > "$constraints"
  $PIP "$TORCH_PIN"
  $PIP -c "$constraints" "$@"
}
