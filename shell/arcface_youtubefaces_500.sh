#!/usr/bin/env bash
# ArcFace baseline on youtubefaces_500 (see shell/run_arcface_gfd.sh for the environment variables).
exec bash "$(dirname "$0")/run_arcface_gfd.sh" youtubefaces_500 "$@"
