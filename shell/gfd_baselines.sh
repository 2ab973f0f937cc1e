#!/usr/bin/env bash
# ArcFace baseline vs GCD (--prefix_length 0) vs FaceGCD at quickstart size on SynthFaces, in one table.
# The three train from scratch on the same data with the same ViT-T/16 at 48 px and the same number of optimiser steps
# (about 700 of batch 64), in float32 (see shell/quickstart.sh): ArcFace on the labelled known identities D_L only
# (400 images: 112 epochs), GCD and FaceGCD on D_L and the unlabelled images D_U (1,600 images: 28 epochs). Each is
# then extracted and clustered by SS-k-means with the same settings.
set -euo pipefail
OUT=output/gfd_baselines
RES=results/gfd_baselines
# PY, stamp, DATASET/DATA, VIT and `resume RUN` (a rerun continues each training from its last.pth.tar, a finished
# one is kept; FRESH=1 starts over)
source "$(dirname "$0")/demo_common.sh"
COMMON=(--dataset "$DATASET" --data-path "$DATA" --workers 0)
SCHEDULE=(--opt adamw --weight-decay 0.05 --warmup-epochs 3 --epochs 28 --batch-size 64 --clip-grad 1.0
  --val-interval 1000 --val-kmeans-init 1 --checkpoint-select last --no-progress --output "$OUT")
GCD=(--hypernet-hidden-dim 256 --head-out-dim 2048 --grad-from-block 0 --lr 2e-4)
SSK=(--save_dir "$RES" --max_kmeans_iter 100 --k_means_init 3)

stamp "== data: $DATASET in $DATA"
"$PY" -c "from data_loader.synthface import ensure_synthfaces; ensure_synthfaces('$DATA', '$DATASET')"

stamp "== ArcFace on D_L (the FaceGCD paper's baseline)"
"$PY" train.py "${COMMON[@]}" "${VIT[@]}" "${SCHEDULE[@]}" --method recognition --input-preset gcd --head arcface --embedding-size 192 \
  --lr 1e-3 --epochs 112 --experiment arcface $(resume arcface)
stamp "== GCD: the same contrastive training without prefixes"
"$PY" train.py "${COMMON[@]}" "${VIT[@]}" "${SCHEDULE[@]}" "${GCD[@]}" --prefix_length 0 --experiment gcd $(resume gcd)
stamp "== FaceGCD: prefixes from the HyperNetwork (the quickstart's former recipe: all 12 blocks)"
"$PY" train.py "${COMMON[@]}" "${VIT[@]}" "${SCHEDULE[@]}" "${GCD[@]}" --prefix_length 4 --experiment facegcd $(resume facegcd)

for run in arcface gcd facegcd; do
  stamp "== extraction and SSK: $run"
  "$PY" extract_features.py --overwrite --checkpoint_weights "$OUT/$run/last.pth.tar" --workers 0 --save_dir "$RES" \
    --experiment "$run"
  "$PY" SSK.py --overwrite "${SSK[@]}" --experiment_idx "$run" --no-plots
done

echo
echo "== v2 clustering accuracy (%), $DATASET: SS-k-means on all training features, scored on the unlabelled"
echo "   training images and (nearest centre) on the test split; float32"
"$PY" -m utils.report "$RES/arcface" "$RES/gcd" "$RES/facegcd" --names "ArcFace (D_L)" "GCD (no prefix)" "FaceGCD"
stamp "done"
