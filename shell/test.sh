#!/usr/bin/env bash
# The README's test command: creates/updates .venv, then runs the default test suite (slow tests excluded).
# Extra arguments go to pytest, e.g. `bash shell/test.sh -m slow` or `bash shell/test.sh tests/model`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash shell/setup.sh
# tests/photos/test_report_browser.py renders discover.py's report in headless Chromium (Debian's package): install it
# where apt can (as root, or with password-less sudo); elsewhere that test is skipped and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=()
  [ "$(id -u)" -eq 0 ] || SUDO=(sudo -n)
  quiet_apt_get() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" >/dev/null 2>&1; }
  { quiet_apt_get install -y --no-install-recommends chromium || { quiet_apt_get update && quiet_apt_get install -y --no-install-recommends chromium; }; } \
    || echo "shell/test.sh: chromium could not be installed; the report's browser test will be skipped" >&2
fi
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
# pytest exits 5 when it collects no test: that is a failure here, never a silent pass.
exec .venv/bin/python -m pytest "$@"
