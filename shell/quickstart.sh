#!/usr/bin/env bash
# The whole FaceGCD pipeline on the embedded SynthFaces benchmark, from a fresh clone, on a CPU (or GPU):
# setup -> data -> two baselines (raw pixels, untrained ViT) -> training -> extraction -> SSK -> table.
# No --amp: everything computes in float32 on every CPU, so the table does not depend on whether a CPU has native
# bfloat16 (on CUDA, matmuls may use TF32).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
bash shell/setup.sh
PY=.venv/bin/python
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true

DATASET=synthfaces_quick
DATA=data/$DATASET
OUT=output/quickstart
RES=results/quickstart
rm -rf "$OUT" "$RES"
# A small prefix ViT trained from scratch (no pretrained weights exist offline): ViT-T/16 at 48 px (9 patches + CLS)
# with 6 of its 12 blocks (the step is bound by its arithmetic; 6 blocks kept the margin over raw pixels over 3 seeds,
# docs/performance.md), prefix length 4, HyperNets 256 wide, a 2048-wide DINO head.
MODEL=(--arch vit_tiny --patch_size 16 --input-size 3 48 48 --depth 6 --prefix_length 4 --hypernet-hidden-dim 256
  --head-out-dim 2048 --grad-from-block 0)
COMMON=(--dataset "$DATASET" --data-path "$DATA" --workers 0)
SSK=(--save_dir "$RES" --max_kmeans_iter 100 --k_means_init 3)

stamp "== data: $DATASET in $DATA"
"$PY" -c "from data_loader.synthface import ensure_synthfaces; ensure_synthfaces('$DATA', '$DATASET')"

stamp "== baselines: k-means on raw pixels and on the untrained backbone"
"$PY" extract_features.py --overwrite "${COMMON[@]}" "${MODEL[@]}" --features pixels --save_dir "$RES" --experiment pixels
"$PY" SSK.py --overwrite "${SSK[@]}" --experiment_idx pixels --no-plots
"$PY" extract_features.py --overwrite "${COMMON[@]}" "${MODEL[@]}" --save_dir "$RES" --experiment untrained
"$PY" SSK.py --overwrite "${SSK[@]}" --experiment_idx untrained --no-plots

stamp "== training FaceGCD from scratch (float32)"
"$PY" train.py "${COMMON[@]}" "${MODEL[@]}" --opt adamw --lr 2e-4 --weight-decay 0.05 --warmup-epochs 3 --epochs 28 \
  --batch-size 64 --clip-grad 1.0 --val-interval 1000 --val-kmeans-init 1 --checkpoint-select last --no-progress \
  --output "$OUT" --experiment trained
stamp "== extraction and SSK (data settings and model read from the checkpoint)"
"$PY" extract_features.py --overwrite --checkpoint_weights "$OUT/trained/model_best.pth.tar" --workers 0 --save_dir "$RES" \
  --experiment trained
"$PY" SSK.py --overwrite "${SSK[@]}" --experiment_idx trained

echo
echo "== v2 clustering accuracy (%), $DATASET: SS-k-means fitted on all training features, scored on the"
echo "   unlabelled training images and (nearest centre) on the test split; float32"
"$PY" -m utils.report "$RES/pixels" "$RES/untrained" "$RES/trained" \
  --names "raw pixels" "untrained ViT" "FaceGCD (trained)"
echo
stamp "done; plots: $OUT/trained/training_curves.png, $RES/trained/ssk/default/tsne_test.png"
