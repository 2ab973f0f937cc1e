"""Tests for utils/evaluation/ijb.py: feature switches, template pooling by hand, blocked pair scoring, meta errors."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import load_worker, run_torchrun_worker

from utils.evaluation.ijb import (
    IJBDataError,
    IJBMode,
    embed_ijb_faces,
    evaluate_ijb,
    image_features,
    load_ijb_meta,
    meta_paths,
    pair_scores,
    template_features,
    template_rows,
)

R2 = 1 / math.sqrt(2)
WORKER = Path(__file__).with_name("_ijb_dist_worker.py")
worker = load_worker(WORKER)

# The dozen pairs of tests/utils/test_roc.py (worked by hand there): sorted by score 0.95 G, 0.90 I, 0.85 G, 0.80 I,
# 0.75 I, 0.70 I, 0.65 I, 0.60 G, 0.55 I, 0.50 G, 0.45 I, 0.40 I. At FAR 0.5 the exact ROC has its own point (TPR
# 0.5); insightface's thinned ROC (sklearn drop_intermediate=True) keeps only the ends of the run from FPR .125 to
# .625 and takes the last point at FPR .625, TPR .75. The other FARs agree.
DOZEN_SCORES = [0.75, 0.95, 0.4, 0.6, 0.9, 0.55, 0.85, 0.45, 0.7, 0.5, 0.8, 0.65]
DOZEN_LABELS = [0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
INSIGHTFACE_TARS = {0.1: 0.5, 0.3: 0.5, 0.5: 0.75, 0.9: 1.0}
EXACT_TARS = {0.1: 0.5, 0.3: 0.5, 0.5: 0.5, 0.9: 1.0}


def test_mode_names():
    assert IJBMode().name == "N1D1F1"
    assert IJBMode.parse("n0d1f0") == IJBMode(flip=False, keep_norm=False, detector_score=True)
    with pytest.raises(ValueError, match="N<0|1>D<0|1>F<0|1>"):
        IJBMode.parse("N1F1")


def test_image_feature_switches_by_hand():
    emb, flip, score = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]]), np.array([0.5])
    # F1: (3, 4) + (1, 0) = (4, 4); D1: x 0.5 = (2, 2); N0 first normalises (4, 4) to (1, 1)/sqrt 2.
    assert image_features(emb, flip, score, IJBMode(True, True, True)).tolist() == [[2.0, 2.0]]
    assert image_features(emb, flip, score, IJBMode(False, True, False)).tolist() == [[3.0, 4.0]]
    np.testing.assert_allclose(image_features(emb, flip, score, IJBMode(True, False, True)), [[0.5 * R2, 0.5 * R2]])
    np.testing.assert_allclose(image_features(emb, None, None, IJBMode(False, False, False)), [[0.6, 0.8]])
    with pytest.raises(ValueError, match="flip embeddings"):
        image_features(emb, None, score, IJBMode())
    with pytest.raises(ValueError, match="detector scores"):
        image_features(emb, flip, None, IJBMode())


def test_template_pooling_by_hand():
    # Template 7: media 10 holds (1, 0) and (3, 0) -> mean (2, 0); media 11 holds (0, 2); sum (2, 2) -> (1, 1)/sqrt 2.
    # Template 3: media 10 (the same media id, another template) holds (0, -5) -> (0, -1).
    # Template 9: media 4 holds (10, 0) and media 5 holds (0, 1): the norms weigh the sum, (10, 1) / sqrt 101.
    feats = torch.tensor([[1.0, 0.0], [0.0, -5.0], [3.0, 0.0], [0.0, 2.0], [10.0, 0.0], [0.0, 1.0]])
    templates = np.array([7, 3, 7, 7, 9, 9])
    medias = np.array([10, 10, 10, 11, 4, 5])
    ids, pooled = template_features(feats, templates, medias)
    assert ids.tolist() == [3, 7, 9]
    np.testing.assert_allclose(pooled, [[0, -1], [R2, R2], [10 / math.sqrt(101), 1 / math.sqrt(101)]], rtol=1e-6)
    # Averaging within a media, not over images: three images of one media count once against one of another.
    ids, pooled = template_features(torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0]]), [1, 1, 1, 1], [5, 5, 5, 6])
    np.testing.assert_allclose(pooled, [[R2, R2]], rtol=1e-6)
    rows = template_rows(torch.tensor([3, 7, 9]), np.array([[7, 3], [9, 9]]))
    assert rows.tolist() == [[1, 0], [2, 2]]
    with pytest.raises(IJBDataError, match="template 8"):
        template_rows(torch.tensor([3, 7, 9]), np.array([[7, 8]]))


def _naive(feats, first, second):
    return (feats[first] * feats[second]).sum(1)


@pytest.mark.parametrize(
    "layout, block_bytes",
    [
        ("random", 256 << 20),  # one GEMM block
        ("random", 4 * 40 * 300),  # 300 columns x 40 rows a block: 8 blocks
        ("narrow_second", 4 * 300),  # 7 distinct second rows: sides swap, 1 row of 300 columns a block
        ("sparse", 256 << 20),  # 100 pairs in a ~90 x 90 block (under 1/64 of it): scored pair by pair
    ],
)
def test_pair_scores_equal_row_wise_dot_products(layout, block_bytes):
    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=1)
    count = 100 if layout == "sparse" else 5000
    first = torch.randint(300, (count,), generator=gen)
    second = (
        torch.randint(7, (count,), generator=gen) * 11 if layout == "narrow_second" else torch.randint(300, (count,))
    )
    scores = pair_scores(feats, first, second, max_block_bytes=block_bytes)
    torch.testing.assert_close(scores, _naive(feats, first, second), rtol=0, atol=1e-6)


def test_pair_scores_checks_indices():
    feats = torch.eye(3)
    assert pair_scores(feats, torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)).numel() == 0
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pair_scores(feats, torch.tensor([0, 3]), torch.tensor([1, 1]))


def _write_meta(root, faces="a.jpg 1 10\nb.jpg 1 11\nc.jpg 2 12\n", pairs="1 2 0\n1 1 1\n", marks=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(exist_ok=True)
    paths = meta_paths(root, "ijbb")
    paths["faces"].parent.mkdir(exist_ok=True)
    if marks is None:
        points = " ".join(["10.0"] * 10)
        marks = "".join(f"{name} {points} 0.9\n" for name in ("a.jpg", "b.jpg", "c.jpg"))
    for kind, text in (("faces", faces), ("pairs", pairs), ("landmarks", marks)):
        if text is not None:
            paths[kind].write_text(text)
    return paths


def test_meta_reads_a_well_formed_folder(tmp_path):
    marks = [
        "c.jpg 0 1 2 3 4 5 6 7 8 9 0.25",
        "b.jpg 1 1 1 1 1 1 1 1 1 1 1",
        "a.jpg 2 2 2 2 2 2 2 2 2 2 0.5",
        "unused.jpg 3 3 3 3 3 3 3 3 3 3 0.1",
    ]
    _write_meta(tmp_path, marks="\n".join(marks) + "\n")
    meta = load_ijb_meta(tmp_path, "ijbb")
    assert meta.image_names == ["a.jpg", "b.jpg", "c.jpg"]
    assert meta.templates.tolist() == [1, 1, 2] and meta.medias.tolist() == [10, 11, 12]
    # Joined by name, not by line: c.jpg is the first landmarks line but the third face.
    np.testing.assert_array_equal(meta.landmarks[2], np.arange(10).reshape(5, 2))
    assert meta.detector_scores.tolist() == [0.5, 1.0, 0.25]
    assert meta.pairs.tolist() == [[1, 2], [1, 1]] and meta.labels.tolist() == [False, True]


@pytest.mark.parametrize(
    "files, message",
    [
        (dict(pairs=None), "missing IJB meta file {pairs}; expected lines 'template_id_1"),
        (dict(faces="a.jpg 1 10\nb.jpg 1\n"), "{faces}:2: expected 'image_name template_id media_id"),
        (dict(pairs="1 2 0\n\n1 x 1\n"), "{pairs}:3: expected 'template_id_1 .*got '1 x 1'"),
        (dict(pairs="1 2 0\n\n1 1 2\n"), "{pairs}:3: label 2 is not 0 or 1"),
        (dict(marks="a.jpg 1 2 3\n"), "{landmarks}:1: expected 'image_name x1 y1"),
        (dict(marks="a.jpg " + "1 " * 11 + "\n"), "{landmarks}: no line for image b.jpg .*2 faces lack"),
        (dict(pairs="1 2 0\n2 5 0\n"), "{pairs}:2: template 5 has no face"),
        (dict(pairs="\n"), "no pairs"),
    ],
    ids=["missing", "faces", "pairs", "label", "marks", "nomark", "unknown", "empty"],
)
def test_meta_errors_name_the_file_line_and_expectation(tmp_path, files, message):
    paths = _write_meta(tmp_path, **files)
    with pytest.raises(IJBDataError, match=message.format(**{kind: re.escape(str(p)) for kind, p in paths.items()})):
        load_ijb_meta(tmp_path, "ijbb")


def test_meta_refuses_unknown_benchmark_names(tmp_path):
    _write_meta(tmp_path)
    with pytest.raises(ValueError, match="not one of ijbb, ijbc"):
        load_ijb_meta(tmp_path, "lfw")


@pytest.fixture(scope="module")
def scored_ijb(tmp_path_factory):
    root = tmp_path_factory.mktemp("scored") / "IJBB"
    worker.write_scored_ijb(root, DOZEN_SCORES, DOZEN_LABELS)
    return root


def test_embedding_with_loader_workers_keeps_face_order(scored_ijb):
    meta = load_ijb_meta(scored_ijb, "ijbb")
    embeddings, flips = embed_ijb_faces(meta, worker.pixel_vector_embed, batch_size=3, workers=2, progress=False)
    # Face 0 is the probe, red 128 + 100; face k + 1 has red 128 + round(100 * score k): x = 100 * score exactly.
    assert embeddings[:, 0].tolist() == [100.0] + [round(100 * s) for s in DOZEN_SCORES]
    assert torch.equal(flips, embeddings)  # uniform crops: the flip is the same image
    with pytest.raises(ValueError, match="workers must be >= 0"):
        embed_ijb_faces(meta, worker.pixel_vector_embed, workers=-1, progress=False)


def test_evaluate_ijb_takes_tar_at_far_as_insightface_by_default(scored_ijb, tmp_path):
    runs = {}
    for exact_roc in (False, True):
        out = tmp_path / str(exact_roc)
        runs[exact_roc] = evaluate_ijb(
            scored_ijb,
            "ijbb",
            worker.pixel_vector_embed,
            output_dir=out,
            modes=("N1D1F1",),
            batch_size=4,
            workers=2,
            fars=worker.FARS,
            exact_roc=exact_roc,
            progress=False,
        )
        written = json.loads((out / "ijbb_results.json").read_text())
        assert written["exact_roc"] is exact_roc and runs[exact_roc].exact_roc is exact_roc
        rule = "exact ROC" if exact_roc else "drop_intermediate=True"
        assert rule in (out / "ijbb_tar_at_far.md").read_text().splitlines()[-1]
    assert runs[False].tar_at_far["N1D1F1"] == INSIGHTFACE_TARS
    assert runs[True].tar_at_far["N1D1F1"] == EXACT_TARS
    default = evaluate_ijb(scored_ijb, "ijbb", worker.pixel_vector_embed, fars=worker.FARS, progress=False)
    assert default.exact_roc is False and default.tar_at_far == runs[False].tar_at_far


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_processes_shard_the_embedding_and_report_the_same_tars(scored_ijb, tmp_path):
    out = tmp_path / "ijb.pt"
    run_torchrun_worker(WORKER, [scored_ijb, out], timeout=110)
    saved = torch.load(out, weights_only=True)
    single, single_flips = embed_ijb_faces(load_ijb_meta(scored_ijb, "ijbb"), worker.pixel_vector_embed, progress=False)
    assert saved["world_size"] == 2
    # rank 0 embedded faces 0, 2, 4, ... and rank 1 faces 1, 3, ...; the gather restores face order exactly
    assert torch.equal(saved["embeddings"], single) and torch.equal(saved["flips"], single_flips)
    assert saved["tars"] == {"insightface": INSIGHTFACE_TARS, "exact": EXACT_TARS}
    assert saved["exact_roc"] == {"insightface": False, "exact": True}
