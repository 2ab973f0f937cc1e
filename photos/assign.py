"""Faces to people: semi-supervised k-means with the gallery's faces pinned, K given or estimated, then names.

Clusters holding a gallery person take that person's name; the others are new people, named ``new_001``, ``new_002``
... from the largest (ties: the lower cluster index). A face is flagged low-confidence when its distance to its own
centre is at least ``ratio`` times its distance to the nearest other centre (the two are nearly as close).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from utils.k_estimation import estimate_k
from utils.kmeans import kmeans, semi_supervised_kmeans


@dataclass
class Assignment:
    """The people found.

    Attributes:
        person: each face's person (gallery name or ``new_NNN``).
        distance: each face's Euclidean distance to its centre (embeddings are L2-normalised).
        low_confidence: each face's flag.
        people: person names in report order: gallery people first (gallery order), then new people by size.
        known: the gallery people that had faces (the pinned classes).
        k: the number of clusters used.
        estimate: the K search (``KEstimate.to_dict()``) with ``--K auto``, else None.
    """

    person: list[str]
    distance: np.ndarray
    low_confidence: np.ndarray
    people: list[str]
    known: list[str]
    k: int
    estimate: dict | None


def parse_k(value: str) -> int | None:
    """``--K``: a positive integer, or ``auto`` (None)."""
    if value == "auto":
        return None
    try:
        k = int(value)
    except ValueError:
        raise ValueError(f"--K {value!r}: expected a positive integer or auto") from None
    if k < 1:
        raise ValueError(f"--K must be >= 1 or auto, got {k}")
    return k


def discover_people(
    x: torch.Tensor,
    gallery_person: Sequence[str | None],
    gallery_order: Sequence[str],
    k: int | None,
    *,
    max_k: int | None = None,
    search: str = "brent",
    n_init: int = 10,
    seed: int = 0,
    ratio: float = 0.9,
    progress: bool = True,
) -> Assignment:
    """Cluster the faces and name the clusters.

    Args:
        x: (n, D) L2-normalised embeddings.
        gallery_person: each face's gallery person, None for faces of the photos.
        gallery_order: the gallery people in report order.
        k: number of clusters, or None to estimate it (needs faces of at least two gallery people).
        max_k: largest K searched (default: the number of gallery people plus the number of photo faces).
        search: the K search (``utils.k_estimation``).
        n_init: k-means restarts.
        seed: base seed.
        ratio: low-confidence distance ratio (see the module docstring).
        progress: tqdm bars.

    Raises:
        ValueError: K out of range, or ``auto`` without two gallery people.
    """
    n = len(gallery_person)
    known = [p for p in gallery_order if p in set(gallery_person)]
    class_of = {p: i for i, p in enumerate(known)}
    labelled = torch.tensor([p is not None for p in gallery_person])
    labels = torch.tensor([class_of.get(p, -1) if p is not None else -1 for p in gallery_person])
    m, unlabelled = len(known), int((~labelled).sum())
    estimate = None
    if k is None:
        if m < 2:
            raise ValueError(
                f"--K auto estimates K from the gallery and needs faces of at least 2 gallery people, found {m}; "
                "give --K"
            )
        hi = min(n, max_k or m + unlabelled)
        if hi < m:
            raise ValueError(f"--max-k {max_k} is below the {m} gallery people")
        found = estimate_k(x, labels.clamp(min=0), labelled, hi, m, search=search, seed=seed, progress=progress)
        k, estimate = found.k, found.to_dict()
    if not m <= k <= n:
        raise ValueError(f"--K {k}: expected between the {m} gallery people and the {n} faces")
    if m:
        result = semi_supervised_kmeans(x, k, labels.clamp(min=0), labelled, n_init, seed=seed, progress=progress)
        names = {j: known[int(c)] for j, c in enumerate(result.labelled_classes)}
    else:
        result = kmeans(x, k, n_init, seed=seed, progress=progress)
        names = {}
    cluster = result.labels
    sizes = torch.bincount(cluster, minlength=k)
    new = sorted((j for j in range(k) if j not in names and sizes[j] > 0), key=lambda j: (-int(sizes[j]), j))
    names.update({j: f"new_{i + 1:03d}" for i, j in enumerate(new)})
    dist = torch.cdist(x.float(), result.centres.float())
    own = dist[torch.arange(n), cluster]
    if k > 1:
        others = dist.clone()
        others[torch.arange(n), cluster] = float("inf")
        low = own >= ratio * others.min(1).values
    else:
        low = torch.zeros(n, dtype=torch.bool)
    return Assignment(
        person=[names[int(c)] for c in cluster],
        distance=own.numpy(),
        low_confidence=low.numpy(),
        people=list(known) + [names[j] for j in new],
        known=known,
        k=k,
        estimate=estimate,
    )
