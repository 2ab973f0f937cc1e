#!/usr/bin/env bash
# TransFace on SynthFaces, on the CPU: transface_vit_t at 45 px (a 5 x 5 grid of 9 px patches) with DPAP and EHSM,
# ArcFace over every identity of synthfaces_quick (40 identities, 1,600 images) with the TransFace recipe (AdamW lr
# 1e-3, weight decay 0.1 on every parameter, a tenth of the epochs of warm-up, poly decay), then verify.py on held-out
# identities (an insightface-format .bin pair set and an IJB-B-style folder). EPOCHS (default 10). A rerun continues
# from the run's last.pth.tar (FRESH=1 starts over).
set -euo pipefail
OUT=output/transface_demo
RES=results/transface_demo
# PY, stamp, DATASET/DATA and `resume RUN`
source "$(dirname "$0")/demo_common.sh"
EPOCHS=${EPOCHS:-10}

stamp "== data: $DATASET in $DATA; 100 held-out identities as a pair set and 20 as an IJB-style folder"
"$PY" -c "from data_loader.synthface import ensure_synthfaces; ensure_synthfaces('$DATA', '$DATASET')"
mkdir -p "$RES"
[ -f "$RES/synth_pairs.bin" ] || "$PY" -m data_loader.protocol_writers pairs --out "$RES/synth_pairs.bin" \
  --identities 100 --pairs 600 --no-progress
[ -d "$RES/IJBB" ] || "$PY" -m data_loader.protocol_writers ijb --out "$RES/IJBB" --identities 20 --no-progress

stamp "== TransFace-T (DPAP + EHSM) on every identity of $DATASET"
"$PY" train.py --method recognition --dataset recognition_folders --data-path "$DATA/train" \
  --arch transface_vit_t --input-size 3 45 45 --dpap --ehsm --head arcface --head-args s=32 \
  --epochs "$EPOCHS" --batch-size 64 --workers 0 --checkpoint-hist 1 --no-progress \
  --output "$OUT" --experiment transface $(resume transface)

stamp "== verify.py"
"$PY" verify.py --checkpoint-weights "$OUT/transface/last.pth.tar" --targets "$RES/synth_pairs.bin" "$RES/IJBB" \
  --workers 0 --no-progress --overwrite
"$PY" -c "import json; r = json.load(open('$OUT/transface/verify/last/results.json'));
[print(t, {k: round(v, 4) for k, v in s.items()}) for t, s in r['results'].items()]"
stamp "== done"
