#!/usr/bin/env bash
# FaceGCD recipe on youtubefaces_1000 (see shell/run_gfd.sh for the environment variables).
exec bash "$(dirname "$0")/run_gfd.sh" youtubefaces_1000 "$@"
