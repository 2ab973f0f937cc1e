# Shared preamble of the resumable SynthFaces demos (gfd_baselines.sh, pretraining_table.sh). Source it after setting
# OUT (training runs) and RES (features and SSK results): it moves to the repository root and sets PY, stamp, offline
# wandb, DATASET/DATA, the shared ViT flags and `resume RUN` (continue RUN from its last.pth.tar; FRESH=1 starts over).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
[ -x .venv/bin/python ] || bash shell/setup.sh
PY=.venv/bin/python
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true

DATASET=synthfaces_quick
DATA=data/$DATASET
[ "${FRESH:-0}" = 1 ] && rm -rf "$OUT" "$RES"
resume() { [ -f "$OUT/$1/last.pth.tar" ] && echo --resume "$OUT/$1/last.pth.tar"; true; }
VIT=(--arch vit_tiny --patch_size 16 --input-size 3 48 48)
