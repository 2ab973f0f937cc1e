#!/usr/bin/env bash
# The ArcFace baseline of the FaceGCD paper on one GFD benchmark: ArcFace trained on the labelled known identities
# (D_L) only, then the usual extraction and SSK. Same backbone, initialisation and input preset (--input-preset gcd)
# as FaceGCD's recipe (ViT-B/8 at 112 px from DINO weights), 128 images per GPU, AdamW + cosine, the last epoch kept.
#
#   bash shell/run_arcface_gfd.sh youtubefaces_1000 [train.py flags...]
#
# Extra flags go to train.py. Extraction and SSK read the data settings from the checkpoint, as for FaceGCD.
# Rerunning the script resumes the training from its last.pth.tar. Environment: DATA_PATH (default data/<dataset>),
# GPUS (default 2), PRETRAINED (DINO weights, default checkpoint.pth; ignored with an IResNet), ARCH (default
# vit_base; iresnet50/iresnet100 train the field's CNN from scratch), OUTPUT (default output/train), SAVE_DIR
# (default results), EPOCHS (default 40), BATCH (per GPU, default 128), PORT (default 29500).
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET="${1:?usage: run_arcface_gfd.sh DATASET [train.py args...]}"; shift
DATA_PATH="${DATA_PATH:-data/$DATASET}"
GPUS="${GPUS:-2}"
ARCH="${ARCH:-vit_base}"
PRETRAINED="${PRETRAINED:-checkpoint.pth}"
OUTPUT="${OUTPUT:-output/train}"
SAVE_DIR="${SAVE_DIR:-results}"
EPOCHS="${EPOCHS:-40}"
BATCH="${BATCH:-128}"
PORT="${PORT:-29500}"
EXP="arcface_${DATASET}_${ARCH}"
PY=".venv/bin/python"
[ -x "$PY" ] || bash shell/setup.sh
RUN=("$PY" -m torch.distributed.run --nproc_per_node="$GPUS" --master_port="$PORT")
LAST="$OUTPUT/$EXP/last.pth.tar"
RESUME=()
[ -f "$LAST" ] && RESUME=(--resume "$LAST")  # a rerun continues the interrupted (or finished) training
MODEL=(--arch "$ARCH" --input-size 3 112 112)
case "$ARCH" in
  vit_*) MODEL+=(--patch_size 8 --pretrained_weights "$PRETRAINED") ;;
esac

"${RUN[@]}" train.py --method recognition --input-preset gcd --head arcface --dataset "$DATASET" --data-path "$DATA_PATH" "${MODEL[@]}" \
  --opt adamw --lr-base 5e-4 --weight-decay 0.05 --warmup-epochs 2 --epochs "$EPOCHS" --batch-size "$BATCH" --amp \
  --checkpoint-select last --output "$OUTPUT" --experiment "$EXP" --log-wandb "${RESUME[@]}" "$@"
"${RUN[@]}" extract_features.py --overwrite --checkpoint_weights "$LAST" --amp --save_dir "$SAVE_DIR" --experiment "$EXP"
"${RUN[@]}" SSK.py --overwrite --max_kmeans_iter 500 --k_means_init 10 --experiment_idx "$EXP" --save_dir "$SAVE_DIR"
