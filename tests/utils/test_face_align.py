"""Tests for utils/face_align.py: Umeyama similarity fit and the warp to the ArcFace template."""

import math

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
