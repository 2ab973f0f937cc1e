# Shared preamble of the resumable SynthFaces demos (gfd_baselines.sh, pretraining_table.sh, pretraining_search.sh,
# claim_table.sh). Source it after setting OUT (training runs) and RES (features and SSK results): it moves to the
# repository root and sets PY, stamp, offline wandb, DATASET/DATA, the shared ViT flags, `resume RUN` (continue RUN from
# its last.pth.tar; FRESH=1 starts over), `one_scale`, and the self-supervised recipe with its DINO start.
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

# Self-supervised pretraining at CPU size (docs/pretraining.md, "Pretraining that learns"): the schedule that every run
# of shell/pretraining_search.sh shares, and the prototypes and teacher of the one that learned (its run e: SSL and
# SSL_LEARNS for SSL_EPOCHS epochs on SSL_DATA, 200 identities that the benchmark does not have, labels unused).
SSL_DATA=data/synthfaces_pretrain_s1_200x16
SSL=(--opt adamw --lr 2.5e-4 --min-lr 1e-5 --weight-decay 0.04 --weight-decay-end 0.4 --warmup-epochs 2 --batch-size 64
  --clip-grad 3.0 --local-crops-number 4 --local-crops-size 32)
SSL_LEARNS=(--head-out-dim 256 --warmup-teacher-temp 0.04 --teacher-temp 0.04 --momentum-teacher 0.996)
SSL_EPOCHS=30
# The DINO start of pretraining_table.sh and of claim_table.sh's second start is that run's teacher backbone.
DINO_START=output/pretraining_search/e_k256_t04_long/checkpoint.pth
ensure_dino_start() {  # train it once (about 50 min of one core) if shell/pretraining_search.sh has not
  [ -f "$(dirname "$DINO_START")/.done" ] && return
  stamp "== the DINO start: run e of shell/pretraining_search.sh"
  env OUT=output/pretraining_search RES=results/pretraining_search FRESH=0 RUNS=e EPOCHS=$((SSL_EPOCHS / 3)) \
    PRE_DATA="$SSL_DATA" bash shell/pretraining_search.sh
}
# one_scale SETTINGS: refuse to add runs to $OUT when it holds runs made with other settings (FRESH=1, or another OUT=)
one_scale() {
  mkdir -p "$OUT"
  if [ -f "$OUT/scale.txt" ] && [ "$(cat "$OUT/scale.txt")" != "$1" ]; then
    echo "error: $OUT holds runs made with other settings ($(cat "$OUT/scale.txt")); these are $1." \
      "Set FRESH=1 to start over, or OUT= and RES= to keep both" >&2
    exit 2
  fi
  [ -f "$OUT/scale.txt" ] && return
  echo "$1" > "$OUT/scale.txt.partial" && mv "$OUT/scale.txt.partial" "$OUT/scale.txt"  # whole or absent after a kill
}
