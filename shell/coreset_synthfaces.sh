#!/usr/bin/env bash
# FaceCoresetNet on SynthFaces images (level 2 of docs/coreset.md's experiment): an AdaFace ViT-T/16 at 48 px trained
# on every identity of synthfaces_quick (40 identities, 1,600 images) is frozen; the aggregator is trained over it
# from an embedding cache of 4 augmented views per image; verify.py then scores two IJB-style sets of 50 held-out
# identities: the writer's default (2 media of 2 frames per template) and a pooling stress set (per template one
# 20-frame clip beside 3 single images, each media's nuisance drawn from [0.2, 2.5]). Each table holds insightface's
# N1D1F1 / N1D0F0 / N0D0F0, mean pooling and the aggregator. A rerun continues from the last.pth.tar files (FRESH=1
# starts over).
set -euo pipefail
OUT=output/coreset_synthfaces
RES=results/coreset_synthfaces
# PY, stamp, DATASET/DATA, VIT and `resume RUN`
source "$(dirname "$0")/demo_common.sh"

stamp "== data: $DATASET in $DATA; two IJB-style sets of 50 held-out identities"
"$PY" -c "from data_loader.synthface import ensure_synthfaces; ensure_synthfaces('$DATA', '$DATASET')"
mkdir -p "$RES"
[ -d "$RES/IJBB_plain" ] || "$PY" -m data_loader.protocol_writers ijb --out "$RES/IJBB_plain" --identities 50 \
  --no-progress
[ -d "$RES/IJBB_stress" ] || "$PY" -m data_loader.protocol_writers ijb --out "$RES/IJBB_stress" --identities 50 \
  --media-per-template 4 --images-per-media 1 --long-clip-frames 20 --media-nuisance 0.2 2.5 --no-progress

stamp "== the recognizer: AdaFace on every identity of $DATASET (face preset)"
"$PY" train.py --method recognition --dataset recognition_folders --data-path "$DATA/train" "${VIT[@]}" \
  --head adaface --embedding-size 192 --epochs 8 --batch-size 64 --workers 0 --checkpoint-hist 1 --no-progress \
  --output "$OUT" --experiment adaface $(resume adaface)

stamp "== the aggregator over the frozen recognizer (4 cached views per image)"
"$PY" train.py --method coreset --recognizer "$OUT/adaface/last.pth.tar" --dataset recognition_folders \
  --data-path "$DATA/train" --cache-augmentations 4 --epochs 4 --workers 0 --checkpoint-hist 1 --no-progress \
  --output "$OUT" --experiment coreset $(resume coreset)

for SET in plain stress; do
  stamp "== verify.py on IJBB_$SET"
  "$PY" verify.py --checkpoint-weights "$OUT/coreset/last.pth.tar" --targets "$RES/IJBB_$SET" --workers 0 \
    --no-progress --overwrite --output "$RES/verify_$SET"
  cat "$RES/verify_$SET/ijbb_tar_at_far.md"
done
stamp "== done"
