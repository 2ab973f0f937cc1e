#!/usr/bin/env bash
# The paper's claim from a pretrained start, at CPU size on SynthFaces (docs/method.md "The claim from a
# pretrained start"): FaceGCD against GCD and the ArcFace baseline, all from one supervised start, over seeds.
#   1. A SynthFaces recognition set whose identities are disjoint from the benchmark's (another generation seed).
#   2. The start: ArcFace (the face preset) on that set, ViT-T/16 at 48 px like the quickstart.
#   3. From that one start, the same trainable blocks (the last one) and the same number of optimiser steps:
#      FaceGCD (prefixes; last block + HyperNetwork + head), GCD (--prefix_length 0; last block + head) and the
#      ArcFace baseline fine-tuned on D_L (last block + its embedding neck; the class centres are new).
#   4. Floors: the frozen start itself (its embedding, and its ViT's CLS token) and raw pixels.
#   5. SS-k-means on every feature set; mean and spread (sample std over seeds) of v2 All/Old/New on D_U and test.
# START_FROM=dino runs the same arms from a second start: the DINO start of shell/pretraining_search.sh (its run e,
# self-supervised on 200 other identities; trained first if missing), into output/claim_dino and results/claim_dino.
# Its floors are its ViT's CLS token and raw pixels; the ArcFace arm's embedding neck starts random.
# START_FROM=part_fvit: the paper's FaceGCD with --landmark_cnn. The start is a Part fViT (ArcFace with a landmark CNN
# learned end to end) on the same identities and budget as the supervised start; every arm and floor then reads the
# start's landmark mosaics through its frozen CNN. Into output/claim_part_fvit and results/claim_part_fvit.
# Resumable: a finished arm (its ssk_results.json) is skipped, an interrupted training continues from last.pth.tar.
# Every scale knob is a variable; the defaults are the full scale (about an hour of CPU):
#   SEEDS="0 1 2" PRE_IDS=500 PRE_PER_ID=20 START_EPOCHS=20 EPOCHS=28 LABELLED_EPOCHS=$((4 * EPOCHS))
# A reduced run: SEEDS="0" PRE_IDS=200 PRE_PER_ID=16 START_EPOCHS=10 EPOCHS=8 bash shell/claim_table.sh
set -euo pipefail
START_FROM=${START_FROM:-arcface}
case $START_FROM in
  arcface) suffix= ;;
  dino) suffix=_dino ;;
  part_fvit) suffix=_part_fvit ;;
  *) echo "error: START_FROM=$START_FROM; expected arcface (the supervised start), dino (the DINO start) or" \
       "part_fvit (a supervised start with a landmark CNN)" >&2; exit 2 ;;
esac
OUT=${OUT:-output/claim$suffix}
RES=${RES:-results/claim$suffix}
# PY, stamp, DATASET/DATA (the benchmark, synthfaces_quick), VIT and `resume RUN` (FRESH=1 starts over)
source "$(dirname "$0")/demo_common.sh"
SEEDS=${SEEDS:-"0 1 2"}
PRE_IDS=${PRE_IDS:-500}
PRE_PER_ID=${PRE_PER_ID:-20}
PRE_SEED=${PRE_SEED:-1}  # the benchmark is generated with seed 0: another seed draws other identities
PRE_DATA=${PRE_DATA:-data/synthfaces_pretrain_s${PRE_SEED}_${PRE_IDS}x${PRE_PER_ID}}
START_EPOCHS=${START_EPOCHS:-20}
EPOCHS=${EPOCHS:-28}                          # FaceGCD and GCD: D_L + D_U, 1,600 images
LABELLED_EPOCHS=${LABELLED_EPOCHS:-$((4 * EPOCHS))}  # ArcFace on D_L (400 images): the same number of steps
[ "$START_FROM" = dino ] && START=$DINO_START || START=$OUT/start/last.pth.tar
COMMON=(--dataset "$DATASET" --data-path "$DATA" --workers 0 --no-progress --output "$OUT" --input-preset face)
EVAL=(--val-interval 1000 --val-kmeans-init 1 --checkpoint-select last)
SCHEDULE=(--opt adamw --lr 2e-4 --weight-decay 0.05 --warmup-epochs 3 --batch-size 64 --clip-grad 1.0)
GCD=(--hypernet-hidden-dim 256 --head-out-dim 2048 --grad-from-block 11 --pretrained-weights "$START")
SSK=(--save_dir "$RES" --max_kmeans_iter 100 --k_means_init 3)
FRONT=() START_FRONT=()  # the landmark front end of a part_fvit start: learned by the start, then frozen
if [ "$START_FROM" = part_fvit ]; then
  FRONT=(--landmark_cnn --landmark-weights "$OUT/start/landmark_cnn.pth")
  START_FRONT=(--landmark_cnn --landmark-weights "$OUT/start/no_initial_cnn.pth")  # absent: a random CNN to learn
fi
# Runs of one scale only in $OUT: a rerun at another scale would mix them (SEEDS may grow: each seed is its own run)
if [ "$START_FROM" = dino ]; then
  one_scale "start=$START epochs=$EPOCHS labelled_epochs=$LABELLED_EPOCHS"
else
  one_scale "pre_data=$PRE_DATA start_epochs=$START_EPOCHS epochs=$EPOCHS labelled_epochs=$LABELLED_EPOCHS"
fi

finished() { [ -f "$RES/$1/ssk/default/ssk_results.json" ]; }
ssk() { "$PY" SSK.py --overwrite "${SSK[@]}" --experiment_idx "$1" --no-plots; }
# arm RUN TRAIN-FLAGS...: train (or continue) RUN, extract its features, cluster them; skipped once clustered
arm() {
  local run=$1; shift
  if finished "$run"; then stamp "== $run: done, skipped"; return; fi
  stamp "== $run"
  "$PY" train.py "${COMMON[@]}" "${VIT[@]}" "${EVAL[@]}" "${SCHEDULE[@]}" "${FRONT[@]}" "$@" --experiment "$run" \
    $(resume "$run")
  "$PY" extract_features.py --overwrite --checkpoint_weights "$OUT/$run/last.pth.tar" --workers 0 --save_dir "$RES" \
    --experiment "$run" "${FRONT[@]:0:1}"
  ssk "$run"
}

stamp "== data: the benchmark $DATASET in $DATA"
"$PY" -c "from data_loader.synthface import ensure_synthfaces; ensure_synthfaces('$DATA', '$DATASET')"
if [ "$START_FROM" = dino ]; then
  ensure_dino_start
  stamp "== the start: $START (DINO on 200 other identities, no labels)"
else
  stamp "== the start: ArcFace ${START_FRONT[*]:0:1} on $PRE_IDS identities of $PRE_DATA (seed $PRE_SEED, face preset)," \
    "$START_EPOCHS epochs"
  [ -f "$PRE_DATA/meta.json" ] || "$PY" -m data_loader.synthface --out "$PRE_DATA" --ids "$PRE_IDS" \
    --train-per-id "$PRE_PER_ID" --test-per-id 1 --seed "$PRE_SEED" --no-progress
  if [ ! -f "$OUT/start/.done" ]; then
    "$PY" train.py --method recognition --dataset recognition_folders --data-path "$PRE_DATA/train" --workers 0 \
      --no-progress --output "$OUT" "${VIT[@]}" --head arcface --embedding-size 192 --epochs "$START_EPOCHS" \
      --batch-size 64 "${START_FRONT[@]}" --experiment start $(resume start)
    touch "$OUT/start/.done"
  fi
fi

stamp "== floors: raw pixels and the frozen start (its ViT's CLS token as FaceGCD reads it; a supervised start's embedding)"
if ! finished pixels; then
  "$PY" extract_features.py --overwrite --dataset "$DATASET" --data-path "$DATA" --workers 0 "${VIT[@]}" \
    --input-preset face --features pixels --save_dir "$RES" --experiment pixels
  ssk pixels
fi
if [ "$START_FROM" != dino ] && ! finished start; then
  "$PY" extract_features.py --overwrite --checkpoint_weights "$START" --dataset "$DATASET" --data-path "$DATA" \
    --workers 0 --save_dir "$RES" --experiment start "${FRONT[@]:0:1}"
  ssk start
fi
if ! finished start_cls; then
  "$PY" extract_features.py --overwrite --dataset "$DATASET" --data-path "$DATA" --workers 0 "${VIT[@]}" \
    --input-preset face --prefix_length 0 --pretrained-weights "$START" --save_dir "$RES" --experiment start_cls \
    "${FRONT[@]}"
  ssk start_cls
fi

for seed in $SEEDS; do
  arm "facegcd_s$seed" "${GCD[@]}" --prefix_length 4 --epochs "$EPOCHS" --seed "$seed"
  arm "gcd_s$seed" "${GCD[@]}" --prefix_length 0 --epochs "$EPOCHS" --seed "$seed"
  arm "arcface_s$seed" --method recognition --head arcface --embedding-size 192 --pretrained-weights "$START" \
    --grad-from-block 11 --epochs "$LABELLED_EPOCHS" --seed "$seed"
done

declare -A TITLE=([facegcd]="FaceGCD (prefixes)" [gcd]="GCD (--prefix_length 0)" [arcface]="ArcFace fine-tuned on D_L")
rows=()
for name in facegcd gcd arcface; do
  dirs=()
  for seed in $SEEDS; do dirs+=("$RES/${name}_s$seed"); done
  rows+=(--row "${TITLE[$name]}" "${dirs[@]}")
done
echo
floors=()
[ "$START_FROM" != dino ] && floors+=(--row "frozen start (embedding)" "$RES/start")
case $START_FROM in
  dino) what="from the DINO start (200 other identities, no labels)" ;;
  part_fvit) what="with the landmark front end, from one Part fViT start on $PRE_IDS other identities" ;;
  *) what="from one ArcFace start on $PRE_IDS other identities" ;;
esac
echo "== v2 clustering accuracy (%), $DATASET, $what; seeds: $SEEDS"
"$PY" -m benchmarks.claim_table "${rows[@]}" "${floors[@]}" --row "frozen start (ViT CLS)" "$RES/start_cls" \
  --row "raw pixels" "$RES/pixels" | tee "$RES/table.md"
stamp "done"
