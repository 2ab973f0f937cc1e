"""Tests for utils/face_align.py: Umeyama similarity fit and the warp to the ArcFace template."""

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from utils.face_align import (
    ARCFACE_TEMPLATE_112,
    align_face,
    arcface_template,
    estimate_similarity,
    warp_affine,
)


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = math.radians(angle_deg)
    linear = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return np.concatenate([linear, np.array(shift)[:, None]], axis=1)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_two_points_by_hand():
    # (0, 0) -> (1, 1) and (1, 0) -> (1, 3): the unit x step becomes (0, 2), i.e. scale 2, rotation +90 degrees,
    # and the origin moves to (1, 1): M = [[0, -2, 1], [2, 0, 1]].
    matrix = estimate_similarity(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 1.0], [1.0, 3.0]]))
    np.testing.assert_allclose(matrix, [[0, -2, 1], [2, 0, 1]], atol=1e-12)


@pytest.mark.parametrize(
    "angle, scale, shift", [(0.0, 1.0, (0.0, 0.0)), (17.0, 0.37, (5.0, -3.0)), (150, 2.5, (-40, 9))]
)
def test_recovers_a_known_similarity_exactly(angle, scale, shift):
    truth = _similarity(angle, scale, shift)
    src = ARCFACE_TEMPLATE_112
    np.testing.assert_allclose(estimate_similarity(src, _apply(truth, src)), truth, atol=1e-10)
    np.testing.assert_allclose(
        estimate_similarity(_apply(truth, src), src), np.linalg.inv(np.r_[truth, [[0, 0, 1]]])[:2], atol=1e-10
    )


def test_least_squares_never_reflects():
    mirrored = ARCFACE_TEMPLATE_112 * np.array([-1.0, 1.0])
    matrix = estimate_similarity(mirrored, ARCFACE_TEMPLATE_112)
    linear = matrix[:, :2]
    assert np.linalg.det(linear) > 0
    # A similarity: the linear part is a scaled rotation (equal diagonal, opposite off-diagonal).
    assert linear[0, 0] == pytest.approx(linear[1, 1]) and linear[0, 1] == pytest.approx(-linear[1, 0])


def test_template_sizes_and_errors():
    np.testing.assert_allclose(arcface_template(224), 2 * ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="multiple of 112"):
        arcface_template(100)
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="same shape"):
        estimate_similarity(ARCFACE_TEMPLATE_112, ARCFACE_TEMPLATE_112[:4])
    with pytest.raises(ValueError, match="5 landmarks"):
        align_face(Image.new("RGB", (50, 50)), ARCFACE_TEMPLATE_112[:4])


def _blob_image(points: np.ndarray, side: int, sigma: float = 3.0) -> Image.Image:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    img = np.zeros((side, side))
    for x, y in points:
        img += 250 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB")


def _centroids(image: Image.Image, near: np.ndarray, radius: float = 6.0) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float64)[..., 0]
    yy, xx = np.mgrid[0 : arr.shape[0], 0 : arr.shape[1]]
    out = []
    for x, y in near:
        w = arr * (((xx - x) ** 2 + (yy - y) ** 2) < radius**2)
        out.append([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    return np.array(out)


def test_warp_puts_known_landmarks_on_the_template():
    # Blobs at a rotated, scaled, shifted copy of the template in a 200 px image; after alignment each blob's centroid
    # must sit on its template point. Pixel centres are at integers: a half-pixel slip would move them by ~0.25 px.
    landmarks = _apply(_similarity(11.0, 1.6, (30.3, 10.7)), ARCFACE_TEMPLATE_112)
    aligned = align_face(_blob_image(landmarks, 200), landmarks)
    assert aligned.size == (112, 112) and aligned.mode == "RGB"
    np.testing.assert_allclose(_centroids(aligned, ARCFACE_TEMPLATE_112), ARCFACE_TEMPLATE_112, atol=0.05)


def test_identity_warp_keeps_pixels_and_fills_black():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    np.testing.assert_array_equal(np.asarray(warp_affine(image, _similarity(0, 1, (0, 0)), (30, 20))), pixels)
    shifted = np.asarray(warp_affine(image, _similarity(0, 1, (5, 0)), (30, 20)))
    np.testing.assert_array_equal(shifted[:, 5:], pixels[:, :25])
    assert (shifted[:, :5] == 0).all()


def _grey(rows: list[list[int]]) -> Image.Image:
    return Image.fromarray(np.array(rows, dtype=np.uint8)).convert("RGB")


def test_half_pixel_shift_rounds_to_nearest_and_mixes_the_border_with_zero():
    # M = [[1, 0, -0.5], [0, 1, 0]] moves the image half a pixel left: output (x, y) samples input (x + 0.5, y), the
    # mean of input pixels x and x + 1, rounded to nearest with halves up (OpenCV's fixed-point bilinear); at x = 3 the
    # right neighbour x = 4 lies outside and counts as 0.
    #   row 0: (1 + 2) / 2 = 1.5 -> 2, (2 + 10) / 2 = 6, (10 + 20) / 2 = 15, (20 + 0) / 2 = 10
    #   row 1: (0 + 255) / 2 = 127.5 -> 128, (255 + 100) / 2 = 177.5 -> 178, (100 + 3) / 2 = 51.5 -> 52, 3 / 2 -> 2
    # The former PIL warp gave 1 6 15 0 and 127 177 51 0 (rounded down, and 0 where the sample is on the edge).
    image = _grey([[1, 2, 10, 20], [0, 255, 100, 3]])
    out = np.asarray(warp_affine(image, [[1, 0, -0.5], [0, 1, 0]], (4, 2)))
    assert out.shape == (2, 4, 3) and (out == out[..., :1]).all()
    np.testing.assert_array_equal(out[..., 0], [[2, 6, 15, 10], [128, 178, 52, 2]])


def test_scale_two_bilinear_by_hand():
    # M = 2 * identity: output (u, v) samples input (u / 2, v / 2). Even u, v hit a pixel; odd ones average 2 or 4
    # neighbours; row/column 2.5 mixes the last pixels with the 0 outside. Rounded to nearest, halves up:
    #   v = 1, u = 5: (20 + 50 + 0 + 0) / 4 = 17.5 -> 18        v = 3, u = 3: (40 + 50 + 70 + 81) / 4 = 60.25 -> 60
    #   v = 3, u = 4: (50 + 81) / 2 = 65.5 -> 66                v = 3, u = 5: (50 + 81) / 4 = 32.75 -> 33
    #   v = 4, u = 3: (70 + 81) / 2 = 75.5 -> 76                v = 4, u = 5: 81 / 2 = 40.5 -> 41
    #   v = 5: (60, (60 + 70) / 4 = 32.5 -> 33, 70 / 2, (70 + 81) / 4 = 37.75 -> 38, 81 / 2 -> 41, 81 / 4 = 20.25 -> 20)
    image = _grey([[0, 10, 20], [30, 40, 50], [60, 70, 81]])
    out = np.asarray(warp_affine(image, [[2, 0, 0], [0, 2, 0]], 6))[..., 0]
    expected = [
        [0, 5, 10, 15, 20, 10],
        [15, 20, 25, 30, 35, 18],
        [30, 35, 40, 45, 50, 25],
        [45, 50, 55, 60, 66, 33],
        [60, 65, 70, 76, 81, 41],
        [30, 33, 35, 38, 41, 20],
    ]
    np.testing.assert_array_equal(out, expected)


def test_quarter_pixel_weights_by_hand():
    # M = [[4, 0, 0], [0, 1, 0]]: output u samples input u / 4, weights 3/4 and 1/4.
    #   u = 1: 0.75 * 10 + 0.25 * 20 = 12.5 -> 13    u = 3: 0.25 * 10 + 0.75 * 20 = 17.5 -> 18
    #   u = 13: 0.75 * 41 + 0.25 * 0 = 30.75 -> 31   u = 14: 41 / 2 = 20.5 -> 21   u = 15: 0.25 * 41 = 10.25 -> 10
    out = np.asarray(warp_affine(_grey([[10, 20, 30, 41]]), [[4, 0, 0], [0, 1, 0]], (16, 1)))[0, :, 0]
    np.testing.assert_array_equal(out, [10, 13, 15, 18, 20, 23, 25, 28, 30, 33, 36, 38, 41, 31, 21, 10])


def test_align_face_is_insightface_norm_crop():
    # insightface norm_crop: cv2.warpAffine(bgr, M, (112, 112), borderValue=0.0) with M fitted from the landmarks to
    # arcface_dst. Landmarks near the top-left corner put part of the crop outside the image (black there).
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (90, 80, 3), dtype=np.uint8)
    landmarks = _apply(_similarity(-8.0, 0.7, (-12.0, -20.0)), ARCFACE_TEMPLATE_112)
    matrix = estimate_similarity(landmarks, ARCFACE_TEMPLATE_112)
    reference = cv2.warpAffine(np.ascontiguousarray(pixels[..., ::-1]), matrix, (112, 112), borderValue=0.0)
    aligned = np.asarray(align_face(Image.fromarray(pixels), landmarks))
    np.testing.assert_array_equal(aligned, reference[..., ::-1])
    assert (aligned[:5, :5] == 0).all()


def test_warp_refuses_bad_sizes_and_matrices():
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="output size"):
        warp_affine(image, _similarity(0, 1, (0, 0)), (8, 0))
    with pytest.raises(ValueError, match="output size"):
        warp_affine(image, _similarity(0, 1, (0, 0)), (8, 8, 3))
    with pytest.raises(ValueError, match="singular"):
        warp_affine(image, np.zeros((2, 3)), 8)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        warp_affine(image, np.eye(3), 8)
