"""Face verification on insightface ``.bin`` pair sets (LFW, CFP-FP, AgeDB-30, ...): 10-fold accuracy and VAL@FAR.

File format (insightface ``recognition/arcface_torch/eval/verification.py``, ``load_bin``): a pickle of the 2-tuple
``(images, issame)``, where ``images`` is a list of encoded images (JPEG or PNG bytes, aligned 112 x 112 crops) and
``issame`` a list of booleans; pair i is ``images[2 i]`` and ``images[2 i + 1]``, so ``len(images) == 2 *
len(issame)``. Files written by Python 2 hold ``str`` images and are read with ``pickle.load(f, encoding="bytes")``.

Protocol (``verification.test`` and ``evaluate``):

- every image and its horizontal flip are embedded; the two embeddings are summed and L2-normalised;
- the distance of a pair is the squared Euclidean distance of its normalised embeddings (``np.sum(np.square(diff),
  1)``), in [0, 4]; a pair is predicted genuine when distance < threshold;
- accuracy: the pairs are cut into 10 contiguous folds (``KFold(n_splits=10, shuffle=False)``: the first n % 10 folds
  get one pair more); for each fold, the threshold of ``np.arange(0, 4, 0.01)`` with the highest accuracy on the
  other nine folds (the first such threshold on ties) is applied to the fold; reported as the mean and the
  (population) standard deviation of the 10 fold accuracies;
- VAL@FAR (``calculate_val``, target FAR 1e-3, thresholds ``np.arange(0, 4, 0.001)``): per fold, FAR(t) = accepted
  impostors / impostors and VAL(t) = accepted genuine pairs / genuine pairs. On the nine training folds the
  threshold giving FAR = target is read off the curve of (FAR(t), t) by linear interpolation (0 when no threshold
  reaches the target), then VAL and FAR are measured with it on the test fold; reported as mean and std of VAL and
  mean of FAR over folds. insightface interpolates with ``scipy.interpolate.interp1d(far, thresholds,
  kind="slinear")``, which SciPy >= 1.9 refuses because FAR(t) repeats values; we use ``np.interp(target, far,
  thresholds)``, the piecewise-linear curve through consecutive points, which matches ``interp1d`` wherever the
  target falls between two distinct FAR values (where it equals a FAR reached over several thresholds, np.interp
  takes the largest of them).

Scoring (``verification_accuracy``, ``validation_rate``, ``evaluate_distances``) works on distances alone and is
separate from the file reading (``load_pair_set``, ``write_pair_set``) and the embedding (``embed_pair_set``).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from utils.checkpoint import _atomic_write
from utils.images import DECODE_ERRORS

logger = logging.getLogger(__name__)

EmbedFn = Callable[[torch.Tensor], torch.Tensor]

NUM_FOLDS = 10
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
VAL_FAR_TARGET = 1e-3
IMAGE_SIZE = 112
PICKLE_PROTOCOL = 4


class VerificationDataError(ValueError):
    """A pair-set file (or pair-set data) is malformed; the message names the file and what was expected."""


@dataclass(frozen=True)
class PairSet:
    """A loaded pair set: encoded images (2 per pair, pair i = images 2i, 2i+1) and the genuine flags."""

    images: list[bytes]
    issame: np.ndarray
    source: str

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


@dataclass(frozen=True)
class PairSetResult:
    """Scores of one pair set (see the module docstring for the definitions).

    ``fold_thresholds`` are the per-fold best thresholds and ``threshold`` their mean; ``xnorm`` is the mean L2 norm
    of the raw embeddings (images and flips), as insightface logs it (None when scored from distances).
    """

    num_pairs: int
    num_genuine: int
    accuracy: float
    accuracy_std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    threshold: float
    val: float
    val_std: float
    far: float
    far_target: float
    xnorm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------- scoring


def fold_slices(num: int, folds: int = NUM_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of ``KFold(n_splits=folds, shuffle=False)``; ``folds=1`` tests on the training set.

    Args:
        num: number of pairs.
        folds: number of folds (1 = insightface's ``LFold`` with one split: train = test = everything).

    Returns:
        One (train indices, test indices) tuple per fold.
    """
    if not isinstance(folds, int) or folds < 1 or folds > num:
        raise ValueError(f"the number of folds must be an integer in [1, {num}] (the number of pairs), got {folds!r}")
    indices = np.arange(num)
    if folds == 1:
        return [(indices, indices)]
    return [(np.setdiff1d(indices, test, assume_unique=True), test) for test in np.array_split(indices, folds)]


def _accept_counts(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per threshold t: genuine and impostor pairs with distance < t; then the numbers of genuine and impostor pairs."""
    genuine = np.sort(distances[issame])
    impostor = np.sort(distances[~issame])
    accepted_genuine = np.searchsorted(genuine, thresholds, side="left")
    accepted_impostor = np.searchsorted(impostor, thresholds, side="left")
    return accepted_genuine, accepted_impostor, len(genuine), len(impostor)


def _check_distances(distances: Sequence[float] | np.ndarray, issame: Sequence[bool] | np.ndarray) -> tuple:
    dist = np.asarray(distances, dtype=np.float64)
    same = np.asarray(issame)
    if dist.ndim != 1 or same.shape != dist.shape:
        raise ValueError(f"distances and issame must be 1-D of equal length, got shapes {dist.shape} and {same.shape}")
    if same.dtype != bool:
        raise ValueError(f"issame must be booleans, got dtype {same.dtype}")
    if not np.isfinite(dist).all():
        raise ValueError("distances must be finite")
    return dist, same


def verification_accuracy(
    distances: Sequence[float] | np.ndarray,
    issame: Sequence[bool] | np.ndarray,
    *,
    thresholds: np.ndarray = ACCURACY_THRESHOLDS,
    folds: int = NUM_FOLDS,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold accuracy with the threshold chosen on the other folds (insightface ``calculate_roc``).

    Args:
        distances: (n,) pair distances (genuine pairs small).
        issame: (n,) True for genuine pairs.
        thresholds: candidate thresholds in increasing order; a pair is accepted when distance < threshold.
        folds: number of contiguous folds.

    Returns:
        (fold accuracies, fold thresholds), each (folds,) float64.
    """
    dist, same = _check_distances(distances, issame)
    accuracies, chosen = np.zeros(folds), np.zeros(folds)
    for fold, (train, test) in enumerate(fold_slices(len(dist), folds)):
        acc_genuine, acc_impostor, _, num_impostor = _accept_counts(dist[train], same[train], thresholds)
        train_accuracy = (acc_genuine + num_impostor - acc_impostor) / len(train)
        best = thresholds[int(np.argmax(train_accuracy))]
        predicted = dist[test] < best
        accuracies[fold] = float(np.sum(predicted == same[test])) / len(test)
        chosen[fold] = best
    return accuracies, chosen


def validation_rate(
    distances: Sequence[float] | np.ndarray,
    issame: Sequence[bool] | np.ndarray,
    *,
    far_target: float = VAL_FAR_TARGET,
    thresholds: np.ndarray = VAL_THRESHOLDS,
    folds: int = NUM_FOLDS,
) -> tuple[float, float, float]:
    """VAL at a target FAR (insightface ``calculate_val``; interpolation as in the module docstring).

    Args:
        distances: (n,) pair distances.
        issame: (n,) True for genuine pairs.
        far_target: target false accept rate on the training folds.
        thresholds: thresholds the FAR curve is sampled at (increasing).
        folds: number of contiguous folds.

    Returns:
        (mean VAL, std of VAL, mean FAR) over the folds.
    """
    dist, same = _check_distances(distances, issame)
    val, far = np.zeros(folds), np.zeros(folds)
    for fold, (train, test) in enumerate(fold_slices(len(dist), folds)):
        for part, name in ((train, "training"), (test, "test")):
            if same[part].all() or not same[part].any():
                raise ValueError(
                    f"VAL@FAR: fold {fold} has a {name} set without genuine or without impostor pairs; "
                    "expected both in every fold (interleave or mix the pairs)"
                )
        _, acc_impostor, _, num_impostor = _accept_counts(dist[train], same[train], thresholds)
        far_train = acc_impostor / num_impostor
        threshold = float(np.interp(far_target, far_train, thresholds)) if far_train.max() >= far_target else 0.0
        predicted = dist[test] < threshold
        val[fold] = np.sum(predicted & same[test]) / np.sum(same[test])
        far[fold] = np.sum(predicted & ~same[test]) / np.sum(~same[test])
    return float(val.mean()), float(val.std()), float(far.mean())


def evaluate_distances(
    distances: Sequence[float] | np.ndarray,
    issame: Sequence[bool] | np.ndarray,
    *,
    folds: int = NUM_FOLDS,
    far_target: float = VAL_FAR_TARGET,
    xnorm: float | None = None,
) -> PairSetResult:
    """All pair-set scores from pair distances (accuracy +- std, thresholds, VAL@FAR).

    Args:
        distances: (n,) squared L2 distances of normalised embeddings.
        issame: (n,) True for genuine pairs.
        folds: number of contiguous folds.
        far_target: FAR of the VAL figure.
        xnorm: mean raw embedding norm to record, if known.

    Returns:
        The ``PairSetResult``.
    """
    accuracies, thresholds = verification_accuracy(distances, issame, folds=folds)
    val, val_std, far = validation_rate(distances, issame, far_target=far_target, folds=folds)
    same = np.asarray(issame)
    return PairSetResult(
        num_pairs=len(same),
        num_genuine=int(same.sum()),
        accuracy=float(accuracies.mean()),
        accuracy_std=float(accuracies.std()),
        fold_accuracies=accuracies.tolist(),
        fold_thresholds=thresholds.tolist(),
        threshold=float(thresholds.mean()),
        val=val,
        val_std=val_std,
        far=far,
        far_target=far_target,
        xnorm=xnorm,
    )


def pair_distances(embeddings: torch.Tensor) -> np.ndarray:
    """Squared L2 distances of consecutive embedding pairs (rows 2i, 2i+1) after L2 normalisation, in float64.

    Args:
        embeddings: (2 n, D) embeddings (each the sum of an image's and its flip's embedding).

    Returns:
        (n,) distances in [0, 4].
    """
    if embeddings.ndim != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"expected (2 n, D) embeddings, got shape {tuple(embeddings.shape)}")
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    return ((unit[0::2] - unit[1::2]) ** 2).sum(1).cpu().numpy()


# ------------------------------------------------------------------------------------------------------------- files


def image_to_array(image: Image.Image) -> np.ndarray:
    """RGB image -> (3, H, W) uint8 array."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))


def stack_images(images: Sequence[np.ndarray]) -> torch.Tensor:
    """(3, H, W) uint8 arrays -> one (B, 3, H, W) uint8 tensor.

    Images are stacked by numpy: torch's multi-threaded copies of many small tensors can be slower by orders of
    magnitude on a busy CPU. Also the ``collate_fn`` of the IJB loader.
    """
    return torch.from_numpy(np.stack(images))


def decode_image(data: bytes, index: int, source: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode one encoded pair-set image into a (3, size, size) uint8 array (resized bilinearly if needed).

    Args:
        data: JPEG / PNG bytes.
        index: the image's position in the file (for the error message).
        source: the file the image comes from.
        size: side the embedding expects.

    Returns:
        The image array.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
    except DECODE_ERRORS as err:
        raise VerificationDataError(f"{source}: image {index} does not decode as an image ({err})") from err
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return image_to_array(img)


def _validated(data: Any, source: str) -> PairSet:
    if not (isinstance(data, tuple) and len(data) == 2 and all(isinstance(part, list) for part in data)):
        raise VerificationDataError(
            f"{source}: expected a pickled 2-tuple (list of encoded images, list of is-same flags), "
            f"got {type(data).__name__}" + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
        )
    images, issame = data
    if len(images) != 2 * len(issame):
        raise VerificationDataError(
            f"{source}: {len(images)} images for {len(issame)} pairs; expected 2 images per pair "
            f"({2 * len(issame)})"
        )
    if not issame:
        raise VerificationDataError(f"{source}: the pair set holds no pairs")
    for index, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray)):
            raise VerificationDataError(
                f"{source}: image {index} is a {type(image).__name__}, expected encoded image bytes"
            )
    for index, flag in enumerate(issame):
        if not isinstance(flag, (bool, np.bool_)) and flag not in (0, 1):
            raise VerificationDataError(f"{source}: is-same flag {index} is {flag!r}, expected a boolean")
    return PairSet([bytes(image) for image in images], np.asarray(issame, dtype=bool), source)


class _PairSetUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: a pair set holds only tuples, lists, bytes and bools, and refusing
    globals keeps a crafted file from running code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}; a pair set holds only a tuple of lists of bytes and bools"
        )


def load_pair_set(path: str | os.PathLike) -> PairSet:
    """Read and check an insightface ``.bin`` pair set (images stay encoded; they are decoded batch by batch).

    Args:
        path: the ``.bin`` file.

    Returns:
        The ``PairSet``.

    Raises:
        VerificationDataError: not a pickle (or one referring to any class or function), not a 2-tuple of lists,
            image and pair counts that differ, or items of the wrong type. An image that does not decode is reported
            (with its index) when it is decoded.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            data = _PairSetUnpickler(f, encoding="bytes").load()
        except Exception as err:  # any malformed byte stream: unpickling raises many exception types
            raise VerificationDataError(f"{path}: not a pickled pair set ({type(err).__name__}: {err})") from err
    return _validated(data, str(path))


def write_pair_set(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """Write a pair set in insightface's ``.bin`` format (pickle protocol 4), atomically.

    Args:
        path: destination file.
        images: encoded images, 2 per pair (pair i = images 2i, 2i+1).
        issame: one flag per pair.

    Returns:
        The written path.
    """
    data = (list(images), [bool(flag) for flag in issame])
    _validated(data, str(path))
    return _atomic_write(path, lambda f: pickle.dump(data, f, protocol=PICKLE_PROTOCOL))


# --------------------------------------------------------------------------------------------------------- embedding


@torch.no_grad()
def embed_pair_set(
    pairs: PairSet, embed: EmbedFn, *, batch_size: int = 64, image_size: int = IMAGE_SIZE, progress: bool = True
) -> tuple[torch.Tensor, float]:
    """Embed every image of a pair set and its horizontal flip; return their sums and the mean raw norm.

    Args:
        pairs: the loaded pair set.
        embed: (B, 3, H, W) uint8 RGB -> (B, D) float embeddings.
        batch_size: images per ``embed`` call.
        image_size: side the images are given to ``embed`` at.
        progress: show a tqdm bar.

    Returns:
        ((2 n, D) float32 summed embeddings on CPU, mean L2 norm of the raw embeddings of images and flips).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = len(pairs.images)
    if total == 0:
        raise VerificationDataError(f"{pairs.source}: the pair set holds no images")
    summed: torch.Tensor | None = None
    norm_sum = 0.0
    for start in tqdm(range(0, total, batch_size), desc="pair set", unit="batch", disable=not progress):
        stop = min(start + batch_size, total)
        batch = stack_images([decode_image(pairs.images[i], i, pairs.source, image_size) for i in range(start, stop)])
        plain, flipped = embed(batch), embed(batch.flip(-1))
        if plain.ndim != 2 or plain.shape[0] != stop - start or flipped.shape != plain.shape:
            raise ValueError(
                f"embed must return (B, D) embeddings for a batch of {stop - start} images, got {tuple(plain.shape)}"
            )
        plain, flipped = plain.float().cpu(), flipped.float().cpu()
        if summed is None:
            summed = torch.empty(total, plain.shape[1])
        summed[start:stop] = plain + flipped
        norm_sum += float(plain.double().norm(dim=1).sum() + flipped.double().norm(dim=1).sum())
    return summed, norm_sum / (2 * total)


def evaluate_pair_set(
    pair_set: str | os.PathLike | PairSet,
    embed: EmbedFn,
    *,
    batch_size: int = 64,
    image_size: int = IMAGE_SIZE,
    folds: int = NUM_FOLDS,
    far_target: float = VAL_FAR_TARGET,
    progress: bool = True,
) -> PairSetResult:
    """Run the full pair-set protocol: load, embed with flips, distances, 10-fold accuracy and VAL@FAR.

    Args:
        pair_set: a ``.bin`` path or a loaded ``PairSet``.
        embed: (B, 3, H, W) uint8 RGB -> (B, D) float embeddings (unnormalised).
        batch_size: images per ``embed`` call.
        image_size: side the images are given to ``embed`` at.
        folds: number of contiguous folds.
        far_target: FAR of the VAL figure.
        progress: show a tqdm bar.

    Returns:
        The ``PairSetResult``.
    """
    pairs = pair_set if isinstance(pair_set, PairSet) else load_pair_set(pair_set)
    summed, xnorm = embed_pair_set(pairs, embed, batch_size=batch_size, image_size=image_size, progress=progress)
    result = evaluate_distances(pair_distances(summed), pairs.issame, folds=folds, far_target=far_target, xnorm=xnorm)
    logger.info(
        "%s: accuracy %.5f +- %.5f, VAL@FAR=%g %.5f +- %.5f (FAR %.5f), XNorm %.3f, %d pairs",
        pairs.source,
        result.accuracy,
        result.accuracy_std,
        far_target,
        result.val,
        result.val_std,
        result.far,
        xnorm,
        result.num_pairs,
    )
    return result
