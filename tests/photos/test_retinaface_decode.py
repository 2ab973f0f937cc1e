"""RetinaFace (insightface SCRFD det_10g) output decoding on constructed outputs, worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from photos.retinaface import RetinaFaceONNX, decode, letterbox, suppress


def _outputs(side: int) -> list[np.ndarray]:
    """Zero scores, boxes and keypoints of a ``side`` x ``side`` input, with a leading batch axis."""
    counts = [(side // s) ** 2 * 2 for s in (8, 16, 32)]
    return [np.zeros((1, n, 1), np.float32) for n in counts] + [
        np.zeros((1, n, d), np.float32) for d in (4, 10) for n in counts
    ]


def test_decode_by_hand():
    """64 x 64 input: stride 16 has 4 x 4 locations, 2 anchors each. Anchor 13 = location 6 (row 1, column 2),
    second anchor: centre (2 * 16, 1 * 16) = (32, 16). Distances (1, 0.5, 2, 1.5) * 16 give the box
    (32 - 16, 16 - 8, 32 + 32, 16 + 24) = (16, 8, 64, 40); keypoint offsets (0.25, 0) ... * 16 + centre give
    (36, 16), (48, 16), (40, 24), (36, 32), (48, 32). Stride 8's first anchor (centre (0, 0)) scores 0.6 with
    distances (0, 0, 1, 1) * 8: box (0, 0, 8, 8). A score under 0.5 is dropped."""
    out = _outputs(64)
    out[1][0, 13, 0] = 0.9
    out[4][0, 13] = [1, 0.5, 2, 1.5]
    out[7][0, 13] = [0.25, 0, 1, 0, 0.5, 0.5, 0.25, 1, 1, 1]
    out[0][0, 0, 0] = 0.6
    out[3][0, 0] = [0, 0, 1, 1]
    out[2][0, 5, 0] = 0.4
    boxes, scores, points = decode(out, (64, 64))
    order = np.argsort(-scores)
    np.testing.assert_allclose(scores[order], [0.9, 0.6])
    np.testing.assert_allclose(boxes[order], [[16, 8, 64, 40], [0, 0, 8, 8]])
    np.testing.assert_allclose(points[order[0]], [[36, 16], [48, 16], [40, 24], [36, 32], [48, 32]])


def test_decode_refuses_outputs_of_another_shape():
    with pytest.raises(ValueError, match="stride 8 has 10 scores, expected 128"):
        decode([np.zeros((10, 1))] + _outputs(64)[1:], (64, 64))
    with pytest.raises(ValueError, match="expected 9 outputs"):
        decode(_outputs(64)[:6], (64, 64))


def test_letterbox_and_suppression():
    """A 50 x 100 photo fits 640 x 640 at scale 6.4 (640 / 100), top-left; NMS at IoU 0.4 drops a box overlapping a
    better one by IoU 64 / 100 = 0.64 and keeps one overlapping by 36 / 164 = 0.22."""
    canvas, scale = letterbox(np.full((50, 100, 3), 200, np.uint8))
    assert scale == pytest.approx(6.4) and canvas.shape == (640, 640, 3)
    assert (canvas[:320] == 200).all() and (canvas[320:] == 0).all()
    boxes = np.array([[0, 0, 10, 10], [2, 2, 10, 10], [4, 4, 14, 14]], np.float32)
    kept = suppress(boxes, np.array([0.9, 0.8, 0.7], np.float32), np.zeros((3, 5, 2), np.float32))
    torch.testing.assert_close(kept["scores"], torch.tensor([0.9, 0.7]))


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        RetinaFaceONNX(tmp_path / "det_10g.onnx", torch.device("cpu"))
