#!/usr/bin/env bash
# Photos in, identities out, on data that ships (docs/photos.md):
#  1. detection + alignment (MTCNN) of real photos from packages: scikit-image's astronaut and upscaled lfw_subset faces
#     (and Debian's facedetect example photo of Grace Hopper when installed), with `python -m photos align`;
#  2. a recognition model (IResNet-18 at 32 px, ArcFace) trained on identities 0-19 of synthfaces_quick;
#  3. discover.py over the test images of identities 0-29 with a gallery of identities 0-9 (3 train images each):
#     10 known people, 10 the model saw but the gallery lacks, 10 it never saw; K given (30) and estimated (auto);
#     the assignment accuracy of both is printed;
#  4. verify.py --photos on the astronaut and her mirror image.
# A rerun reuses the trained model and the discovery cache (FRESH=1 starts over).
set -euo pipefail
OUT=output/discover_demo
RES=results/discover_demo
source "$(dirname "$0")/demo_common.sh"

stamp "== data: $DATASET in $DATA; real photos from scikit-image"
"$PY" -c "from data_loader.synthface import ensure_synthfaces; ensure_synthfaces('$DATA', '$DATASET')"
mkdir -p "$RES/raw/lfw" "$RES/raw/astronaut"
"$PY" - "$RES/raw" <<'PY'
import importlib.util, shutil, sys
from pathlib import Path
import numpy as np
from PIL import Image
raw = Path(sys.argv[1])
data = Path(list(importlib.util.find_spec("skimage").submodule_search_locations)[0]) / "data"
Image.open(data / "astronaut.png").convert("RGB").save(raw / "astronaut" / "astronaut.png")
hopper = Path("/usr/share/doc/facedetect/examples/grace_hopper_512x512.jpg")
if hopper.is_file():
    (raw / "hopper").mkdir(exist_ok=True)
    shutil.copy(hopper, raw / "hopper" / hopper.name)
for i, face in enumerate(np.load(data / "lfw_subset.npy")[:20]):
    Image.fromarray((face * 255).round().astype(np.uint8)).resize((160, 160), Image.BICUBIC).save(raw / "lfw" / f"{i:02d}.png")
PY

stamp "== 1. detect and align (MTCNN, weights from the facenet-pytorch package)"
"$PY" -m photos align --src "$RES/raw" --out "$RES/aligned" --overwrite --no-progress
"$PY" -c "import csv; rows = list(csv.DictReader(open('$RES/aligned/faces.csv'))); missed = list(csv.DictReader(open('$RES/aligned/no_faces.csv')));
print(f'{len(rows)} faces aligned; photos without a face: {len(missed)}'); r = rows[0];
print('astronaut: box', [r[k] for k in ('x1', 'y1', 'x2', 'y2')], 'score', r['score'], 'eyes', [r[k] for k in ('left_eye_x', 'left_eye_y', 'right_eye_x', 'right_eye_y')])"

stamp "== 2. ArcFace on identities 0-19 of $DATASET (train split)"
mkdir -p "$RES/train20"
for k in $(seq 0 19); do id=$(printf 'id_%04d' "$k"); [ -e "$RES/train20/$id" ] || ln -s "$PWD/$DATA/train/$id" "$RES/train20/$id"; done
"$PY" train.py --method recognition --dataset recognition_folders --data-path "$RES/train20" --arch iresnet18 \
  --input-size 3 32 32 --embedding-size 128 --epochs 10 --batch-size 32 --workers 0 --opt sgd --lr 0.1 \
  --weight-decay 5e-4 --warmup-epochs 1 --checkpoint-hist 1 --no-progress --output "$OUT" --experiment arc $(resume arc)

stamp "== 3. discover.py: gallery of identities 0-9, photos of identities 0-29 (--aligned SynthFaces crops)"
rm -rf "$RES/known" "$RES/photos"
mkdir -p "$RES/known" "$RES/photos"
for k in $(seq 0 29); do
  id=$(printf 'id_%04d' "$k")
  if [ "$k" -lt 10 ]; then mkdir -p "$RES/known/$id"; cp "$DATA"/train/$id/00[0-2].jpg "$RES/known/$id/"; fi
  for f in "$DATA"/test/$id/*.jpg; do cp "$f" "$RES/photos/id${k}_$(basename "$f")"; done
done
for k in 30 auto; do
  "$PY" discover.py --checkpoint-weights "$OUT/arc/last.pth.tar" --gallery "$RES/known" --photos "$RES/photos" \
    --out "$RES/report_K$k" --aligned --K "$k" --overwrite --no-progress
  echo "K $k: $("$PY" -m photos.demo_score "$RES/report_K$k" --gallery-ids $(seq 0 9))"
done

stamp "== 4. verify.py --photos: the astronaut and her mirror image"
"$PY" -c "from PIL import Image, ImageOps; ImageOps.mirror(Image.open('$RES/raw/astronaut/astronaut.png')).save('$RES/mirrored.png')"
"$PY" verify.py --checkpoint-weights "$OUT/arc/last.pth.tar" --photos "$RES/raw/astronaut/astronaut.png" \
  "$RES/mirrored.png" --threshold 0.5
stamp "== done: open $RES/report_Kauto/report.html"
