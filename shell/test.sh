#!/usr/bin/env bash
# The README's test command: creates/updates .venv, then runs the default test suite (slow tests excluded).
# Extra arguments go to pytest, e.g. `bash shell/test.sh -m slow` or `bash shell/test.sh tests/model`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash shell/setup.sh
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
# pytest exits 5 when it collects no test: that is a failure here, never a silent pass.
exec .venv/bin/python -m pytest "$@"
