"""Landmark front end of Part fViT / LAFS: a landmark CNN and the landmark-centred patch mosaic.

See docs/method.md ("Landmark front end") and docs/pretraining.md (LAFS).

A MobileNetV3-Large feature stack regresses ``L`` landmarks from a face crop; a ``patch x patch`` tile is sampled
bilinearly around every landmark and the tiles are laid out as a ``G x G`` grid (``L = G^2``), so each ViT patch of
the resulting mosaic is centred on one landmark. At 112 px with 8 px patches: 196 landmarks, a 112 x 112 mosaic.

The landmark CNN's state dict uses the reference key format as is: the feature stack is ``stn`` and the regression
layer ``output`` (``stn.0.0.weight``, ..., ``output.weight``, ``output.bias``), so reference Part fViT checkpoints load
after stripping ``module.`` and keeping the keys that contain ``stn`` or ``output``.

References:
    - Part fViT: Sun & Tzimiropoulos, "Part-based Face Recognition with Vision Transformers", BMVC 2022.
    - LAFS: Sun et al., "LAFS: Landmark-based Facial Self-supervised Learning for Face Recognition", CVPR 2024
      (landmark regularisation schedule of the fine-tuning stage).
    - MobileNetV3: Howard et al., ICCV 2019; torchvision ``mobilenet_v3_large`` (used, not copied).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import mobilenet_v3_large

from utils.checkpoint import CheckpointError, atomic_save, load_checkpoint

logger = logging.getLogger(__name__)

REFERENCE_LANDMARK_PATH = "pretrain_output/part_vit_B_34epoch.pth"
LANDMARK_EXPORT = "landmark_cnn.pth"  # the landmark CNN a run writes next to its checkpoints
LANDMARK_ORIENTATIONS = ("natural", "reference")
# torchvision mobilenet_v3_large().features[:16]: the stem and the 15 bottlenecks, ending in 160 channels.
STN_STAGES = 16
STN_CHANNELS = 160
RESCALE_EPS = 1e-6
# Key fragments that mark the landmark CNN in a reference checkpoint.
_LANDMARK_KEY_PARTS = ("stn", "output")
_STATE_DICT_KEYS = ("state_dict", "model")
# LAFS fine-tuning weight of the landmark regularisation: (last 0-based epoch, weight); 0 after the last entry.
LANDMARK_REG_SCHEDULE = ((7, 1000.0), (13, 100.0), (20, 1.0), (27, 0.11))


def rescale(theta: torch.Tensor, size: int, eps: float = RESCALE_EPS) -> torch.Tensor:
    """Per-image min-max rescale of raw landmark outputs to pixel coordinates.

    ``theta' = (theta - min theta) / (max theta - min theta + eps) * (size - 1)``, min and max over all ``2L``
    values of an image, read as ``L`` interleaved ``(x, y)`` pairs. Computed in float32 (float64 stays float64).

    Args:
        theta: (B, 2L) raw regression outputs.
        size: image side S in pixels; coordinates land in [0, S - 1].
        eps: added to the range so a constant output gives zeros instead of a division by zero.

    Returns:
        (B, L, 2) pixel coordinates (x, y).
    """
    if theta.dim() != 2 or theta.shape[1] % 2:
        raise ValueError(f"theta must be (B, 2L) with an even number of values, got shape {tuple(theta.shape)}")
    if size < 2:
        raise ValueError(f"image size must be at least 2 pixels, got {size}")
    theta = theta.to(torch.promote_types(theta.dtype, torch.float32))
    low = theta.amin(dim=1, keepdim=True)
    high = theta.amax(dim=1, keepdim=True)
    coords = (theta - low) / (high - low + eps) * (size - 1)
    return coords.view(theta.shape[0], -1, 2)


def landmark_mosaic(
    images: torch.Tensor,
    coords: torch.Tensor,
    patch: int,
    orientation: str = "natural",
    *,
    grid: int | None = None,
) -> torch.Tensor:
    """Sample a ``patch x patch`` tile around every landmark and lay the tiles out as a ``G x G`` mosaic.

    Tile k samples the image bilinearly (``F.grid_sample``, zero padding, ``align_corners=False``) at the points
    ``p = (x_k + o_x, y_k + o_y)`` with pixel offsets ``o`` in ``-patch/2, ..., patch/2 - 1``, normalised as
    ``u = p / (S/2) - 1`` (``p/56 - 1`` at S = 112). grid_sample reads ``u`` as the pixel index
    ``((u + 1) S - 1) / 2 = p - 0.5`` (pixel centres at integer indices), so samples land at landmark + offset - 0.5
    px; a landmark at ``c + 0.5`` therefore samples pixels ``c - patch/2 .. c + patch/2 - 1`` exactly. Tile k is
    placed at row ``k // G``, column ``k % G``. ``"natural"`` tiles have rows following the y offset and columns the
    x offset (an upright crop); ``"reference"`` tiles are transposed (rows follow x), as in the reference code.

    All landmarks go through one ``grid_sample`` call; the result is differentiable with respect to ``images`` and
    ``coords`` and has the dtype of ``images``.

    Args:
        images: (B, C, S, S) images.
        coords: (B, L, 2) pixel coordinates (x, y) of the landmarks.
        patch: tile side in pixels.
        orientation: ``"natural"`` or ``"reference"``.
        grid: tiles per mosaic side G; default ``S // patch`` (S must then be a multiple of ``patch``). A smaller
            grid builds a ``G * patch`` mosaic from a subset of landmarks (LAFS local views: 36 landmarks, G = 6).

    Returns:
        (B, C, G * patch, G * patch) mosaic; (B, C, S, S) with the default grid.
    """
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square (B, C, S, S), got shape {tuple(images.shape)}")
    batch, _, size, _ = images.shape
    if coords.dim() != 3 or coords.shape[0] != batch or coords.shape[-1] != 2:
        raise ValueError(f"coords must be (B={batch}, L, 2) landmark (x, y) pairs, got shape {tuple(coords.shape)}")
    if orientation not in LANDMARK_ORIENTATIONS:
        raise ValueError(f"unknown landmark tile orientation {orientation!r}; expected one of {LANDMARK_ORIENTATIONS}")
    if patch < 1:
        raise ValueError(f"landmark patch size must be at least 1 pixel, got {patch}")
    if grid is None:
        if size % patch:
            raise ValueError(f"image size {size} is not a multiple of the landmark patch size {patch}")
        grid = size // patch
    num = coords.shape[1]
    if num != grid * grid:
        raise ValueError(
            f"{num} landmarks do not fill a {grid} x {grid} mosaic of {patch} px tiles from {size} px images: "
            f"expected {grid * grid} landmarks"
        )
    work = torch.promote_types(coords.dtype, torch.float32)
    offsets = torch.arange(patch, device=coords.device, dtype=work) - patch / 2
    rows = offsets.view(1, 1, patch, 1, 1)  # offset along a tile's rows
    cols = offsets.view(1, 1, 1, 1, patch)  # offset along a tile's columns
    x = coords[..., 0].to(work).reshape(batch, grid, 1, grid, 1)
    y = coords[..., 1].to(work).reshape(batch, grid, 1, grid, 1)
    if orientation == "natural":
        px, py = x + cols, y + rows
    else:
        px, py = x + rows, y + cols
    shape = (batch, grid, patch, grid, patch)  # (B, tile row, row in tile, tile column, column in tile)
    points = torch.stack((px.expand(shape), py.expand(shape)), dim=-1).reshape(batch, grid * patch, grid * patch, 2)
    sample_grid = (points / (size / 2) - 1).to(images.dtype)
    return F.grid_sample(images, sample_grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class LandmarkCNN(nn.Module):
    """Landmark regressor: MobileNetV3-Large features, spatial mean, dropout, Linear(160 -> 2L), min-max rescale.

    Randomly initialised (torchvision ``weights=None``; nothing is downloaded). At 112 px the feature stack gives
    (B, 160, 4, 4).

    Args:
        num_landmarks: L, the number of landmarks (196 = (112 / 8)^2 by default).
        dropout: dropout rate before the regression layer.
    """

    def __init__(self, num_landmarks: int = 196, *, dropout: float = 0.5) -> None:
        super().__init__()
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be positive, got {num_landmarks}")
        self.num_landmarks = num_landmarks
        self.stn = mobilenet_v3_large(weights=None).features[:STN_STAGES]
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(STN_CHANNELS, 2 * num_landmarks)

    def forward_theta(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, 2L) raw regression outputs (before the rescale)."""
        return self.output(self.dropout(self.stn(images).mean(dim=(2, 3))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, L, 2) float32 pixel coordinates (x, y) in [0, S - 1]."""
        return rescale(self.forward_theta(images), images.shape[-1])


class LandmarkFrontEnd(nn.Module):
    """Landmark CNN plus mosaic settings: images in, landmark mosaic out.

    When ``frozen``, the CNN's parameters do not require gradients, it stays in eval mode whatever ``train()`` is
    called with (dropout off, BatchNorm running statistics) and it runs under ``no_grad``; the mosaic is still
    differentiable with respect to the images.

    Args:
        img_size: image side S; the CNN predicts ``(S / patch)^2`` landmarks.
        patch: tile side in pixels.
        orientation: tile orientation, ``"natural"`` or ``"reference"`` (see :func:`landmark_mosaic`).
        frozen: freeze the landmark CNN.
        cnn: an existing landmark CNN (a new random one by default); its landmark count must fit the mosaic.
    """

    def __init__(
        self,
        img_size: int = 112,
        patch: int = 8,
        *,
        orientation: str = "natural",
        frozen: bool = True,
        cnn: LandmarkCNN | None = None,
    ) -> None:
        super().__init__()
        if patch < 1 or img_size % patch:
            raise ValueError(f"image size {img_size} is not a multiple of the landmark patch size {patch}")
        if orientation not in LANDMARK_ORIENTATIONS:
            raise ValueError(
                f"unknown landmark tile orientation {orientation!r}; expected one of {LANDMARK_ORIENTATIONS}"
            )
        num = (img_size // patch) ** 2
        cnn = LandmarkCNN(num) if cnn is None else cnn
        if cnn.num_landmarks != num:
            raise ValueError(
                f"the landmark CNN predicts {cnn.num_landmarks} landmarks but {img_size} px images with {patch} px "
                f"tiles need {num}"
            )
        self.img_size = img_size
        self.patch = patch
        self.orientation = orientation
        self.frozen = frozen
        self.cnn = cnn
        if frozen:
            self.cnn.requires_grad_(False)
            self.cnn.eval()

    def train(self, mode: bool = True) -> LandmarkFrontEnd:
        """Set the training mode; a frozen CNN stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.cnn.eval()
        return self

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, L, 2) float32 landmark pixel coordinates (x, y)."""
        if self.frozen:
            with torch.no_grad():
                return self.cnn(images)
        return self.cnn(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, 3, S, S) landmark mosaic."""
        return landmark_mosaic(images, self.landmarks(images), self.patch, self.orientation)

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch={self.patch}, orientation={self.orientation!r}, frozen={self.frozen}"


def check_local_landmarks(count: int, num_landmarks: int, flag: str = "--local-landmarks") -> int:
    """The side G of the square mosaic of a local view that keeps ``count`` of ``num_landmarks`` landmarks.

    Raises:
        ValueError: ``count`` is not a square number in [1, num_landmarks] (the message names ``flag``).
    """
    grid = math.isqrt(max(count, 0))
    if count < 1 or grid * grid != count or count > num_landmarks:
        raise ValueError(
            f"{flag} {count} does not fit a square mosaic of at most {num_landmarks} landmarks: expected a square "
            f"number G*G <= {num_landmarks} (LAFS: 36, a 6 x 6 grid)"
        )
    return grid


class LAFSViewFrontEnd(nn.Module):
    """LAFS's input of one DINO view: the frozen landmark CNN on the clean crop, a mosaic from the augmented copy.

    In training mode every landmark is jittered by Gaussian noise (``jitter_std`` px, LAFS: 5) and a local view keeps
    ``local_landmarks`` random landmarks per image (LAFS: 36, kept in index order, tiled as a 6 x 6 mosaic of
    ``patch`` px tiles: 48 x 48 px at 8 px patches); a global view keeps all ``(S / patch)^2``. In eval mode there is
    no jitter and a local view keeps the first ``local_landmarks`` landmarks (deterministic). Follows the
    ``model.dino.FrontEnd`` protocol.

    Args:
        landmarks: a frozen :class:`LandmarkFrontEnd` (CNN, tile size, orientation).
        jitter_std: landmark jitter in pixels (0 for none).
        local_landmarks: landmarks of a local view; a square number at most the CNN's landmark count.
    """

    def __init__(self, landmarks: LandmarkFrontEnd, *, jitter_std: float = 5.0, local_landmarks: int = 36) -> None:
        super().__init__()
        if not landmarks.frozen:
            raise ValueError("LAFS needs a frozen landmark CNN (LandmarkFrontEnd(frozen=True))")
        if jitter_std < 0:
            raise ValueError(f"--landmark-jitter must be >= 0 pixels, got {jitter_std}")
        self.local_grid = check_local_landmarks(local_landmarks, landmarks.cnn.num_landmarks)
        self.landmarks = landmarks
        self.jitter_std = float(jitter_std)
        self.local_landmarks = int(local_landmarks)

    def view_landmarks(self, image: torch.Tensor, clean: torch.Tensor | None, *, global_view: bool) -> torch.Tensor:
        """The (B, L', 2) landmarks a view's mosaic is sampled at (L' = all, or ``local_landmarks`` of a local view).

        Predicted on ``clean`` when given (else on ``image``), then jittered and, for a local view, subsampled.
        """
        coords = self.landmarks.landmarks(image if clean is None else clean)
        if self.training and self.jitter_std > 0:
            coords = coords + torch.randn_like(coords) * self.jitter_std
        if global_view:
            return coords
        batch, total = coords.shape[:2]
        if self.training:
            keep = torch.rand(batch, total, device=coords.device).argsort(dim=1)[:, : self.local_landmarks]
            keep = keep.sort(dim=1).values
        else:
            keep = torch.arange(self.local_landmarks, device=coords.device).expand(batch, -1)
        return coords.gather(1, keep.unsqueeze(-1).expand(-1, -1, 2))

    def forward(self, image: torch.Tensor, clean: torch.Tensor | None, *, global_view: bool) -> torch.Tensor:
        """(B, 3, s, s) view (and its clean crop, or None) -> (B, 3, G * patch, G * patch) landmark mosaic."""
        coords = self.view_landmarks(image, clean, global_view=global_view)
        grid = None if global_view else self.local_grid
        return landmark_mosaic(image, coords, self.landmarks.patch, self.landmarks.orientation, grid=grid)

    def extra_repr(self) -> str:
        return f"jitter_std={self.jitter_std}, local_landmarks={self.local_landmarks}"


def _landmark_cnn(model: LandmarkCNN | LandmarkFrontEnd) -> LandmarkCNN:
    return model.cnn if isinstance(model, LandmarkFrontEnd) else model


def load_landmark_weights(
    path: str | os.PathLike, model: LandmarkCNN | LandmarkFrontEnd, *, weights_only: bool = True
) -> None:
    """Load landmark CNN weights from a reference Part fViT checkpoint or a file of :func:`save_landmark_weights`.

    The file holds a plain state dict or a checkpoint dict with one under ``state_dict`` or ``model``. A leading
    ``module.`` is stripped from every key, only keys containing ``stn`` or ``output`` are kept (the rest, e.g. the
    ViT, is ignored), and those must match the CNN exactly: no missing or extra keys, equal shapes.

    Args:
        path: checkpoint file (the reference default is ``REFERENCE_LANDMARK_PATH``).
        model: the landmark CNN, or a front end holding it.
        weights_only: restrict unpickling to tensors and plain types (False only for trusted files).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is unreadable, holds no landmark CNN keys, or they do not fit the model (the message
            names the file, the keys and the shapes).
    """
    cnn = _landmark_cnn(model)
    obj = load_checkpoint(path, weights_only=weights_only)
    for key in _STATE_DICT_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {
        k.removeprefix("module."): v
        for k, v in obj.items()
        if isinstance(k, str) and any(part in k for part in _LANDMARK_KEY_PARTS)
    }
    if not state:
        sample = ", ".join(map(str, list(obj)[:5]))
        raise CheckpointError(
            f"{path} holds no landmark CNN weights: expected keys containing stn./output. (found {len(obj)} other "
            f"keys, e.g. {sample})"
        )
    expected = cnn.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    if missing:
        problems.append(f"missing {len(missing)} keys: {', '.join(missing)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        problems.append(f"{len(unexpected)} keys the landmark CNN lacks: {', '.join(unexpected)}")
    for k, v in state.items():
        if k not in expected:
            continue
        if not isinstance(v, torch.Tensor):
            problems.append(f"{k} is a {type(v).__name__}, not a tensor")
        elif v.shape != expected[k].shape:
            problems.append(f"{k} has shape {tuple(v.shape)} in the file but {tuple(expected[k].shape)} in the model")
    if problems:
        raise CheckpointError(f"landmark CNN weights in {path} do not fit the model:\n  " + "\n  ".join(problems))
    cnn.load_state_dict(state, strict=True)
    logger.info("loaded %d landmark CNN tensors from %s", len(state), path)


def save_landmark_weights(model: LandmarkCNN | LandmarkFrontEnd, path: str | os.PathLike) -> Path:
    """Atomically write the landmark CNN's state dict in the reference key format (``stn.*``, ``output.*``).

    Args:
        model: the landmark CNN, or a front end holding it.
        path: destination file; its folder is created if needed.

    Returns:
        The written path.
    """
    state = {k: v.detach().cpu() for k, v in _landmark_cnn(model).state_dict().items()}
    return atomic_save(state, path)


def landmark_regularisation_weight(epoch: int) -> float:
    """LAFS fine-tuning weight of the landmark regularisation at a 0-based epoch index.

    The epoch numbers are read as the index the training loop uses (first epoch = 0): 1000 for epochs 0-7, 100 for
    8-13, 1 for 14-20, 0.11 for 21-27 and 0 from epoch 28 on.

    Args:
        epoch: 0-based epoch index.

    Returns:
        The weight of :func:`landmark_regularisation` in the loss.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be a 0-based index, got {epoch}")
    for last_epoch, weight in LANDMARK_REG_SCHEDULE:
        if epoch <= last_epoch:
            return weight
    return 0.0


def landmark_regularisation(coords: torch.Tensor, reference_coords: torch.Tensor, size: int) -> torch.Tensor:
    """MSE between trained and reference (frozen-copy) landmarks, both divided by ``size - 1`` (111 at 112 px).

    Args:
        coords: (B, L, 2) landmarks of the landmark CNN being trained.
        reference_coords: (B, L, 2) landmarks of its frozen copy; treated as a constant (detached).
        size: image side S.

    Returns:
        Scalar float32 (float64 for float64 inputs) mean squared error over all coordinates.
    """
    if coords.shape != reference_coords.shape:
        raise ValueError(
            f"landmark shapes differ: trained {tuple(coords.shape)} vs reference {tuple(reference_coords.shape)}"
        )
    if size < 2:
        raise ValueError(f"image size must be at least 2 pixels, got {size}")
    work = torch.promote_types(coords.dtype, torch.float32)
    scale = size - 1
    return F.mse_loss(coords.to(work) / scale, reference_coords.detach().to(work) / scale)
