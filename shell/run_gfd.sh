#!/usr/bin/env bash
# Train -> extract -> SSK on one GFD benchmark with the paper's recipe (method spec sections 7.2 and 9):
# ViT-B/8 at 112 px, prefix length 10, layer embedding, 128 images per GPU, 100 epochs, K = identities,
# SSK with 500 iterations and 10 initialisations.
#
#   bash shell/run_gfd.sh youtubefaces_1000
#
# Environment: DATA_PATH (benchmark root, default data/<dataset>), GPUS (default 2), PRETRAINED (DINO weights,
# default checkpoint.pth), OUTPUT (default output/train), SAVE_DIR (default results), EPOCHS (default 100),
# BATCH (per GPU, default 128), PORT (default 29500). Extra arguments go to train.py.
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
K=$("$PY" -c "from data_loader import get_spec; print(get_spec('$DATASET').num_classes)")
RUN=("$PY" -m torch.distributed.run --nproc_per_node="$GPUS" --master_port="$PORT")

"${RUN[@]}" train.py --dataset "$DATASET" --data-path "$DATA_PATH" --pretrained_weights "$PRETRAINED" \
  --arch vit_base --patch_size 8 --input-size 3 112 112 --prefix_length 10 --layer-embed --amp \
  --batch-size "$BATCH" --epochs "$EPOCHS" --output "$OUTPUT" --experiment "$EXP" --log-wandb "$@"
"${RUN[@]}" extract_features.py --dataset "$DATASET" --data-path "$DATA_PATH" --pretrained_weights "$PRETRAINED" \
  --checkpoint_weights "$OUTPUT/$EXP/model_best.pth.tar" --amp --save_dir "$SAVE_DIR" --experiment "$EXP"
"${RUN[@]}" SSK.py --dataset "$DATASET" --K "$K" --max_kmeans_iter 500 --k_means_init 10 \
  --experiment_idx "$EXP" --save_dir "$SAVE_DIR"
