#!/usr/bin/env bash
# Face recognition with insightface's input (--input-preset face, the recognition default) on SynthFaces, then
# verify.py on held-out identities: an insightface-format .bin pair set and an IJB-B-style folder from the protocol
# writers. ArcFace over Partial FC trains a ViT-T/16 at 48 px from scratch on every identity of synthfaces_quick
# (40 identities, 1,600 images) with the method's ViT recipe (AdamW lr 1e-3, weight decay 0.1, a tenth of the epochs
# of warm-up), in float32. A rerun continues the training from its last.pth.tar (FRESH=1 starts over).
set -euo pipefail
OUT=output/recognition_demo
RES=results/recognition_demo
# PY, stamp, DATASET/DATA, VIT and `resume RUN`
source "$(dirname "$0")/demo_common.sh"

stamp "== data: $DATASET in $DATA; 100 held-out identities as a pair set and 20 as an IJB-style folder"
"$PY" -c "from data_loader.synthface import ensure_synthfaces; ensure_synthfaces('$DATA', '$DATASET')"
mkdir -p "$RES"
[ -f "$RES/synth_pairs.bin" ] || "$PY" -m data_loader.protocol_writers pairs --out "$RES/synth_pairs.bin" \
  --identities 100 --pairs 600 --no-progress
[ -d "$RES/IJBB" ] || "$PY" -m data_loader.protocol_writers ijb --out "$RES/IJBB" --identities 20 --no-progress

stamp "== ArcFace on every identity of $DATASET (face preset)"
"$PY" train.py --method recognition --dataset recognition_folders --data-path "$DATA/train" "${VIT[@]}" \
  --head arcface --embedding-size 192 --epochs 20 --batch-size 64 --workers 0 --checkpoint-hist 1 --no-progress \
  --output "$OUT" --experiment arcface $(resume arcface)

stamp "== verify.py: the input preset comes from the checkpoint"
"$PY" verify.py --checkpoint-weights "$OUT/arcface/last.pth.tar" --targets "$RES/synth_pairs.bin" "$RES/IJBB" \
  --workers 0 --no-progress --overwrite
"$PY" -c "import json; r = json.load(open('$OUT/arcface/verify/last/results.json'));
print('input preset', r['input_preset']); [print(t, {k: round(v, 4) for k, v in s.items()}) for t, s in r['results'].items()]"
stamp "== done"
