"""Simulated templates for training a template aggregator (FaceCoresetNet, docs/coreset.md).

A template of one identity has N ~ U{1..max_size} frames. It is filled clip by clip: a seed image drawn uniformly
(with replacement) from the identity's images, repeated as a clip of min(max_clip, U{1..remaining}) frames, each frame
an independent random augmentation of the seed (RandAugment with torchvision's defaults, then a horizontal flip with
probability 1/2). A clip of one frame is a single image. Identities are drawn in proportion to their image count (each
item of the sampler is one image, whose identity forms the template), as the release does.

Two sources of frames:

- ``ImageTemplates``: decoded and augmented images, (N, 3, S, S) per template; the recognizer embeds them each step.
- ``CachedTemplates``: embeddings of ``A`` fixed augmentations per image, computed once by the frozen recognizer
  (``cache_embeddings``); a clip takes distinct slots of its seed image where it can. Much faster (no image is
  decoded or embedded during training) at the price of augmentation variety: A views per image instead of a fresh
  one per frame.

Every random draw of a template (its size, clips, augmentations and the Gumbel noise seed of the aggregator's picks)
comes from a generator seeded with (seed, epoch, item index): the sampler yields ``(epoch, index)`` pairs. A template
is therefore the same on any world size and after a resume, whatever the loader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Dataset, Sampler

from data_loader.sampler import ShuffleSampler
from data_loader.transforms import EvalTransform

DEFAULT_MAX_SIZE = 20
DEFAULT_MAX_CLIP = 3
_SEED_SPACE = 2**62


def draw_template(rng: np.random.Generator, images: Sequence[int], max_size: int, max_clip: int) -> list[list[int]]:
    """The clips of one template: lists of image ids (one seed image repeated), N ~ U{1..max_size} frames in all.

    Args:
        rng: the template's generator.
        images: the identity's image ids.
        max_size: largest template size.
        max_clip: longest clip.

    Returns:
        The clips; each lists its seed image once per frame.
    """
    remaining = int(rng.integers(1, max_size + 1))
    clips = []
    while remaining > 0:
        seed_image = int(images[int(rng.integers(len(images)))])
        length = min(max_clip, int(rng.integers(1, remaining + 1)))
        clips.append([seed_image] * length)
        remaining -= length
    return clips


class TemplateSampler(Sampler):
    """A ``ShuffleSampler`` over the images whose items carry the epoch: ``(epoch, index)``."""

    def __init__(self, num_items: int, *, seed: int = 0) -> None:
        self.inner = ShuffleSampler(num_items, seed=seed)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.inner.epoch
        return ((epoch, index) for index in self.inner)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation (and template draws) of ``epoch``."""
        self.inner.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Returns: the state needed to resume (epoch, seed)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.inner.load_state_dict(state)


class _Templates(Dataset):
    """Items ``(epoch, index)`` -> ``(frames, mask, label, seed)``: the template of image ``index``'s identity, its
    frames padded to ``max_size`` (``mask`` True for real frames, so the default collate batches templates of any
    size), and the seed of the aggregator's Gumbel noise."""

    def __init__(self, labels: np.ndarray, seed: int, max_size: int, max_clip: int) -> None:
        if max_size < 1 or max_clip < 1:
            raise ValueError(f"templates need max_size >= 1 and max_clip >= 1, got {max_size} and {max_clip}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seed, self.max_size, self.max_clip = int(seed), int(max_size), int(max_clip)
        order = np.argsort(self.labels, kind="stable")
        bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
        self.by_label = {int(self.labels[g[0]]): g for g in np.split(order, bounds)}

    def __len__(self) -> int:
        return len(self.labels)

    def _draw(self, item: tuple[int, int]) -> tuple[np.random.Generator, list[list[int]], int, int]:
        epoch, index = (int(v) for v in item)
        rng = np.random.default_rng([self.seed, epoch, index])
        label = int(self.labels[index])
        clips = draw_template(rng, self.by_label[label], self.max_size, self.max_clip)
        return rng, clips, label, int(rng.integers(_SEED_SPACE))

    def frames(self, rng: np.random.Generator, clips: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        rng, clips, label, noise_seed = self._draw(item)
        frames = self.frames(rng, clips)
        padded = frames.new_zeros(self.max_size, *frames.shape[1:])
        padded[: len(frames)] = frames
        mask = torch.arange(self.max_size) < len(frames)
        return padded, mask, label, noise_seed


class FrameAugment:
    """One random view of a seed image: RandAugment -> horizontal flip (p 1/2) -> the preset's evaluation transform.

    Args:
        image_size: output side S.
        preset: input preset (``data_loader.transforms``).
    """

    def __init__(self, image_size: int, preset: str) -> None:
        self.augment = T.Compose([T.RandAugment(), T.RandomHorizontalFlip(0.5)])
        self.finish = EvalTransform(image_size, preset)

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        """The view drawn from torch's generator seeded with ``seed`` (the caller's generator state is kept)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.finish(self.augment(img))


class ImageTemplates(_Templates):
    """Templates of augmented images, ``(N, 3, S, S)`` per item.

    Args:
        load: image id -> RGB PIL image.
        labels: identity of each image id.
        augment: the frame augmentation.
        seed: base seed of the template draws.
        max_size: largest template size.
        max_clip: longest clip.
    """

    def __init__(
        self,
        load: Callable[[int], Image.Image],
        labels: np.ndarray,
        augment: FrameAugment,
        *,
        seed: int = 0,
        max_size: int = DEFAULT_MAX_SIZE,
        max_clip: int = DEFAULT_MAX_CLIP,
    ) -> None:
        super().__init__(labels, seed, max_size, max_clip)
        self.load, self.augment = load, augment

    def frames(self, rng: np.random.Generator, clips: list[list[int]]) -> torch.Tensor:
        views = []
        for clip in clips:
            img = self.load(clip[0])
            views += [self.augment(img, int(rng.integers(_SEED_SPACE))) for _ in clip]
        return torch.stack(views)


class CachedTemplates(_Templates):
    """Templates of cached embeddings, ``(N, D)`` per item (a clip takes distinct augmentation slots while it can).

    Args:
        cache: (images, A, D) embeddings of A augmentations per image.
        labels: identity of each image id.
        seed: base seed of the template draws.
        max_size: largest template size.
        max_clip: longest clip.
    """

    def __init__(
        self,
        cache: torch.Tensor,
        labels: np.ndarray,
        *,
        seed: int = 0,
        max_size: int = DEFAULT_MAX_SIZE,
        max_clip: int = DEFAULT_MAX_CLIP,
    ) -> None:
        if cache.ndim != 3 or cache.shape[0] != len(labels):
            raise ValueError(f"expected a (images, A, D) cache for {len(labels)} images, got {tuple(cache.shape)}")
        super().__init__(labels, seed, max_size, max_clip)
        self.cache = cache

    def frames(self, rng: np.random.Generator, clips: list[list[int]]) -> torch.Tensor:
        slots = self.cache.shape[1]
        rows = []
        for clip in clips:
            picks = rng.choice(slots, len(clip), replace=len(clip) > slots)
            rows.append(self.cache[clip[0], torch.as_tensor(picks)])
        return torch.cat(rows)


def augmentation_seed(seed: int, image: int, slot: int) -> int:
    """Seed of the cached view ``slot`` of ``image`` (the same on every rank and every start)."""
    return int(np.random.default_rng([int(seed), 1 << 20, int(image), int(slot)]).integers(_SEED_SPACE))


class CacheViews(Dataset):
    """Item k = view ``k % A`` of image ``k // A``, the views ``CachedTemplates`` draws from.

    Args:
        load: image id -> RGB PIL image.
        num_images: image ids are 0..num_images-1.
        augment: the frame augmentation.
        slots: A, views per image.
        seed: base seed of the views.
    """

    def __init__(
        self, load: Callable[[int], Image.Image], num_images: int, augment: FrameAugment, slots: int, seed: int
    ):
        if slots < 1:
            raise ValueError(f"the embedding cache needs >= 1 view per image, got {slots}")
        self.load, self.num_images, self.augment, self.slots, self.seed = load, num_images, augment, slots, seed

    def __len__(self) -> int:
        return self.num_images * self.slots

    def __getitem__(self, k: int) -> torch.Tensor:
        image, slot = divmod(k, self.slots)
        return self.augment(self.load(image), augmentation_seed(self.seed, image, slot))
