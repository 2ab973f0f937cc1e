#!/usr/bin/env bash
# FaceGCD recipe on casia_500 (see shell/run_gfd.sh for the environment variables).
exec bash "$(dirname "$0")/run_gfd.sh" casia_500 "$@"
