#!/usr/bin/env bash
# TransFace on Glint360K (insightface recordio in $DATA), the release's recipe on 8 GPUs: as shell/transface_ms1mv2.sh
# but lr 1e-4 at 128 images per GPU, 40 epochs with 4 of warm-up for TransFace-S (35 and 3 for -L).
#   ARCH=transface_vit_s (default) or transface_vit_l (also _t, _b); NPROC GPUs (default 8); extra flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/glint360k}
ARCH=${ARCH:-transface_vit_s}
NPROC=${NPROC:-8}
OUT=${OUT:-output/transface}
RUN=glint360k_$ARCH
EPOCHS=40 WARMUP=4 EXTRA=()
case "$ARCH" in transface_vit_b | transface_vit_l) EPOCHS=35 WARMUP=3 EXTRA+=(--grad-checkpointing) ;; esac
[ -f "$OUT/$RUN/last.pth.tar" ] && EXTRA+=(--resume "$OUT/$RUN/last.pth.tar")
torchrun --nproc_per_node="$NPROC" train.py --method recognition --dataset recognition_recordio --data-path "$DATA" \
  --arch "$ARCH" --dpap --ehsm --head arcface --head-args s=64 m2=0.5 \
  --opt adamw --lr 1e-4 --weight-decay 0.1 --weight-decay-on all --sched poly --warmup-epochs "$WARMUP" \
  --warmup-lr 0 --min-lr 0 --epochs "$EPOCHS" --batch-size 128 --clip-grad 5 --amp --input-preset face \
  --val-targets "$DATA/lfw.bin" "$DATA/cfp_fp.bin" "$DATA/agedb_30.bin" --checkpoint-select best \
  --output "$OUT" --experiment "$RUN" "${EXTRA[@]}" "$@"
