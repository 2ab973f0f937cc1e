#!/usr/bin/env bash
# Train -> extract -> SSK on one GFD benchmark with the paper's recipe: ViT-B/8 at 112 px, prefix length 10, layer
# embedding, 128 images per GPU, 100 epochs, the last epoch evaluated (--checkpoint-select last: choosing on
# validation accuracy would read the unlabelled ground truth), SSK with K = identities, 500 iterations, 10 restarts.
#
#   bash shell/run_gfd.sh youtubefaces_1000 [train.py flags...]
#
# Extra flags go to train.py. Extraction and SSK read every setting that defines the labelled and unlabelled sets
# (dataset, data path, --prop_train_labels, --split-seed, --num-known, image size) from the checkpoint and its
# features, so an override such as --prop_train_labels 0.3 reaches all three steps; they refuse a contradiction.
# Rerunning the script resumes the training from its last.pth.tar (a finished one just goes on to extraction).
# Environment: DATA_PATH (benchmark root, default data/<dataset>), GPUS (default 2), PRETRAINED (DINO weights,
# default checkpoint.pth), OUTPUT (default output/train), SAVE_DIR (default results), EPOCHS (default 100),
# BATCH (per GPU, default 128), PORT (default 29500).
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET="${1:?usage: run_gfd.sh DATASET [train.py args...]}"; shift
DATA_PATH="${DATA_PATH:-data/$DATASET}"
GPUS="${GPUS:-2}"
PRETRAINED="${PRETRAINED:-checkpoint.pth}"
OUTPUT="${OUTPUT:-output/train}"
SAVE_DIR="${SAVE_DIR:-results}"
EPOCHS="${EPOCHS:-100}"
BATCH="${BATCH:-128}"
PORT="${PORT:-29500}"
EXP="gcd_${DATASET}_prefix10"
PY=".venv/bin/python"
[ -x "$PY" ] || bash shell/setup.sh
RUN=("$PY" -m torch.distributed.run --nproc_per_node="$GPUS" --master_port="$PORT")
CHECKPOINT="$OUTPUT/$EXP/model_best.pth.tar"
LAST="$OUTPUT/$EXP/last.pth.tar"
RESUME=()
[ -f "$LAST" ] && RESUME=(--resume "$LAST")  # a rerun continues the interrupted (or finished) training

"${RUN[@]}" train.py --dataset "$DATASET" --data-path "$DATA_PATH" --pretrained_weights "$PRETRAINED" \
  --arch vit_base --patch_size 8 --input-size 3 112 112 --prefix_length 10 --layer-embed --amp \
  --batch-size "$BATCH" --epochs "$EPOCHS" --checkpoint-select last --output "$OUTPUT" --experiment "$EXP" \
  --log-wandb "${RESUME[@]}" "$@"
"${RUN[@]}" extract_features.py --overwrite --checkpoint_weights "$CHECKPOINT" --pretrained_weights "$PRETRAINED" --amp \
  --save_dir "$SAVE_DIR" --experiment "$EXP"
"${RUN[@]}" SSK.py --overwrite --max_kmeans_iter 500 --k_means_init 10 --experiment_idx "$EXP" --save_dir "$SAVE_DIR"
