"""Faces per second of the photo pipeline (detection + alignment + embedding) and the share of each stage.

Photos: scikit-image's ``lfw_subset`` faces (25 x 25, grey) upscaled to ``--side`` pixels, one face each. Stages:
decode (PNG bytes to RGB), detect (MTCNN, ``--detect-batch-size`` photos per call, against one photo per call, the
obvious implementation), align (insightface's warp) and embed (image + flip, ``--embed-batch-size`` faces per
forward, against one face per forward). The embedder is ``--checkpoint-weights`` or, without one, an untrained
IResNet-50 at 112 px with 512-D embeddings (insightface's r50: the cost is the architecture's, not the weights').

    python -m benchmarks.photos_throughput --threads 1 --photos 32 --output results/benchmarks/photos_throughput.json
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import add_common_args, cli_main, environment, resolve_device, save_results, setup
from photos.detection import FaceDetector, array_backend
from photos.embedding import FaceEmbedder, load_embedder
from photos.mtcnn import MTCNN
from utils.face_align import align_face

logger = logging.getLogger("photos_throughput")


def lfw_photos(count: int, side: int) -> list[bytes]:
    """``count`` PNG-encoded upscaled LFW faces (cycled when more than the subset's 200)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise ValueError("scikit-image is not installed: its lfw_subset provides the photos")
    faces = np.load(Path(list(spec.submodule_search_locations)[0]) / "data" / "lfw_subset.npy")
    out = []
    for i in range(count):
        img = Image.fromarray((faces[i % len(faces)] * 255).round().astype(np.uint8)).convert("RGB")
        buffer = io.BytesIO()
        img.resize((side, side), Image.BICUBIC).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def untrained_embedder(device: torch.device) -> FaceEmbedder:
    from model.recognition import RecognitionConfig, build_recognizer

    model = build_recognizer(RecognitionConfig(arch="iresnet50", img_size=112, embedding_size=512, num_classes=2))
    return FaceEmbedder(model.to(device).eval(), 112, "face", "untrained iresnet50", "", device)


def run_pipeline(photos: list[bytes], detector: FaceDetector, embedder: FaceEmbedder, det_bs: int, emb_bs: int):
    """Seconds per stage and the number of faces."""
    seconds = dict.fromkeys(("decode", "detect", "align", "embed"), 0.0)
    faces = 0
    for start in range(0, len(photos), det_bs):
        t0 = time.perf_counter()
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in photos[start : start + det_bs]]
        t1 = time.perf_counter()
        found = detector.detect(images)
        t2 = time.perf_counter()
        crops = [align_face(img, f.landmarks) for img, (fs, _) in zip(images, found) for f in fs]
        t3 = time.perf_counter()
        for s in range(0, len(crops), emb_bs):
            embedder.embed(crops[s : s + emb_bs], batch_size=emb_bs, progress=False)
        t4 = time.perf_counter()
        for key, value in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            seconds[key] += value
        faces += len(crops)
    return seconds, faces


def main(args: argparse.Namespace) -> int:
    setup(args.threads)
    device = resolve_device(args.device)
    photos = lfw_photos(args.photos, args.side)
    detector = FaceDetector(array_backend(MTCNN().to(device)), min_face=20, score_threshold=0.9, largest_only=True)
    if args.checkpoint_weights:
        embedder = load_embedder(args.checkpoint_weights, weights_only=True, device=device)
    else:
        embedder = untrained_embedder(device)
    run_pipeline(photos[: args.detect_batch_size], detector, embedder, args.detect_batch_size, args.embed_batch_size)
    results = {}
    for name, det_bs, emb_bs in (("one_at_a_time", 1, 1), ("batched", args.detect_batch_size, args.embed_batch_size)):
        seconds, faces = run_pipeline(photos, detector, embedder, det_bs, emb_bs)
        total = sum(seconds.values())
        results[name] = {
            "detect_batch_size": det_bs,
            "embed_batch_size": emb_bs,
            "faces": faces,
            "seconds": total,
            "faces_per_second": faces / total,
            "stage_seconds": seconds,
            "stage_share": {k: v / total for k, v in seconds.items()},
        }
        logger.info("%s: %.2f faces/s (%s)", name, faces / total, results[name]["stage_share"])
    results["speedup_batched_over_one_at_a_time"] = (
        results["batched"]["faces_per_second"] / results["one_at_a_time"]["faces_per_second"]
    )
    env = environment(device, embedder=embedder.checkpoint, photos=args.photos, side=args.side)
    save_results({"args": vars(args), "environment": env, "results": results}, args.output, logger)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--photos", type=int, default=32, help="number of photos (default: %(default)s)")
    parser.add_argument("--side", type=int, default=250, help="photo side in pixels, LFW's (default: %(default)s)")
    parser.add_argument("--detect-batch-size", type=int, default=16, help="photos per detector call (default: 16)")
    parser.add_argument("--embed-batch-size", type=int, default=16, help="faces per embedding forward (default: 16)")
    parser.add_argument("--checkpoint-weights", default=None, help="embedder checkpoint (default: untrained r50)")
    return parser


if __name__ == "__main__":
    sys.exit(cli_main(get_args_parser(), main, (ValueError,)))
