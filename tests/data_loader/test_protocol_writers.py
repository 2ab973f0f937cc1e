"""Tests for data_loader/protocol_writers.py: SynthFaces pair sets and IJB folders the readers accept, end to end."""

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_loader.protocol_writers import (
    detector_score,
    get_args_parser,
    main,
    write_synthface_ijb,
    write_synthface_pair_set,
)
from utils.evaluation.ijb import AlignedFaces, evaluate_ijb, load_ijb_meta
from utils.evaluation.pair_sets import evaluate_pair_set, load_pair_set
from utils.face_align import ARCFACE_TEMPLATE_112, estimate_similarity

IJB_SIZES = dict(identities=6, templates_per_identity=2, media_per_template=2, images_per_media=2)


def pixel_embed(images: torch.Tensor) -> torch.Tensor:
    """A non-learned embedding: 8x8-pooled pixels, centred per image."""
    pooled = F.avg_pool2d(images.float(), 8).flatten(1)
    return pooled - pooled.mean(1, keepdim=True)


@pytest.fixture(scope="module")
def pair_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "synth.bin"
    summary = write_synthface_pair_set(path, identities=12, pairs=120, images_per_identity=3, progress=False)
    return path, summary


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBB"
    summary = write_synthface_ijb(root, "ijbb", progress=False, **IJB_SIZES)
    return root, summary


def test_pair_set_is_readable_balanced_and_aligned(pair_set):
    path, summary = pair_set
    pairs = load_pair_set(path)
    assert pairs.num_pairs == 120 and len(pairs.images) == 240
    assert pairs.issame.tolist() == [i % 2 == 0 for i in range(120)]  # every contiguous fold is balanced
    assert summary["genuine"] == 60 and summary["images"] <= 36
    with Image.open(io.BytesIO(pairs.images[0])) as img:
        assert img.format == "JPEG" and img.size == (112, 112)
    # Genuine pairs show two different renders of one identity.
    assert all(pairs.images[2 * i] != pairs.images[2 * i + 1] for i in range(0, 120, 2))


def test_pair_set_is_deterministic_and_identities_follow_the_offset(tmp_path, pair_set):
    path, _ = pair_set
    kwargs = dict(identities=12, pairs=8, images_per_identity=3, progress=False)
    write_synthface_pair_set(tmp_path / "a.bin", **kwargs)
    write_synthface_pair_set(tmp_path / "b.bin", **kwargs)
    write_synthface_pair_set(tmp_path / "c.bin", first_identity=2_000_000, **kwargs)
    a, b, c = (load_pair_set(tmp_path / f"{n}.bin").images for n in "abc")
    assert a == b
    assert not set(a) & set(c)
    with pytest.raises(ValueError, match="even"):
        write_synthface_pair_set(tmp_path / "d.bin", identities=3, pairs=5, progress=False)
    with pytest.raises(ValueError, match="identities"):
        write_synthface_pair_set(tmp_path / "d.bin", identities=1, pairs=4, progress=False)


def test_pair_set_end_to_end_above_chance(pair_set):
    path, _ = pair_set
    result = evaluate_pair_set(path, pixel_embed, batch_size=32, progress=False)
    assert result.accuracy > 0.6  # chance is 0.5
    assert len(result.fold_accuracies) == 10


def test_ijb_layout_is_accepted_by_the_reader(ijb_root):
    root, summary = ijb_root
    meta = load_ijb_meta(root, "ijbb")
    faces = 6 * 2 * 2 * 2
    assert len(meta.image_names) == faces == summary["counts"]["faces"]
    assert np.unique(meta.templates).size == 12 and np.unique(meta.medias).size == 24
    # Genuine: each identity's 2 templates form 1 pair (6); impostors: the other C(12, 2) - 6 = 60 pairs.
    assert meta.labels.sum() == 6 and len(meta.labels) == 66
    assert ((meta.landmarks > 0) & (meta.landmarks < 144)).all()
    assert ((meta.detector_scores >= 0.05) & (meta.detector_scores <= 1)).all()
    assert json.loads((root / "synthface_ijb.json").read_text())["counts"]["pairs"] == 66


def test_ijb_media_frames_share_their_render_and_landmarks_follow_the_jitter(ijb_root):
    root, _ = ijb_root
    meta = load_ijb_meta(root, "ijbb")
    crops = AlignedFaces(meta)
    # Faces 0, 1 are the two frames of media 1; face 2 opens media 2 of the same template (another render).
    frames = [crops[i][:, 20:100, 20:100].astype(np.float64) for i in range(3)]
    same_media = np.abs(frames[0] - frames[1]).mean()
    other_media = np.abs(frames[0] - frames[2]).mean()
    assert meta.medias[0] == meta.medias[1] != meta.medias[2]
    assert same_media < 0.5 * other_media


def test_detector_score_by_hand():
    # Landmarks that are an exact similarity of the template fit with zero residual: score 1.
    assert detector_score(ARCFACE_TEMPLATE_112 * 1.3 + 7.0) == 1.0
    # Moving the nose tip by d = 3.5 px (template units) leaves residuals whose RMS is below d / sqrt(5); the score is
    # 1 - 2 * RMS / 35.2388 (the template's eye distance).
    marks = ARCFACE_TEMPLATE_112.copy()
    marks[2, 0] += 3.5
    matrix = estimate_similarity(marks, ARCFACE_TEMPLATE_112)
    rms = math.sqrt((((marks @ matrix[:, :2].T + matrix[:, 2]) - ARCFACE_TEMPLATE_112) ** 2).sum(1).mean())
    assert 0 < rms < 3.5 / math.sqrt(5)
    assert detector_score(marks) == round(1 - 2 * rms / 35.2388, 3)


def test_ijb_end_to_end_above_chance(ijb_root, tmp_path):
    root, _ = ijb_root
    result = evaluate_ijb(
        root, "ijbb", pixel_embed, output_dir=tmp_path, modes=("N1D1F1", "N0D0F0"), batch_size=16, progress=False
    )
    # Chance: TAR equals FAR; at FAR 0.1 a random scorer accepts 10 % of the genuine pairs.
    assert result.tar_at_far["N1D1F1"][0.1] > 0.3
    assert result.auc["N1D1F1"] > 0.6 and set(result.auc) == {"N1D1F1", "N0D0F0"}
    written = json.loads((tmp_path / "ijbb_results.json").read_text())
    assert written["num_pairs"] == 66 and written["tar_at_far"]["N1D1F1"]["1e-1"] == result.tar_at_far["N1D1F1"][0.1]
    assert (tmp_path / "ijbb_tar_at_far.md").read_text().startswith("| Method | TAR@FAR=1e-6")
    assert (tmp_path / "ijbb_roc.png").stat().st_size > 0


def test_ijb_impostor_sampling_and_refusals(tmp_path):
    sizes = dict(IJB_SIZES, identities=3, media_per_template=1, images_per_media=1)
    summary = write_synthface_ijb(tmp_path / "IJBC", "ijbc", impostor_pairs=5, progress=False, **sizes)
    assert summary["counts"] == dict(faces=6, templates=6, media=6, pairs=8, genuine=3, impostor=5)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_synthface_ijb(tmp_path / "IJBC", "ijbc", progress=False, **sizes)
    with pytest.raises(ValueError, match="exceeds the 12 cross-identity"):
        write_synthface_ijb(tmp_path / "big", "ijbb", impostor_pairs=13, progress=False, **sizes)
    assert not (tmp_path / "big").exists()
    with pytest.raises(ValueError, match="one of ijbb, ijbc"):
        write_synthface_ijb(tmp_path / "x", "lfw", progress=False, **sizes)


def test_ijb_is_deterministic(tmp_path):
    sizes = dict(IJB_SIZES, identities=2, media_per_template=1)
    for name in "ab":
        write_synthface_ijb(tmp_path / name, "ijbb", progress=False, **sizes)
    files = [sorted((p.relative_to(tmp_path / n), p.read_bytes()) for p in (tmp_path / n).rglob("*.*")) for n in "ab"]
    assert files[0] == files[1] and len(files[0]) == 2 * 2 * 2 + 4


def test_cli(tmp_path):
    parser = get_args_parser()
    out = tmp_path / "cli.bin"
    assert (
        main(parser.parse_args(["pairs", "--out", str(out), "--identities", "3", "--pairs", "4", "--no-progress"])) == 0
    )
    assert load_pair_set(out).num_pairs == 4
    args = ["ijb", "--out", str(tmp_path / "IJBB"), "--identities", "2", "--media-per-template", "1"]
    assert main(parser.parse_args(args + ["--images-per-media", "1", "--no-progress"])) == 0
    assert len(load_ijb_meta(tmp_path / "IJBB", "ijbb").image_names) == 4


def test_ijb_long_clip_beside_single_images(tmp_path):
    sizes = dict(identities=2, templates_per_identity=2, media_per_template=3, images_per_media=1)
    summary = write_synthface_ijb(tmp_path / "clip", "ijbb", long_clip_frames=5, progress=False, **sizes)
    meta = load_ijb_meta(tmp_path / "clip", "ijbb")
    # 4 templates of 5 + 1 + 1 faces; the 5 frames of a clip share one media id
    assert summary["counts"]["faces"] == len(meta.image_names) == 28
    first = meta.templates == 1
    _, per_media = np.unique(meta.medias[first], return_counts=True)
    assert sorted(per_media.tolist()) == [1, 1, 5]
    assert summary["parameters"]["long_clip_frames"] == 5


def test_ijb_media_nuisance_sets_the_jitter_of_each_media(tmp_path):
    sizes = dict(identities=2, templates_per_identity=2, media_per_template=2, images_per_media=3)
    # a nuisance range of [1, 1] is the default nuisance of 1: the same files
    write_synthface_ijb(tmp_path / "one", "ijbb", media_nuisance=(1.0, 1.0), progress=False, **sizes)
    write_synthface_ijb(tmp_path / "default", "ijbb", progress=False, **sizes)
    for name in ("1.jpg", "7.jpg"):
        assert (tmp_path / "one" / "loose_crop" / name).read_bytes() == (
            tmp_path / "default" / "loose_crop" / name
        ).read_bytes()
    # the frame jitter scales with the media's nuisance: at 0 the frames of a media keep the same landmarks
    write_synthface_ijb(tmp_path / "still", "ijbb", media_nuisance=(0.0, 0.0), progress=False, **sizes)
    still, moving = load_ijb_meta(tmp_path / "still", "ijbb"), load_ijb_meta(tmp_path / "one", "ijbb")
    np.testing.assert_allclose(still.landmarks[1], still.landmarks[0], atol=1e-3)
    assert np.abs(moving.landmarks[1] - moving.landmarks[0]).max() > 0.1
    # a wide range gives each media its own nuisance: media differ in how much their frames move
    write_synthface_ijb(tmp_path / "mixed", "ijbb", media_nuisance=(0.0, 3.0), progress=False, **sizes)
    mixed = load_ijb_meta(tmp_path / "mixed", "ijbb")
    spread = [np.abs(mixed.landmarks[i + 1] - mixed.landmarks[i]).max() for i in range(0, 12, 3)]
    assert max(spread) > 3 * min(spread)
    with pytest.raises(ValueError, match="--media-nuisance"):
        write_synthface_ijb(tmp_path / "bad", "ijbb", media_nuisance=(2.0, 1.0), progress=False, **sizes)
