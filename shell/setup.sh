#!/usr/bin/env bash
# Creates .venv (if missing) and installs requirements.txt into it.
# Idempotent: a stamp holding the hash of requirements.txt and of this script skips pip when nothing changed.
# On a machine without an NVIDIA GPU (no nvidia-smi), torch and torchvision come from PyTorch's CPU-only index: the
# same versions without the CUDA libraries, a download of a few hundred MB instead of several GB. TORCH_INDEX overrides
# the choice (an index URL, or "pypi" for the default wheels, which bundle CUDA); if the CPU index cannot serve the
# pinned versions, pip falls back to the package index's own wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt shell/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
if [ -z "${TORCH_INDEX:-}" ]; then
  TORCH_INDEX=https://download.pytorch.org/whl/cpu
  if command -v nvidia-smi > /dev/null 2>&1; then TORCH_INDEX=pypi; fi
fi
PIP=("$VENV/bin/python" -m pip install -qq --disable-pip-version-check)
if [ "$TORCH_INDEX" != pypi ]; then
  echo "[setup] installing torch and torchvision from $TORCH_INDEX (TORCH_INDEX=pypi for the wheels with CUDA)"
  grep -E '^(torch|torchvision)[=<>~ ]' requirements.txt > "$VENV/.torch-requirements.txt"
  "${PIP[@]}" --index-url "$TORCH_INDEX" -r "$VENV/.torch-requirements.txt" ||
    echo "[setup] $TORCH_INDEX cannot serve them; using the package index's wheels"
fi
echo "[setup] installing requirements into $VENV (about a minute on a fresh machine)"
"${PIP[@]}" -r requirements.txt
# The face detector's weights (MTCNN, MIT licence) ship in facenet-pytorch, whose metadata pins an old torch: install it
# without its dependencies so our torch stays; photos/mtcnn.py reads only its weight files (docs/photos.md).
"${PIP[@]}" --no-deps facenet-pytorch==2.6.0
"$VENV/bin/python" -c "import torch, torchvision, timm; print('[setup] torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
echo "$want" > "$stamp"
