#!/usr/bin/env bash
# TransFace on MS1MV2 (insightface recordio: train.rec, train.idx and the .bin validation sets in $DATA), the release's
# recipe on 8 GPUs: ArcFace (s 64, m 0.5) over Partial FC with DPAP (p 0.2, 7 patches) and EHSM, AdamW lr 1e-3 with
# weight decay 0.1 on every parameter, 512 images per GPU, 35 epochs with 3 of linear warm-up from 0, then the poly
# (power 2) decay, gradient norm clipped at 5 on the backbone, mixed precision, flip only, the face preset.
#   ARCH=transface_vit_s (default) or transface_vit_l (also _t, _b); NPROC GPUs (default 8); extra flags pass through.
# The release steps its schedule every iteration; here it is applied at every epoch (docs/transface.md). A rerun
# resumes from the run's last.pth.tar.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/ms1mv2}
ARCH=${ARCH:-transface_vit_s}
NPROC=${NPROC:-8}
OUT=${OUT:-output/transface}
RUN=ms1mv2_$ARCH
EXTRA=()
case "$ARCH" in transface_vit_b | transface_vit_l) EXTRA+=(--grad-checkpointing) ;; esac
[ -f "$OUT/$RUN/last.pth.tar" ] && EXTRA+=(--resume "$OUT/$RUN/last.pth.tar")
torchrun --nproc_per_node="$NPROC" train.py --method recognition --dataset recognition_recordio --data-path "$DATA" \
  --arch "$ARCH" --dpap --ehsm --head arcface --head-args s=64 m2=0.5 \
  --opt adamw --lr 1e-3 --weight-decay 0.1 --weight-decay-on all --sched poly --warmup-epochs 3 --warmup-lr 0 \
  --min-lr 0 --epochs 35 --batch-size 512 --clip-grad 5 --amp --input-preset face \
  --val-targets "$DATA/lfw.bin" "$DATA/cfp_fp.bin" "$DATA/agedb_30.bin" --checkpoint-select best \
  --output "$OUT" --experiment "$RUN" "${EXTRA[@]}" "$@"
