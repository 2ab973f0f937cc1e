"""Tests for utils/evaluation/pair_sets.py: 10-fold accuracy, VAL@FAR, distances, the .bin format and its errors."""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import KFold

from utils.evaluation.pair_sets import (
    ACCURACY_THRESHOLDS,
    PairSet,
    VerificationDataError,
    embed_pair_set,
    evaluate_distances,
    evaluate_pair_set,
    fold_slices,
    load_pair_set,
    pair_distances,
    validation_rate,
    verification_accuracy,
    write_pair_set,
)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _solid(colour: tuple[int, int, int], size: int = 112) -> bytes:
    return _png(np.broadcast_to(np.array(colour, dtype=np.uint8), (size, size, 3)))


def test_folds_are_sklearn_kfold_without_shuffle():
    ours = fold_slices(23, 10)
    theirs = list(KFold(n_splits=10, shuffle=False).split(np.arange(23)))
    assert len(ours) == 10
    for (train, test), (train_ref, test_ref) in zip(ours, theirs):
        np.testing.assert_array_equal(train, train_ref)
        np.testing.assert_array_equal(test, test_ref)
    ((train, test),) = fold_slices(5, 1)
    np.testing.assert_array_equal(train, test)


def test_ten_fold_accuracy_and_thresholds_by_hand():
    # 20 pairs alternating genuine / impostor, 2 per fold. Genuine distance 0.503, impostor 1.555, except the hard
    # genuine pair 0 at 1.234.
    # - Fold 0 (pairs 0, 1) trains on separable pairs: every threshold in (0.503, 1.555] is perfect; the first grid
    #   value, 0.51, rejects pair 0 -> fold accuracy 1/2.
    # - Folds 1-9 train with pair 0: perfect thresholds lie in (1.234, 1.555]; the first is 1.24; all test pairs
    #   are right -> accuracy 1.
    # Mean (0.5 + 9) / 10 = 0.95; std sqrt((0.45^2 + 9 * 0.05^2) / 10) = sqrt(0.0225) = 0.15; mean threshold
    # (0.51 + 9 * 1.24) / 10 = 1.167.
    issame = np.arange(20) % 2 == 0
    distances = np.where(issame, 0.503, 1.555)
    distances[0] = 1.234
    accuracies, thresholds = verification_accuracy(distances, issame)
    np.testing.assert_allclose(accuracies, [0.5] + [1.0] * 9)
    np.testing.assert_allclose(thresholds, [0.51] + [1.24] * 9)
    result = evaluate_distances(distances, issame)
    assert result.accuracy == pytest.approx(0.95)
    assert result.accuracy_std == pytest.approx(0.15)
    assert result.threshold == pytest.approx(1.167)
    assert (result.num_pairs, result.num_genuine) == (20, 10)


def _insightface_accuracy(thresholds, dist, issame):
    """Transcription of insightface calculate_roc's loop (calculate_accuracy per threshold, np.argmax)."""
    accuracy = []
    for train, test in KFold(n_splits=10, shuffle=False).split(np.arange(len(dist))):
        acc_train = []
        for threshold in thresholds:
            predict = np.less(dist[train], threshold)
            tp = np.sum(predict & issame[train])
            tn = np.sum(~predict & ~issame[train])
            acc_train.append(float(tp + tn) / dist[train].size)
        best = thresholds[np.argmax(acc_train)]
        predict = np.less(dist[test], best)
        accuracy.append(float(np.sum(predict & issame[test]) + np.sum(~predict & ~issame[test])) / dist[test].size)
    return np.array(accuracy)


def test_accuracy_matches_insightface_loop_on_random_distances():
    rng = np.random.default_rng(0)
    issame = rng.random(600) < 0.5
    distances = np.clip(rng.normal(np.where(issame, 0.9, 1.5), 0.3), 0, 4)
    accuracies, _ = verification_accuracy(distances, issame)
    np.testing.assert_array_equal(accuracies, _insightface_accuracy(ACCURACY_THRESHOLDS, distances, issame))


def test_val_at_far_by_hand():
    # Two folds of four pairs (genuine, impostor, genuine, impostor), target FAR 0.25, thresholds every 0.001.
    # Fold A: genuine 0.2, 1.2347; impostors 1.0005, 2.0005.  Fold B: genuine 0.3, 1.0003; impostors 1.2345, 1.8345.
    # Test A, train B: FAR is 0 up to t = 1.234 and 0.5 from t = 1.235; 0.25 interpolates to t = 1.2345. On A this
    #   accepts genuine 0.2 but not 1.2347 -> VAL 1/2 (1 with the grid value 1.235), impostor 1.0005 -> FAR 1/2.
    # Test B, train A: FAR steps 0 -> 0.5 between t = 1.000 and 1.001 -> t = 1.0005. On B: both genuine accepted
    #   (VAL 1; 1/2 with the grid value 1.000), no impostor (FAR 0).
    # VAL mean 0.75, std 0.25; FAR mean 0.25.
    issame = np.array([True, False, True, False] * 2)
    distances = np.array([0.2, 1.0005, 1.2347, 2.0005, 0.3, 1.2345, 1.0003, 1.8345])
    val, val_std, far = validation_rate(distances, issame, far_target=0.25, folds=2)
    assert (val, val_std, far) == pytest.approx((0.75, 0.25, 0.25))


def test_val_is_zero_when_no_threshold_reaches_the_target():
    # Impostors at 3.9995 are never accepted by any threshold < 4, so FAR 1e-3 is out of reach: threshold 0.
    issame = np.arange(20) % 2 == 0
    distances = np.where(issame, 0.1, 3.9995)
    assert validation_rate(distances, issame) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="without genuine or without impostor"):
        validation_rate(np.zeros(20), np.arange(20) < 10)


def test_pair_distances_by_hand():
    # (3, 4) and (6, 8) normalise to the same vector: 0. (1, 0) and (0, 2) normalise to orthogonal units: 2.
    embeddings = torch.tensor([[3.0, 4.0], [6.0, 8.0], [1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(pair_distances(embeddings), [0.0, 2.0], atol=1e-12)


def test_round_trip_and_decoding(tmp_path):
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (112, 112, 3)) for _ in range(4)]
    images = [_png(p) for p in pixels]
    path = write_pair_set(tmp_path / "set.bin", images, [True, False])
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert raw == (images, [True, False])
    loaded = load_pair_set(path)
    assert loaded.images == images and loaded.issame.tolist() == [True, False] and loaded.num_pairs == 2


def test_flip_embeddings_are_summed_and_xnorm_is_the_mean_raw_norm():
    # Left half 200, right half 0; embed = mean of the left half of channel 0: image 200, flip 0 -> sum 200;
    # XNorm = (200 + 0) / 2.
    half = np.zeros((112, 112, 3), dtype=np.uint8)
    half[:, :56] = 200
    pairs = PairSet([_png(half)] * 2, np.array([True]), "memory")
    summed, xnorm = embed_pair_set(pairs, lambda x: x[:, :1, :, :56].float().mean((2, 3)), progress=False)
    np.testing.assert_allclose(summed.numpy(), [[200.0], [200.0]])
    assert xnorm == pytest.approx(100.0)


def test_evaluate_pair_set_end_to_end_on_colours(tmp_path):
    # 20 pairs: genuine = two images of one colour, impostor = two colours; embedding = mean colour - 127.5.
    rng = np.random.default_rng(1)
    images, issame = [], []
    for index in range(20):
        a, b = (rng.integers(0, 256, 3) for _ in range(2))
        same = index % 2 == 0
        images += [_solid(tuple(a)), _solid(tuple(a if same else b))]
        issame.append(same)
    path = write_pair_set(tmp_path / "colours.bin", images, issame)
    result = evaluate_pair_set(path, lambda x: x.float().mean((2, 3)) - 127.5, batch_size=7, progress=False)
    assert result.accuracy == 1.0 and result.fold_accuracies == [1.0] * 10
    assert result.val == 1.0


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


def test_bad_files_raise_one_clear_error(tmp_path):
    good = _solid((1, 2, 3), 8)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a pickle")
    with pytest.raises(VerificationDataError, match=r"junk\.bin: not a pickled pair set"):
        load_pair_set(junk)
    with pytest.raises(VerificationDataError, match=r"dict\.bin: expected a pickled 2-tuple"):
        load_pair_set(_dump(tmp_path / "dict.bin", {"images": [good]}))
    with pytest.raises(VerificationDataError, match=r"3 images for 2 pairs; expected 2 images per pair \(4\)"):
        load_pair_set(_dump(tmp_path / "counts.bin", ([good] * 3, [True, False])))
    with pytest.raises(VerificationDataError, match="refers to numpy"):
        load_pair_set(_dump(tmp_path / "numpy.bin", ([good] * 2, np.array([True]))))
    with pytest.raises(VerificationDataError, match="image 1 is a str"):
        load_pair_set(_dump(tmp_path / "type.bin", ([good, "x"], [True])))
    broken = _dump(tmp_path / "broken.bin", ([good, good, b"\xff\xd8 not a jpeg", good], [True, False]))
    pairs = load_pair_set(broken)
    with pytest.raises(VerificationDataError, match=r"broken\.bin: image 2 does not decode"):
        evaluate_pair_set(pairs, lambda x: x.float().mean((2, 3)), folds=1, progress=False)
    with pytest.raises(VerificationDataError, match="expected 2 images per pair"):
        write_pair_set(tmp_path / "w.bin", [good], [True])
