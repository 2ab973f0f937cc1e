"""MTCNN face detector (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks", IEEE SPL 2016): three small networks in a cascade, batched over images on one device.

1. P-Net, fully convolutional, slides a 12 x 12 window with stride 2 over an image pyramid (scale factor 0.709, the
   largest scale maps ``min_face`` pixels to 12); windows scoring above the first threshold become candidates, are
   thinned by non-maximum suppression per scale (IoU 0.5) and over all scales (IoU 0.7), moved by the box regression
   and made square.
2. R-Net re-scores 24 x 24 crops of the candidates (second threshold), NMS (IoU 0.7), regression, square.
3. O-Net re-scores 48 x 48 crops (third threshold) and gives five landmarks (eye centres, nose tip, mouth corners,
   as seen in the image), then regression and a last NMS (IoU 0.7).

The weights are the networks published with the paper, as converted to PyTorch state dicts in the ``facenet-pytorch``
package (MIT licence), read from that package's data folder without importing its code. They take RGB pixels mapped
by ``(x - 127.5) / 128``; their first fully connected layers read the feature maps channel-last and transposed
(width, height, channel: the networks were trained on column-major images), and their landmark output lists the five
x fractions, then the five y fractions, of the crop. These facts were checked on scikit-image's ``astronaut`` photo:
any other flattening order scores half of random crops as faces.

Coordinates: boxes are ``[x1, y1, x2, y2]`` pixel edges (a box covering pixels 0..11 is [0, 12]); landmarks use
pixel centres at integers, the convention of ``utils.face_align``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, roi_align

WEIGHTS_PACKAGE = "facenet_pytorch"
PYRAMID_FACTOR = 0.709
PNET_CELL, PNET_STRIDE = 12, 2
DEFAULT_THRESHOLDS = (0.6, 0.7, 0.7)


class PNet(nn.Module):
    """Proposal network: (B, 3, H, W) -> face probability (B, H', W') and box regression (B, 4, H', W')."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x).softmax(1)[:, 1], self.conv4_2(x)


def _column_major(x: torch.Tensor) -> torch.Tensor:
    """Flatten (B, C, H, W) feature maps in the (W, H, C) order the fully connected weights were trained on."""
    return x.permute(0, 3, 2, 1).flatten(1)


class RNet(nn.Module):
    """Refinement network: (B, 3, 24, 24) -> face probability (B,) and box regression (B, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_column_major(self.prelu3(self.conv3(x)))))
        return self.dense5_1(x).softmax(1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output network: (B, 3, 48, 48) -> face probability (B,), box regression (B, 4), landmarks (B, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_column_major(self.prelu4(self.conv4(x)))))
        return self.dense6_1(x).softmax(1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def weights_dir() -> Path:
    """The folder of ``pnet.pt``, ``rnet.pt`` and ``onet.pt`` in the installed ``facenet-pytorch`` package.

    Raises:
        ValueError: the package is not installed (say how to install it without its torch pin).
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if all((Path(folder) / "data" / f"{n}.pt").is_file() for n in ("pnet", "rnet", "onet")):
            return Path(folder) / "data"
    raise ValueError(
        "the MTCNN detector reads its weights from the facenet-pytorch package, which is not installed: run "
        "`pip install --no-deps facenet-pytorch==2.6.0` (or bash shell/setup.sh)"
    )


def load_networks(folder: Path | None = None) -> tuple[PNet, RNet, ONet]:
    """The three networks with their published weights, in eval mode on the CPU."""
    folder = folder or weights_dir()
    nets = PNet(), RNet(), ONet()
    for net, name in zip(nets, ("pnet", "rnet", "onet")):
        net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
        net.eval().requires_grad_(False)
    return nets


def pyramid_scales(min_side: int, min_face: float, factor: float = PYRAMID_FACTOR) -> list[float]:
    """Scales at which a ``min_face`` face becomes 12 pixels, then ever smaller by ``factor`` while the image's
    shorter side stays >= 12 pixels."""
    scale, scales = PNET_CELL / min_face, []
    while min_side * scale >= PNET_CELL:
        scales.append(scale)
        scale *= factor
    return scales


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes grown to squares of their longer side about the same centre."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True) / 2
    return torch.cat([centre - half, centre + half], 1)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Move each box edge by its offset times the box's width (x) or height (y)."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * size


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() - 127.5) / 128.0


class MTCNN(nn.Module):
    """The cascade over a batch of images; see the module docstring.

    Args:
        min_face: smallest face side searched for, in pixels (sets the pyramid's first scale).
        thresholds: P-Net, R-Net and O-Net score thresholds.
        nms: IoU thresholds of P-Net per scale, P-Net over scales, R-Net and O-Net.
        weights: folder of the weight files (default: the facenet-pytorch package's).
    """

    def __init__(
        self,
        min_face: float = 20.0,
        thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS,
        nms: tuple[float, float, float, float] = (0.5, 0.7, 0.7, 0.7),
        weights: Path | None = None,
    ) -> None:
        super().__init__()
        if min_face < PNET_CELL:
            raise ValueError(f"--min-face {min_face}: MTCNN finds faces of at least {PNET_CELL} pixels")
        self.min_face, self.thresholds, self.nms = float(min_face), thresholds, nms
        self.pnet, self.rnet, self.onet = load_networks(weights)

    @property
    def device(self) -> torch.device:
        return self.pnet.conv1.weight.device

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detect the faces of every image.

        Args:
            images: (3, H, W) uint8 RGB tensors, any sizes.

        Returns:
            Per image: ``boxes`` (F, 4) float32 pixel edges, ``scores`` (F,), ``landmarks`` (F, 5, 2), on the CPU,
            highest score first.
        """
        device = self.device
        batch, sizes = self._padded(images, device)
        boxes, owner = self._proposals(batch, sizes)
        boxes, owner, _ = self._refine(batch, boxes, owner)
        boxes, owner, scores, points = self._output(batch, boxes, owner)
        return [
            {
                "boxes": boxes[owner == i].cpu(),
                "scores": scores[owner == i].cpu(),
                "landmarks": points[owner == i].cpu(),
            }
            for i in range(len(images))
        ]

    @staticmethod
    def _padded(images: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The images normalised in one zero-padded (B, 3, Hmax, Wmax) batch and their (B, 2) heights and widths."""
        sizes = torch.tensor([img.shape[-2:] for img in images])
        batch = torch.zeros(len(images), 3, *sizes.amax(0).tolist(), device=device)
        for i, img in enumerate(images):
            batch[i, :, : img.shape[-2], : img.shape[-1]] = _normalise(img.to(device))
        return batch, sizes.to(device)

    def _proposals(self, batch: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the pyramid: candidate boxes (N, 4) in image pixels and the index of their image (N,).

        At each scale every image is resized alone and the results are zero padded into one batch, so an image's
        candidates do not depend on the other images of the batch (P-Net's windows inside an image never see the
        padding). The pyramid is that of the batch's largest image; on smaller ones its last scales find nothing.
        """
        all_boxes, all_owner, all_scores = [], [], []
        for scale in pyramid_scales(int(sizes.amin(1).max()), self.min_face):
            scaled_sizes = [(max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))) for h, w in sizes.tolist()]
            scaled = batch.new_zeros(len(batch), 3, *map(max, zip(*scaled_sizes)))
            for i, (h, w) in enumerate(scaled_sizes):
                height, width = sizes[i].tolist()
                image = batch[i : i + 1, :, :height, :width]
                scaled[i, :, :h, :w] = F.interpolate(image, size=(h, w), mode="bilinear", antialias=True)[0]
            prob, reg = self.pnet(scaled)
            owner, row, col = torch.nonzero(prob > self.thresholds[0], as_tuple=True)
            start = torch.stack([col, row], 1).float() * PNET_STRIDE
            window = torch.cat([start, start + PNET_CELL], 1) / scale
            inside = (window[:, 2] <= sizes[owner, 1]) & (window[:, 3] <= sizes[owner, 0])
            owner, window = owner[inside], window[inside]
            scores = prob[owner, row[inside], col[inside]]
            offsets = reg[owner, :, row[inside], col[inside]]
            keep = batched_nms(window, scores, owner, self.nms[0])
            all_boxes.append(_regress(window[keep], offsets[keep]))
            all_owner.append(owner[keep])
            all_scores.append(scores[keep])
        if not all_boxes:  # every image is smaller than the smallest face searched for
            return batch.new_zeros(0, 4), torch.zeros(0, dtype=torch.long, device=batch.device)
        boxes, owner, scores = torch.cat(all_boxes), torch.cat(all_owner), torch.cat(all_scores)
        keep = batched_nms(boxes, scores, owner, self.nms[1])
        return _square(boxes[keep]), owner[keep]

    @staticmethod
    def _crops(batch: torch.Tensor, boxes: torch.Tensor, owner: torch.Tensor, side: int) -> torch.Tensor:
        """``side`` x ``side`` crops of the boxes (area-averaged bilinear samples, ``roi_align``)."""
        rois = torch.cat([owner[:, None].float(), boxes], 1)
        return roi_align(batch, rois, (side, side), spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    def _refine(
        self, batch: torch.Tensor, boxes: torch.Tensor, owner: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """R-Net: the candidates that pass, regressed and squared, with their scores."""
        if not len(boxes):
            return boxes, owner, boxes.new_zeros(0)
        prob, reg = self.rnet(self._crops(batch, boxes, owner, 24))
        passed = prob > self.thresholds[1]
        boxes, owner, prob, reg = boxes[passed], owner[passed], prob[passed], reg[passed]
        keep = batched_nms(boxes, prob, owner, self.nms[2])
        return _square(_regress(boxes[keep], reg[keep])), owner[keep], prob[keep]

    def _output(
        self, batch: torch.Tensor, boxes: torch.Tensor, owner: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """O-Net: final boxes, their images, scores and (N, 5, 2) landmarks, highest score first."""
        if not len(boxes):
            return boxes, owner, boxes.new_zeros(0), boxes.new_zeros(0, 5, 2)
        prob, reg, marks = self.onet(self._crops(batch, boxes, owner, 48))
        passed = prob > self.thresholds[2]
        boxes, owner, prob, reg, marks = boxes[passed], owner[passed], prob[passed], reg[passed], marks[passed]
        size = boxes[:, 2:] - boxes[:, :2]
        points = boxes[:, None, :2] + torch.stack([marks[:, :5], marks[:, 5:]], 2) * size[:, None] - 0.5
        boxes = _regress(boxes, reg)
        keep = batched_nms(boxes, prob, owner, self.nms[3])
        return boxes[keep], owner[keep], prob[keep], points[keep]
