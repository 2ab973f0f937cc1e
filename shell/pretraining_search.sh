#!/usr/bin/env bash
# The search for a DINO recipe that learns at CPU size (docs/pretraining.md, "Pretraining that learns"): ViT-T/16 at
# 48 px, the face preset, the releases' stochastic depth (0.1) and local crops, on SynthFaces identities that the
# benchmark does not have (another generation seed, labels unused). Each run is probed on the benchmark's test
# identities (benchmarks/pretraining_probe.py: 1-NN and k-means accuracy) beside raw pixels and a random ViT, and the
# runs' collapse curves (teacher entropy / log K, the features' mean cosine) are drawn side by side.
#   a  DINO's recipe shrunk to the data: 4,096 prototypes, teacher temperature 0.02, teacher EMA 0.99
#   b  fewer prototypes: 256, teacher temperature 0.04, DINO's teacher EMA 0.996
#   c  1,024 prototypes, teacher temperature 0.03, teacher EMA 0.996, twice the learning rate
#   d  more images: run b's recipe on 500 x 20 images (PRE_DATA_LARGE), about as many steps (4 epochs: 624 vs 500)
#   e  a longer schedule: run b's recipe for 3x the epochs
# Resumable (a finished run is skipped, an interrupted one continues from last.pth.tar). RUNS="a c" runs a subset
# (two such processes with disjoint RUNS can share the machine); the probe runs once every run has finished.
# About an hour of CPU on 2 cores.
set -euo pipefail
OUT=${OUT:-output/pretraining_search}
RES=${RES:-results/pretraining_search}
# PY, stamp, DATASET/DATA (the benchmark, synthfaces_quick), VIT and `resume RUN` (FRESH=1 starts over)
source "$(dirname "$0")/demo_common.sh"
RUNS=${RUNS:-"a b c d e"}
EPOCHS=${EPOCHS:-10}
PRE_DATA=${PRE_DATA:-$SSL_DATA}                                   # shared with shell/claim_table.sh's reduced scale
PRE_DATA_LARGE=${PRE_DATA_LARGE:-data/synthfaces_pretrain_s1_500x20}  # and its full scale
COMMON=(--method dino --dataset recognition_folders --workers 0 --no-progress --output "$OUT" "${VIT[@]}"
  --val-interval 1000 --checkpoint-select last --input-preset face)
# SSL (the shared schedule) and SSL_LEARNS (run b's and e's prototypes and teacher) come from demo_common.sh

generate() {  # generate FOLDER IDS PER_ID: a SynthFaces recognition set drawn with seed 1 (the benchmark: seed 0)
  [ -f "$1/meta.json" ] || "$PY" -m data_loader.synthface --out "$1" --ids "$2" --train-per-id "$3" --test-per-id 1 \
    --seed 1 --no-progress
}
# run NAME DATA EPOCHS FLAGS...: train (or continue) one DINO run; skipped once finished
run() {
  local name=$1 data=$2 epochs=$3; shift 3
  if [ -f "$OUT/$name/.done" ]; then stamp "== $name: done, skipped"; return; fi
  stamp "== $name"
  "$PY" train.py "${COMMON[@]}" "${SSL[@]}" --data-path "$data/train" --epochs "$epochs" "$@" --experiment "$name" \
    $(resume "$name")
  touch "$OUT/$name/.done"
}

stamp "== data: $DATA (probe), $PRE_DATA and $PRE_DATA_LARGE (pretraining, seed 1)"
"$PY" -c "from data_loader.synthface import ensure_synthfaces; ensure_synthfaces('$DATA', '$DATASET')"
generate "$PRE_DATA" 200 16
for r in $RUNS; do
  case $r in
    a) run a_k4096_t02 "$PRE_DATA" "$EPOCHS" --head-out-dim 4096 --warmup-teacher-temp 0.02 --teacher-temp 0.02 \
         --momentum-teacher 0.99 ;;
    b) run b_k256_t04 "$PRE_DATA" "$EPOCHS" "${SSL_LEARNS[@]}" ;;
    c) run c_k1024_t03_lr5 "$PRE_DATA" "$EPOCHS" --head-out-dim 1024 --warmup-teacher-temp 0.03 --teacher-temp 0.03 \
         --momentum-teacher 0.996 --lr 5e-4 ;;
    d) generate "$PRE_DATA_LARGE" 500 20
       # about as many optimiser steps as b (whole epochs, rounded up): 10,000 images instead of 3,200
       run d_k256_t04_10k "$PRE_DATA_LARGE" $(( (EPOCHS * 3200 + 9999) / 10000 )) "${SSL_LEARNS[@]}" ;;
    e) run e_k256_t04_long "$PRE_DATA" $(( 3 * EPOCHS )) "${SSL_LEARNS[@]}" ;;  # the DINO start (demo_common.sh)
    *) echo "error: RUNS holds '$r'; expected letters among a b c d e" >&2; exit 2 ;;
  esac
done

names=(a_k4096_t02 b_k256_t04 c_k1024_t03_lr5 d_k256_t04_10k e_k256_t04_long)
pending=() checkpoints=()
for n in "${names[@]}"; do
  [ -f "$OUT/$n/.done" ] || pending+=("$n")
  checkpoints+=("$OUT/$n/checkpoint.pth")
done
if [ ${#pending[@]} -gt 0 ]; then
  stamp "not probed yet: ${pending[*]} still to run (RUNS=...)"
  exit 0
fi
mkdir -p "$RES"
stamp "== probe: the benchmark's test identities (unseen in pretraining)"
"$PY" -m benchmarks.pretraining_probe pixels random "${checkpoints[@]}" --data "$DATA" --json "$RES/probe.json" \
  --curves "$RES/collapse_curves.png" 2>&1 | grep -v " INFO " | sed "s#$OUT/\([a-z0-9_]*\)/checkpoint.pth#\1#" \
  | tee "$RES/probe.txt"
stamp "done"
