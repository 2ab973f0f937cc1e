"""MTCNN on real photos that ship in packages: the face is found where it is, with its landmarks in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from photos.mtcnn import pyramid_scales


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _check_face(found: dict, region: tuple[float, float, float, float]) -> None:
    """One confident face whose box centre lies in ``region`` (x1, y1, x2, y2, read off the photo by eye) and whose
    landmarks lie inside the box in the ArcFace order: eyes above the nose above the mouth, left before right."""
    keep = found["scores"] >= 0.9
    assert int(keep.sum()) == 1, found["scores"]
    box, points = found["boxes"][keep][0].numpy(), found["landmarks"][keep][0].numpy()
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert region[0] <= cx <= region[2] and region[1] <= cy <= region[3], box
    assert (points[:, 0] > box[0]).all() and (points[:, 0] < box[2]).all(), (points, box)
    assert (points[:, 1] > box[1]).all() and (points[:, 1] < box[3]).all(), (points, box)
    left_eye, right_eye, nose, mouth_left, mouth_right = points
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_pyramid_scales_by_hand():
    """12/20 = 0.6, then times 0.709 while 100 px times the scale stays >= 12 (100 * 0.6 * 0.709^5 = 10.7 stops)."""
    expected = [0.6, 0.4254, 0.30160860, 0.21384050, 0.15161291]
    assert pyramid_scales(100, 20.0) == pytest.approx(expected, rel=1e-6)
    assert pyramid_scales(11, 20.0) == []


def test_astronaut_face_and_landmarks(mtcnn, astronaut):
    """Eileen Collins's face in scikit-image's astronaut: by eye her face spans x 175-265, y 60-175 and her eyes
    sit near (205, 102) and (246, 104)."""
    found = mtcnn([_tensor(astronaut)])[0]
    _check_face(found, (190, 90, 250, 145))
    eyes = found["landmarks"][found["scores"] >= 0.9][0, :2].numpy()
    np.testing.assert_allclose(eyes, [[205, 102], [246, 104]], atol=6)


def test_grace_hopper(mtcnn, grace_hopper):
    """Debian's facedetect example photo (Grace Hopper, public domain): her face spans x 180-350, y 90-310."""
    _check_face(mtcnn([_tensor(grace_hopper)])[0], (220, 160, 310, 250))


def test_lfw_batch_of_mixed_sizes_matches_one_by_one(mtcnn, lfw_faces):
    """Eight upscaled LFW faces of two sizes in one padded batch: one face each, centred, the same as alone."""
    images = [img if i % 2 else img.resize((240, 240), Image.BICUBIC) for i, img in enumerate(lfw_faces)]
    batch = mtcnn([_tensor(img) for img in images])
    for img, found in zip(images, batch):
        side = img.size[0]
        _check_face(found, (0.3 * side, 0.3 * side, 0.7 * side, 0.7 * side))
        alone = mtcnn([_tensor(img)])[0]
        np.testing.assert_allclose(found["boxes"][0].numpy(), alone["boxes"][0].numpy(), atol=0.5)
        np.testing.assert_allclose(found["landmarks"][0].numpy(), alone["landmarks"][0].numpy(), atol=0.5)


def test_no_face_and_tiny_image(mtcnn, non_face):
    """A cup of coffee holds no face; an image smaller than the smallest face searched for gives none either."""
    none, tiny = mtcnn([_tensor(non_face), torch.zeros(3, 10, 10, dtype=torch.uint8)])
    assert len(none["boxes"][none["scores"] >= 0.9]) == 0
    assert tiny["boxes"].shape == (0, 4) and tiny["landmarks"].shape == (0, 5, 2)
