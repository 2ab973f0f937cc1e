"""Five-point face alignment to the ArcFace 112x112 template (similarity transform, bilinear warp).

``estimate_similarity`` is Umeyama's closed-form least-squares fit of a rotation, a uniform scale and a translation
(no reflection, no shear) mapping source points onto destination points; insightface aligns with the same model
(``skimage.transform.SimilarityTransform.estimate``, which is Umeyama's method). ``align_face`` maps a face's five
landmarks (left eye, right eye, nose tip, left and right mouth corner, as seen in the image) onto
``ARCFACE_TEMPLATE_112`` and resamples the image with ``warp_affine``, which is insightface's ``norm_crop`` warp:
``cv2.warpAffine(img, M, (112, 112), borderValue=0.0)``: bilinear in OpenCV's fixed-point arithmetic (sample
positions on a 1/32-pixel grid, uint8 results rounded to nearest, halves up), with a constant 0 outside the image,
so a sample between an edge pixel and the outside mixes the edge with 0.

Coordinates are in pixels with pixel centres at integers (the convention of OpenCV and of SynthFaces'
``landmarks.csv``): the centre of the top-left pixel is (0, 0).

References: S. Umeyama, "Least-squares estimation of transformation parameters between two point patterns",
IEEE TPAMI 13(4), 1991; insightface ``python-package/insightface/utils/face_align.py`` (``arcface_dst``).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

ALIGNED_SIZE = 112
# insightface ``arcface_dst``: left eye, right eye, nose tip, left mouth corner, right mouth corner (112 x 112).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def arcface_template(size: int = ALIGNED_SIZE) -> np.ndarray:
    """The ArcFace template for a ``size`` x ``size`` crop (insightface scales the 112 template by size / 112).

    Args:
        size: crop side in pixels, a multiple of 112.

    Returns:
        (5, 2) float64 landmark positions.
    """
    if not isinstance(size, int) or size <= 0 or size % ALIGNED_SIZE:
        raise ValueError(f"face alignment: the crop size must be a positive multiple of 112, got {size!r}")
    return ARCFACE_TEMPLATE_112 * (size / ALIGNED_SIZE)


def _points(values: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(values, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 2:
        raise ValueError(f"face alignment: {name} must be an (N, 2) array with N >= 2, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"face alignment: {name} holds non-finite coordinates")
    return points


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama) mapping ``src`` points onto ``dst`` points.

    Minimises sum_i ||s R src_i + t - dst_i||^2 over a rotation R (det R = +1), a scale s > 0 and a translation t.

    Args:
        src: (N, 2) source points, N >= 2, not all equal.
        dst: (N, 2) destination points.

    Returns:
        (2, 3) float64 matrix [s R | t], so that dst ~ M @ [x, y, 1].
    """
    src, dst = _points(src, "src"), _points(dst, "dst")
    if src.shape != dst.shape:
        raise ValueError(f"face alignment: src and dst must have the same shape, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12 * max(1.0, float(np.abs(src).max()) ** 2):
        raise ValueError("face alignment: the source points all coincide; a similarity transform is undefined")
    cov = dst_c.T @ src_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[-1] = -1.0  # the best orthogonal map is a reflection: take the nearest rotation instead
    rotation = u @ np.diag(signs) @ vt
    scale = float(sing @ signs) / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def _output_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) from a side or a (width, height) pair of positive integers."""
    sides = size if isinstance(size, tuple) else (size, size)
    if len(sides) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in sides
    ):
        raise ValueError(f"face alignment: the output size must be a positive side or (width, height), got {size!r}")
    return int(sides[0]), int(sides[1])


def warp_affine(image: Image.Image, matrix: np.ndarray, size: int | tuple[int, int]) -> Image.Image:
    """Resample ``image`` through the forward affine map ``matrix`` (input -> output pixels), bilinear, black fill.

    This is ``cv2.warpAffine(pixels, matrix, (width, height), borderValue=0.0)``, insightface's ``norm_crop`` warp
    (module docstring); the warp acts on each channel alone, so RGB and OpenCV's BGR give the same pixels.

    Args:
        image: source image (converted to RGB).
        matrix: (2, 3) map from input to output pixel coordinates (pixel centres at integers).
        size: output side, or (width, height).

    Returns:
        The output RGB image.
    """
    width, height = _output_size(size)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (2, 3) or not np.isfinite(matrix).all():
        raise ValueError(f"face alignment: expected a finite (2, 3) affine matrix, got shape {matrix.shape}")
    if abs(np.linalg.det(matrix[:, :2])) < 1e-12:
        raise ValueError("face alignment: the affine matrix is singular")
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    warped = cv2.warpAffine(
        pixels, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0
    )
    return Image.fromarray(warped, "RGB")


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> Image.Image:
    """Align a face to the ArcFace template from its five landmarks.

    Args:
        image: the (loose) face image.
        landmarks: (5, 2) landmarks in ``image`` pixels: left eye, right eye, nose tip, left and right mouth corner.
        size: output side (a multiple of 112).

    Returns:
        The ``size`` x ``size`` RGB aligned crop.
    """
    landmarks = _points(landmarks, "landmarks")
    if landmarks.shape != (5, 2):
        raise ValueError(f"face alignment: expected 5 landmarks, got shape {landmarks.shape}")
    return warp_affine(image, estimate_similarity(landmarks, arcface_template(size)), size)
