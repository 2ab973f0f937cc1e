#!/usr/bin/env bash
# Creates .venv (if missing) and installs requirements.txt into it.
# Idempotent: a stamp holding the hash of requirements.txt skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
echo "[setup] installing requirements into $VENV (about a minute on a fresh machine)"
"$VENV/bin/python" -m pip install -qq --upgrade pip
"$VENV/bin/python" -m pip install -qq -r requirements.txt
"$VENV/bin/python" -c "import torch, torchvision, timm; print('[setup] torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
echo "$want" > "$stamp"
