"""insightface's RetinaFace detector (the SCRFD ``det_10g.onnx`` of its ``buffalo_l`` pack) run with onnxruntime.

The network sees a 640 x 640 RGB image, ``(x - 127.5) / 128``: the photo resized to fit with its aspect ratio kept,
in the top-left corner, zeros elsewhere. It has nine outputs, three per stride (8, 16, 32) in the order scores of
every stride, box distances of every stride, keypoint offsets of every stride. A stride s map of an H x W input has
(H / s) * (W / s) locations, two anchors each, listed row by row, the two anchors of a location next to each other;
an anchor's centre is (column * s, row * s). Boxes are distances (left, top, right, bottom) from the centre and
keypoints offsets (x, y) from it, in units of s. Faces scoring at least 0.5 are kept, then non-maximum suppression
at IoU 0.4. onnxruntime is an optional dependency, imported only when this backend is chosen.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.ops import nms

STRIDES = (8, 16, 32)
ANCHORS_PER_LOCATION = 2
INPUT_SIDE = 640
DEFAULT_SCORE = 0.5
NMS_IOU = 0.4


def anchor_centres(height: int, width: int, stride: int) -> np.ndarray:
    """(H/s * W/s * 2, 2) anchor centres (x, y) of a stride's map, row by row, each repeated per anchor."""
    rows, cols = height // stride, width // stride
    ys, xs = np.mgrid[:rows, :cols]
    centres = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, ANCHORS_PER_LOCATION, axis=0)


def decode(
    outputs: list[np.ndarray], input_hw: tuple[int, int], score_threshold: float = DEFAULT_SCORE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Faces from the nine raw outputs, in the network input's pixels, before NMS.

    Args:
        outputs: scores, boxes and keypoints of strides 8, 16, 32 (a leading batch axis of 1 is dropped).
        input_hw: the network input's height and width.
        score_threshold: the smallest score kept.

    Returns:
        ``boxes`` (F, 4) x1, y1, x2, y2; ``scores`` (F,); ``landmarks`` (F, 5, 2).
    """
    if len(outputs) != 3 * len(STRIDES):
        raise ValueError(f"RetinaFace: expected {3 * len(STRIDES)} outputs (SCRFD with keypoints), got {len(outputs)}")
    outputs = [o[0] if o.ndim == 3 else o for o in outputs]
    boxes, scores, points = [], [], []
    for i, stride in enumerate(STRIDES):
        score = outputs[i].reshape(-1)
        distance = outputs[i + len(STRIDES)].reshape(-1, 4) * stride
        offset = outputs[i + 2 * len(STRIDES)].reshape(-1, 5, 2) * stride
        centres = anchor_centres(*input_hw, stride)
        if len(centres) != len(score):
            raise ValueError(
                f"RetinaFace: stride {stride} has {len(score)} scores, expected {len(centres)} for a {input_hw} input"
            )
        keep = score >= score_threshold
        c = centres[keep]
        boxes.append(np.concatenate([c - distance[keep, :2], c + distance[keep, 2:]], 1))
        scores.append(score[keep])
        points.append(c[:, None] + offset[keep])
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(points)


def letterbox(image: np.ndarray, side: int = INPUT_SIDE) -> tuple[np.ndarray, float]:
    """The image resized to fit a ``side`` x ``side`` square (aspect kept), top-left, zero padded, and the scale."""
    height, width = image.shape[:2]
    scale = min(side / height, side / width)
    new_w, new_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return canvas, new_w / width


class RetinaFaceONNX:
    """The ONNX detector behind the common interface (``photos.detection``).

    Args:
        weights: the ``det_10g.onnx`` file.
        device: ``cuda`` runs on onnxruntime's CUDA provider when it is available.
    """

    def __init__(self, weights: str | Path, device: torch.device) -> None:
        if not Path(weights).is_file():
            raise ValueError(f"--detector-weights {weights}: no such file (insightface's det_10g.onnx is expected)")
        try:
            import onnxruntime
        except ImportError as err:
            raise ValueError(
                "--detector retinaface needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)"
            ) from err
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = onnxruntime.InferenceSession(str(weights), providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable models
            raise ValueError(f"--detector-weights {weights}: onnxruntime cannot load it ({err})") from err
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """Faces of every (H, W, 3) uint8 RGB image, in its pixels, highest score first."""
        found = []
        for image in images:
            canvas, scale = letterbox(image)
            blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
            boxes, scores, points = decode(self.session.run(None, {self.input_name: blob}), canvas.shape[:2])
            found.append(suppress(boxes / scale, scores, points / scale))
        return found


def suppress(boxes: np.ndarray, scores: np.ndarray, points: np.ndarray) -> dict[str, torch.Tensor]:
    """Non-maximum suppression at IoU 0.4, highest score first, as tensors."""
    boxes_t, scores_t = torch.from_numpy(boxes).float(), torch.from_numpy(scores).float()
    keep = nms(boxes_t, scores_t, NMS_IOU)
    return {"boxes": boxes_t[keep], "scores": scores_t[keep], "landmarks": torch.from_numpy(points).float()[keep]}
