"""IResNet face-recognition backbones (iresnet18/34/50/100) in the insightface arcface_torch layout.

The module names match arcface_torch's ``backbones/iresnet.py`` (``conv1``, ``bn1``, ``prelu``, ``layer1``..``layer4``,
``bn2``, ``dropout``, ``fc``, ``features``; inside a block ``bn1``, ``conv1``, ``bn2``, ``prelu``, ``conv2``, ``bn3``,
``downsample.0``/``downsample.1``), so an arcface_torch ``backbone.pth`` (a bare state dict) loads as it is:
:func:`load_arcface_torch_backbone` builds the model the file describes, :func:`load_arcface_torch_weights` fills an
existing one; both refuse a file of another architecture with one error naming the file and the mismatches.

References:
    - Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019 (the IResNet
      "improved residual" unit: BN-Conv-BN-PReLU-Conv-BN, the BN-Dropout-FC-BN embedding head).
    - insightface ``recognition/arcface_torch/backbones/iresnet.py`` (layer layout, stride on the second conv,
      initialisation, frozen scale of the embedding BatchNorm): facts only, the code here is our own.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.models import checkpoint, register_model

from utils.checkpoint import CheckpointError, load_checkpoint

# Blocks per stage of each architecture (arcface_torch's iresnet18/34/50/100).
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
IRESNET_ARCHS = tuple(IRESNET_LAYERS)
STAGE_WIDTHS = (64, 128, 256, 512)
# Four stride-2 stages: the input side must be a multiple of 16 for the final map to be img_size / 16.
TOTAL_STRIDE = 16
_BN_EPS = 1e-5
_CONV_INIT_STD = 0.1


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut.

    As in arcface_torch the stride sits on the second convolution and there is no activation after the sum.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the second convolution (2 in the first block of each stage, else 1).
        downsample: shortcut projection (1x1 conv with ``stride`` + BN) where the shape changes, else None (identity).
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit.

        Args:
            x: (B, inplanes, H, W).

        Returns:
            (B, planes, H / stride, W / stride).
        """
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


@contextlib.contextmanager
def _frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Keep the BatchNorm running statistics of ``module`` unchanged while its forward is recomputed.

    Gradient checkpointing runs a block's forward a second time during backward; in training mode that would update
    the running mean/variance (and ``num_batches_tracked``) twice per step. A momentum of 0 keeps the running
    statistics as they are while the batch statistics, which the gradients depend on, are still used.
    """
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def _checkpoint_contexts(
    module: nn.Module,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: plain first forward, frozen BN statistics in the recompute."""
    return contextlib.nullcontext(), _frozen_running_stats(module)


class IResNet(nn.Module):
    """IResNet backbone mapping aligned face crops to an embedding.

    Stem conv3x3(3 -> 64) -> BN -> PReLU; four stages of ``IBasicBlock`` with widths 64/128/256/512, the first block
    of each with stride 2 and a 1x1-conv + BN shortcut; then BN(512) -> flatten -> Dropout -> Linear(512·s·s ->
    embedding_size) -> BatchNorm1d(embedding_size), with s = img_size / 16 and the BatchNorm1d scale fixed at 1 (not
    trained; its shift is trained).

    Initialisation as arcface_torch: conv weights N(0, 0.1²), BatchNorm2d weight 1 and bias 0, the embedding
    BatchNorm1d weight 1; the Linear layer and PReLU (slope 0.25) keep PyTorch's defaults.

    Args:
        layers: number of blocks in each of the four stages, e.g. (3, 4, 14, 3) for iresnet50.
        img_size: side of the square input in pixels, a positive multiple of 16 (112 -> a 7x7 final map).
        dropout: dropout probability before the Linear layer.
        embedding_size: output feature size.
    """

    def __init__(
        self, layers: Sequence[int], *, img_size: int = 112, dropout: float = 0.0, embedding_size: int = 512
    ) -> None:
        super().__init__()
        if len(layers) != len(STAGE_WIDTHS) or any(n < 1 for n in layers):
            raise ValueError(f"layers must give a positive block count for each of 4 stages, got {tuple(layers)}")
        if img_size < TOTAL_STRIDE or img_size % TOTAL_STRIDE:
            raise ValueError(
                f"IResNet img_size must be a positive multiple of {TOTAL_STRIDE} (four stride-2 stages, e.g. 112 -> "
                f"7x7, 48 -> 3x3), got {img_size}"
            )
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        self.img_size = int(img_size)
        self.final_size = self.img_size // TOTAL_STRIDE
        self.num_features = int(embedding_size)
        self.grad_checkpointing = False

        self.conv1 = _conv3x3(3, STAGE_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        inplanes = STAGE_WIDTHS[0]
        for index, (planes, blocks) in enumerate(zip(STAGE_WIDTHS, layers), start=1):
            self.add_module(f"layer{index}", self._make_stage(inplanes, planes, blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(inplanes * self.final_size**2, self.num_features)
        self.features = nn.BatchNorm1d(self.num_features, eps=_BN_EPS)
        self._init_weights()

    @staticmethod
    def _make_stage(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
        """One stage: a stride-2 block with a projection shortcut, then ``blocks - 1`` stride-1 blocks."""
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(planes, eps=_BN_EPS)
        )
        units = [IBasicBlock(inplanes, planes, stride=2, downsample=downsample)]
        units += [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*units)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, _CONV_INIT_STD)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    @property
    def stages(self) -> tuple[nn.Sequential, ...]:
        """The four residual stages, ``layer1``..``layer4``."""
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block's activations in backward instead of storing them (training only).

        The recomputation leaves the BatchNorm running statistics alone, so they are updated once per step as
        without checkpointing.

        Args:
            enable: turn checkpointing on or off.
        """
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and residual stages.

        Args:
            x: images (B, 3, img_size, img_size).

        Returns:
            Feature map (B, 512, img_size / 16, img_size / 16).
        """
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"IResNet built for img_size {self.img_size} expects (B, 3, {self.img_size}, {self.img_size}) "
                f"images, got {tuple(x.shape)}"
            )
        x = self.prelu(self.bn1(self.conv1(x)))
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for stage in self.stages:
            for block in stage:
                if use_checkpoint:
                    x = checkpoint(block, x, use_reentrant=False, context_fn=partial(_checkpoint_contexts, block))
                else:
                    x = block(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding head.

        BN, flatten and dropout run under the caller's autocast; the 512·s·s-wide Linear layer and the feature
        BatchNorm run in float32 with autocast off, as in arcface_torch (its fc takes ``x.float()`` outside the
        autocast block).

        Args:
            x: feature map (B, 512, s, s) from :meth:`forward_features`.

        Returns:
            Embedding (B, embedding_size), float32.
        """
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.features(self.fc(x.float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of faces.

        Args:
            x: images (B, 3, img_size, img_size).

        Returns:
            Embedding (B, embedding_size), not L2-normalised.
        """
        return self.forward_head(self.forward_features(x))


def _create_iresnet(
    variant: str,
    pretrained: bool,
    img_size: int,
    dropout: float,
    embedding_size: int,
    **kwargs: Any,
) -> IResNet:
    """Build a registered IResNet; pretrained weights are never downloaded."""
    if pretrained:
        raise ValueError(
            f"{variant}: pretrained=True would download weights; load a local arcface_torch backbone.pth with "
            "model.iresnet.load_arcface_torch_backbone(path)"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(f"{variant}: unexpected arguments {', '.join(sorted(kwargs))}")
    return IResNet(IRESNET_LAYERS[variant], img_size=img_size, dropout=dropout, embedding_size=embedding_size)


@register_model
def iresnet18(
    pretrained: bool = False, img_size: int = 112, dropout: float = 0.0, embedding_size: int = 512, **kwargs: Any
) -> IResNet:
    """IResNet-18: (2, 2, 2, 2) blocks."""
    return _create_iresnet("iresnet18", pretrained, img_size, dropout, embedding_size, **kwargs)


@register_model
def iresnet34(
    pretrained: bool = False, img_size: int = 112, dropout: float = 0.0, embedding_size: int = 512, **kwargs: Any
) -> IResNet:
    """IResNet-34: (3, 4, 6, 3) blocks."""
    return _create_iresnet("iresnet34", pretrained, img_size, dropout, embedding_size, **kwargs)


@register_model
def iresnet50(
    pretrained: bool = False, img_size: int = 112, dropout: float = 0.0, embedding_size: int = 512, **kwargs: Any
) -> IResNet:
    """IResNet-50: (3, 4, 14, 3) blocks, 43.59M parameters at 112 px."""
    return _create_iresnet("iresnet50", pretrained, img_size, dropout, embedding_size, **kwargs)


@register_model
def iresnet100(
    pretrained: bool = False, img_size: int = 112, dropout: float = 0.0, embedding_size: int = 512, **kwargs: Any
) -> IResNet:
    """IResNet-100: (3, 13, 30, 3) blocks, 65.16M parameters at 112 px."""
    return _create_iresnet("iresnet100", pretrained, img_size, dropout, embedding_size, **kwargs)


# Names listed per kind of mismatch in an error message.
_LISTED = 8


def load_arcface_torch_backbone(
    path: str | os.PathLike, arch: str | None = None, *, weights_only: bool = True
) -> IResNet:
    """Build the IResNet that an arcface_torch ``backbone.pth`` describes and load the file into it.

    The architecture follows from the blocks per stage in the key names (``layer{i}.{j}.*``) unless ``arch`` is
    given; the input size is 16·s and the embedding size E, read from ``fc.weight``'s shape (E, 512·s·s).

    Args:
        path: a bare state dict with arcface_torch's key names (what its ``train_v2.py`` saves as ``model.pt``,
            published as ``backbone.pth``).
        arch: one of ``IRESNET_ARCHS`` the file must hold, or None to infer it.
        weights_only: safe loading; False only for a trusted file holding other pickled objects.

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a bare state dict, or not an arcface_torch IResNet (of ``arch``); the
            message names the file and the mismatched keys and shapes.
    """
    if arch is not None and arch not in IRESNET_LAYERS:
        raise ValueError(f"arch must be one of {', '.join(IRESNET_ARCHS)}, got {arch!r}")
    state = _read_state_dict(path, weights_only)
    img_size, embedding_size = _head_geometry(state, path)
    if arch is None:
        blocks = _blocks_per_stage(state)
        arch = _arch_of(blocks)
        if arch is None:
            known = ", ".join(f"{name} {layers}" for name, layers in IRESNET_LAYERS.items())
            raise CheckpointError(f"{path}: blocks per stage {blocks} match no arcface_torch IResNet ({known})")
    model = IResNet(IRESNET_LAYERS[arch], img_size=img_size, embedding_size=embedding_size)
    _load_checked(model, state, path)
    return model.eval()


def load_arcface_torch_weights(model: IResNet, path: str | os.PathLike, *, weights_only: bool = True) -> None:
    """Load an arcface_torch ``backbone.pth`` into an existing IResNet (fine-tuning from it).

    Args:
        model: the IResNet to fill; its architecture, input size and embedding size must be the file's.
        path: a bare state dict with arcface_torch's key names.
        weights_only: safe loading; False only for a trusted file holding other pickled objects.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a bare state dict or does not fit ``model`` (the message names the file,
            the model and the mismatched keys and shapes).
    """
    _load_checked(model, _read_state_dict(path, weights_only), path)


def _read_state_dict(path: str | os.PathLike, weights_only: bool) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path, weights_only=weights_only)
    not_tensors = sorted(str(k) for k, v in state.items() if not torch.is_tensor(v))
    if not_tensors:
        raise CheckpointError(
            f"{path} is not a bare state dict like arcface_torch's backbone.pth: its entries {_listed(not_tensors)} "
            "are not tensors"
        )
    return state


def _head_geometry(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> tuple[int, int]:
    """(input size, embedding size) from ``fc.weight`` (E, 512·s·s): (16·s, E)."""
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        got = "no fc.weight" if fc is None else f"fc.weight of shape {tuple(fc.shape)}"
        raise CheckpointError(f"{path}: an arcface_torch IResNet has a 2-D fc.weight (E, 512·s·s); the file has {got}")
    side = math.isqrt(fc.shape[1] // STAGE_WIDTHS[-1])
    if side < 1 or fc.shape[1] != STAGE_WIDTHS[-1] * side * side:
        raise CheckpointError(
            f"{path}: fc.weight has shape {tuple(fc.shape)}; an arcface_torch IResNet's is (E, 512·s·s) with "
            "s = input size / 16"
        )
    return TOTAL_STRIDE * side, int(fc.shape[0])


def _blocks_per_stage(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Blocks of ``layer1``..``layer4`` from the key names: 1 + the largest block index (0 for an absent stage)."""
    counts = []
    for stage in range(1, len(STAGE_WIDTHS) + 1):
        indices = [int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()]
        counts.append(max(indices) + 1 if indices else 0)
    return tuple(counts)


def _arch_of(blocks: Sequence[int]) -> str | None:
    return next((name for name, layers in IRESNET_LAYERS.items() if layers == tuple(blocks)), None)


def _listed(names: Sequence[str]) -> str:
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _load_checked(model: IResNet, state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load ``state`` into ``model`` if its keys and shapes are exactly the model's, else one error naming all."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        blocks = tuple(len(stage) for stage in model.stages)
        fc = state.get("fc.weight")
        file_fc = tuple(fc.shape) if torch.is_tensor(fc) else "absent"
        found = _blocks_per_stage(state)
        problems = [
            f"{label}: {_listed(items)}"
            for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes", shapes))
            if items
        ]
        raise CheckpointError(
            f"{path} does not fit {_arch_of(blocks)} {blocks} at {model.img_size} px with a {model.num_features}-d "
            f"embedding: the file has blocks per stage {found} ({_arch_of(found) or 'no arcface_torch IResNet'}) "
            f"and fc.weight {file_fc}; " + "; ".join(problems)
        )
    model.load_state_dict(state)
