#!/usr/bin/env bash
# TransFace ablation on SynthFaces, on the CPU: does the token gate alone, + DPAP, + EHSM or both change verification
# on held-out identities? transface_vit_t at 36 px (a 4 x 4 grid of 9 px patches, the release's layout at a reduced
# input), ArcFace (s 32) on every identity of synthfaces_quick (40 identities, 1,600 images), the TransFace recipe
# (AdamW lr 1e-3, weight decay 0.1 on every parameter, poly decay), EPOCHS epochs (default 5), SEEDS (default "1 2").
# Scored with verify.py on 100 held-out identities as an insightface pair set (10-fold accuracy) and 20 as an
# IJB-B-style folder (TAR at FAR, N1D1F1). Prints one row per arm and seed, then the mean per arm; the mean EHSM
# weight of the last epoch is listed for the EHSM arms (the training losses of the arms are not comparable: DPAP's is
# on perturbed images, EHSM's weighted). Resumable: a rerun continues each run from its last.pth.tar
# and skips finished ones (FRESH=1 starts over). Runs with OMP_NUM_THREADS=1 unless set.
set -euo pipefail
OUT=output/transface_ablation
RES=results/transface_ablation
# PY, stamp, DATASET/DATA and `resume RUN`
source "$(dirname "$0")/demo_common.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EPOCHS=${EPOCHS:-5}
SEEDS=${SEEDS:-1 2}
declare -A ARMS=([gate]="" [dpap]="--dpap" [ehsm]="--ehsm" [both]="--dpap --ehsm")

stamp "== data: $DATASET in $DATA; 100 held-out identities as a pair set and 20 as an IJB-style folder"
"$PY" -c "from data_loader.synthface import ensure_synthfaces; ensure_synthfaces('$DATA', '$DATASET')"
mkdir -p "$RES"
[ -f "$RES/synth_pairs.bin" ] || "$PY" -m data_loader.protocol_writers pairs --out "$RES/synth_pairs.bin" \
  --identities 100 --pairs 600 --no-progress
[ -d "$RES/IJBB" ] || "$PY" -m data_loader.protocol_writers ijb --out "$RES/IJBB" --identities 20 --no-progress

for seed in $SEEDS; do
  for arm in gate dpap ehsm both; do
    run=${arm}_seed$seed
    if [ ! -f "$OUT/$run/verify/last/results.json" ]; then
      stamp "== $run"
      # shellcheck disable=SC2086
      "$PY" train.py --method recognition --dataset recognition_folders --data-path "$DATA/train" \
        --arch transface_vit_t --input-size 3 36 36 --embedding-size 128 ${ARMS[$arm]} --head arcface \
        --head-args s=32 --epochs "$EPOCHS" --batch-size 64 --workers 0 --seed "$seed" --checkpoint-hist 1 \
        --no-progress --output "$OUT" --experiment "$run" $(resume "$run")
      "$PY" verify.py --checkpoint-weights "$OUT/$run/last.pth.tar" --targets "$RES/synth_pairs.bin" "$RES/IJBB" \
        --workers 0 --no-progress --overwrite
    fi
  done
done

stamp "== table (transface_vit_t at 36 px, $EPOCHS epochs, synthfaces_quick, seeds $SEEDS)"
"$PY" - "$OUT" $SEEDS <<'PY'
import json
import statistics
import sys
from pathlib import Path

out, seeds = Path(sys.argv[1]), sys.argv[2:]


def flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)):
            yield f"{prefix}{k}", float(v)


def cell(value: float) -> str:
    return "-" if value != value else f"{value:.4f}"


columns = ("synth_pairs/accuracy", "ijbb/auc", "ijbb/tar@1e-3", "ijbb/tar@1e-2")
print("| arm | seed | pair acc | IJB AUC | TAR@1e-3 | TAR@1e-2 | mean w (last epoch) | train loss (last epoch) |")
print("|---|---|---|---|---|---|---|---|")
rows = {}
for arm in ("gate", "dpap", "ehsm", "both"):
    for seed in seeds:
        run = out / f"{arm}_seed{seed}"
        results = dict(flat(json.loads((run / "verify" / "last" / "results.json").read_text())["results"]))
        last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
        values = [results.get(col, float("nan")) for col in columns]
        values += [last.get("train_ehsm_weight", float("nan")), last["train_loss"]]
        rows.setdefault(arm, []).append(values)
        print(f"| {arm} | {seed} | " + " | ".join(cell(v) for v in values) + " |")
for arm, values in rows.items():
    means = [statistics.fmean(col) for col in zip(*values)]
    print(f"| **{arm}** | mean of {len(values)} | " + " | ".join(cell(v) for v in means) + " |")
PY
stamp "== done"
