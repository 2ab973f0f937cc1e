#!/usr/bin/env bash
# What self-supervised pretraining is for, at quickstart size on SynthFaces, in one table (float32, CPU-sized):
#   1. Part fViT: recognition on D_L with a trainable landmark CNN -> $OUT/part_fvit/landmark_cnn.pth
#   2. FaceGCD from scratch, without and with that CNN as its frozen landmark front end;
#   3. The DINO start of shell/pretraining_search.sh (its run e: 1,500 steps on 3,200 images of 200 identities the
#      benchmark does not have, labels unused; trained first if missing), then FaceGCD from it;
#   4. LAFS: the same recipe on the same images, as landmark mosaics of the frozen CNN (-> lafs/checkpoint.pth), then
#      FaceGCD + front end from it.
# FaceGCD from a pretrained start has the paper's shape: the backbone frozen except its last block; HyperNetwork,
# prefixes and head trained. From scratch everything trains, on the same budget.
# Every FaceGCD run uses the quickstart's former recipe (ViT-T/16 at 48 px, all 12 blocks, 28 epochs of batch 64 on
# D_L + D_U), is extracted and clustered by SS-k-means with the same settings; raw pixels are the floor.
set -euo pipefail
OUT=${OUT:-output/pretraining_table}
RES=${RES:-results/pretraining_table}
# PY, stamp, DATASET/DATA, VIT, `resume RUN` (a rerun continues each training from its last.pth.tar, a finished
# one is kept; FRESH=1 starts over), the self-supervised recipe (SSL, SSL_LEARNS, SSL_EPOCHS, SSL_DATA) and its DINO start
source "$(dirname "$0")/demo_common.sh"
COMMON=(--dataset "$DATASET" --data-path "$DATA" --workers 0 --no-progress --output "$OUT")
EVAL=(--val-interval 1000 --val-kmeans-init 1 --checkpoint-select last)
# 48 px with 16 px patches: 3 x 3 = 9 landmarks; LAFS local views keep 4 of them (a 2 x 2 mosaic)
LANDMARKS=(--landmark_cnn --landmark-weights "$OUT/part_fvit/landmark_cnn.pth")
# LAFS runs the DINO start's recipe (demo_common.sh) with the releases' stochastic depth (0.1), on its images, with
# DINO's local crop range and ImageNet statistics, not its release's 0.4-1 and mean/std 0.5 (the defaults of
# --method lafs): the landmark CNN of step 1 learned on the gcd preset.
LAFS_RECIPE=("${SSL[@]}" "${SSL_LEARNS[@]}" --epochs "$SSL_EPOCHS" --dataset recognition_folders
  --data-path "$SSL_DATA/train" --local-crops-scale 0.05 0.4 --input-preset gcd)
FACEGCD=(--prefix_length 4 --hypernet-hidden-dim 256 --head-out-dim 2048 --opt adamw --lr 2e-4 --weight-decay 0.05
  --warmup-epochs 3 --epochs 28 --batch-size 64 --clip-grad 1.0)
FROZEN=(--grad-from-block 11)  # vit_tiny has 12 blocks: only the last one (and norm) trains
SSK=(--save_dir "$RES" --max_kmeans_iter 100 --k_means_init 3)

stamp "== data: $DATASET in $DATA"
one_scale "ssl_data=$SSL_DATA ssl_epochs=$SSL_EPOCHS ssl=${SSL_LEARNS[*]} dino_start=$DINO_START"
"$PY" -c "from data_loader.synthface import ensure_synthfaces; ensure_synthfaces('$DATA', '$DATASET')"

stamp "== 1. Part fViT on D_L: CosFace, the landmark CNN learned end to end"
"$PY" train.py "${COMMON[@]}" "${VIT[@]}" "${EVAL[@]}" --method recognition --input-preset gcd --head cosface --landmark_cnn \
  --landmark-weights "$OUT/none.pth" --embedding-size 192 --opt adamw --lr 1e-3 --weight-decay 0.05 --warmup-epochs 3 \
  --epochs 60 --batch-size 64 --clip-grad 1.0 --experiment part_fvit $(resume part_fvit)

stamp "== 2. FaceGCD from scratch (the quickstart's former recipe), without and with the landmark front end"
"$PY" train.py "${COMMON[@]}" "${VIT[@]}" "${EVAL[@]}" "${FACEGCD[@]}" --grad-from-block 0 --experiment scratch \
  $(resume scratch)
"$PY" train.py "${COMMON[@]}" "${VIT[@]}" "${EVAL[@]}" "${FACEGCD[@]}" "${LANDMARKS[@]}" --grad-from-block 0 \
  --experiment scratch_landmarks $(resume scratch_landmarks)

stamp "== 3. FaceGCD from the DINO start (self-supervised on other identities; the face preset, as it was trained)"
ensure_dino_start
"$PY" train.py "${COMMON[@]}" "${VIT[@]}" "${EVAL[@]}" "${FACEGCD[@]}" "${FROZEN[@]}" --input-preset face \
  --pretrained_weights "$DINO_START" --experiment from_dino $(resume from_dino)

stamp "== 4. LAFS pretraining (the DINO start's recipe on landmark mosaics: 5 px jitter, 4-landmark local views), then"
stamp "   FaceGCD from it"
"$PY" train.py --workers 0 --no-progress --output "$OUT" "${VIT[@]}" --val-interval 1000 --checkpoint-select last \
  "${LAFS_RECIPE[@]}" --method lafs --landmark-weights "$OUT/part_fvit/landmark_cnn.pth" --local-landmarks 4 \
  --local-crops-size 48 --experiment lafs $(resume lafs)
"$PY" train.py "${COMMON[@]}" "${VIT[@]}" "${EVAL[@]}" "${FACEGCD[@]}" "${FROZEN[@]}" "${LANDMARKS[@]}" \
  --pretrained_weights "$OUT/lafs/checkpoint.pth" --experiment from_lafs $(resume from_lafs)

stamp "== extraction and SSK"
"$PY" extract_features.py --overwrite --dataset "$DATASET" --data-path "$DATA" --workers 0 "${VIT[@]}" --features pixels \
  --save_dir "$RES" --experiment pixels
"$PY" SSK.py --overwrite "${SSK[@]}" --experiment_idx pixels --no-plots
for run in scratch scratch_landmarks from_dino from_lafs; do
  extra=()
  case $run in *landmarks|from_lafs) extra=(--landmark_cnn) ;; esac
  "$PY" extract_features.py --overwrite --checkpoint_weights "$OUT/$run/last.pth.tar" --workers 0 --save_dir "$RES" \
    --experiment "$run" "${extra[@]}"
  "$PY" SSK.py --overwrite "${SSK[@]}" --experiment_idx "$run" --no-plots
done

echo
echo "== v2 clustering accuracy (%), $DATASET: SS-k-means on all training features, scored on the unlabelled"
echo "   training images and (nearest centre) on the test split; float32"
"$PY" -m utils.report "$RES/pixels" "$RES/scratch" "$RES/scratch_landmarks" "$RES/from_dino" "$RES/from_lafs" \
  --names "raw pixels" "FaceGCD, scratch" "FaceGCD + landmarks, scratch" "FaceGCD from DINO" \
  "FaceGCD + landmarks from LAFS"
stamp "done"
