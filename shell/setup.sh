#!/usr/bin/env bash
# Creates .venv (if missing) and installs requirements.txt into it.
# Idempotent: a stamp holding the hash of requirements.txt and of this script skips pip when nothing changed.
# TORCH_INDEX=<index URL> installs torch and torchvision from that index first, e.g. PyTorch's CPU-only wheels
# (https://download.pytorch.org/whl/cpu: the same versions without the CUDA libraries, a few hundred MB instead of
# several GB) on a machine without a GPU that can reach it; by default everything comes from the package index.
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
PIP=("$VENV/bin/python" -m pip install -qq --disable-pip-version-check)
if [ -n "${TORCH_INDEX:-}" ]; then
  echo "[setup] installing torch and torchvision from $TORCH_INDEX"
  grep -E '^(torch|torchvision)[=<>~ ]' requirements.txt > "$VENV/.torch-requirements.txt"
  "${PIP[@]}" --index-url "$TORCH_INDEX" -r "$VENV/.torch-requirements.txt"
fi
echo "[setup] installing requirements into $VENV (about a minute on a fresh machine)"
"${PIP[@]}" -r requirements.txt
# The face detector's weights (MTCNN, MIT licence) ship in facenet-pytorch, whose metadata pins an old torch: install it
# without its dependencies so our torch stays; photos/mtcnn.py reads only its weight files (docs/photos.md).
"${PIP[@]}" --no-deps facenet-pytorch==2.6.0
"$VENV/bin/python" -c "import torch, torchvision, timm; print('[setup] torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
echo "$want" > "$stamp"
