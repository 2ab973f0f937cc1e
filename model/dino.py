"""DINO self-supervised pretraining: the student/teacher method and its per-iteration schedules.

The student (backbone + DINO head) sees every view, the teacher (its EMA, never trained by gradients) only the global
ones; the loss is the cross-entropy between the teacher's centred, sharpened softmax of each global view and the
student's softmax of every other view (``model/dino_loss.py``, docs/pretraining.md). An optional frozen front end
(LAFS's landmark mosaic) turns each view into the backbone's input first. The schedule formulas are
``utils/schedules.py``'s.

One training step, in the order of DINO's ``train_one_epoch``, as the shared loop (``trainer/engine.py``) runs it
through the ``MetaArch`` hooks once ``method.use_schedules(DINOSchedules.build(...))`` was called::

    method.begin_epoch(epoch)                        # teacher temperature of the epoch
    losses = model(*method.batch_inputs(batch, device))
    scaler.scale(losses["loss"]).backward()
    method.before_optimizer_step(optimizer, progress)  # head's last layer frozen in the first epoch(s);
                                                       # lr and weight decay of the iteration
    scaler.step(optimizer); scaler.update()
    method.after_optimizer_step(progress)            # teacher EMA with the iteration's momentum (same on all ranks)

``progress`` is ``epoch + step / len(loader)``, so the schedules are built with ``steps_per_epoch = len(loader)``.
DINO clips each parameter's gradient on its own (:meth:`DINOMethod.clip_gradients`, after ``scaler.unscale_``);
the loop's ``clip_grad`` clips the global norm instead.

References:
    - DINO (Caron et al., ICCV 2021), facebookresearch/dino ``main_dino.py`` (the training step, its three
      schedules) and ``utils.py`` (``MultiCropWrapper``, ``get_params_groups``, ``clip_gradients``,
      ``cancel_gradients_last_layer``, checkpoint layout).
    - DINOv2 ``dinov2/train/ssl_meta_arch.py`` (``SSLMetaArch``: the method owns student, teacher and losses).
    - LAFS (Sun et al., CVPR 2024): DINO on landmark mosaics from a frozen landmark CNN.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch.nn.parallel import DistributedDataParallel

from model.dino_loss import DINOLoss
from model.head import DINOHead
from model.landmark import (
    LANDMARK_EXPORT,
    LAFSViewFrontEnd,
    LandmarkFrontEnd,
    check_local_landmarks,
    load_landmark_weights,
    save_landmark_weights,
)
from model.meta_arch import MetaArch, MethodConfig
from model.vit import PrefixViT, create_backbone
from utils.checkpoint import atomic_save
from utils.distributed import broadcast, get_world_size
from utils.schedules import cosine_schedule, set_lr

logger = logging.getLogger(__name__)

METHOD = "dino"
DINO_CHECKPOINT = "checkpoint.pth"  # the file name DINO's main_dino.py writes
DINO_LOCAL_CROP_SIZE = 48  # DINO's 96 px local crops of 224 px images, at 112 px


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DINOSchedules:
    """DINO's per-iteration schedules, indexed by the global iteration ``epoch * steps_per_epoch + step``.

    Attributes:
        lr: learning rate (linear warm-up from 0, cosine to ``min_lr``).
        weight_decay: weight decay of the decayed group (cosine 0.04 -> 0.4 in DINO and LAFS).
        momentum: teacher EMA momentum (cosine 0.996 -> 1).
        steps_per_epoch: iterations per epoch.
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    steps_per_epoch: int

    @classmethod
    def build(
        cls,
        *,
        lr: float,
        min_lr: float,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: int = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        momentum_teacher: float = 0.996,
    ) -> DINOSchedules:
        """The three schedules of ``main_dino.py``.

        Args:
            lr: peak learning rate (already scaled by the batch size: DINO uses lr * global batch / 256).
            min_lr: final learning rate.
            epochs: total epochs.
            steps_per_epoch: optimiser steps per epoch.
            warmup_epochs: learning-rate warm-up epochs.
            weight_decay: initial weight decay.
            weight_decay_end: final weight decay.
            momentum_teacher: initial teacher momentum (it rises to 1).

        Returns:
            The schedules.
        """
        if not 0.0 <= momentum_teacher <= 1.0:
            raise ValueError(f"momentum_teacher must be in [0, 1], got {momentum_teacher}")
        return cls(
            lr=cosine_schedule(lr, min_lr, epochs, steps_per_epoch, warmup_epochs),
            weight_decay=cosine_schedule(weight_decay, weight_decay_end, epochs, steps_per_epoch),
            momentum=cosine_schedule(momentum_teacher, 1.0, epochs, steps_per_epoch),
            steps_per_epoch=steps_per_epoch,
        )

    def __len__(self) -> int:
        return len(self.lr)

    def iteration(self, progress: float) -> int:
        """The iteration of a loop ``progress`` (epochs, ``epoch + step / steps_per_epoch``).

        Raises:
            IndexError: the iteration is outside the schedules (e.g. more epochs than they were built for).
        """
        it = round(progress * self.steps_per_epoch)
        if not 0 <= it < len(self):
            raise IndexError(
                f"training progress {progress:.4f} epochs is iteration {it}, outside the schedules' {len(self)} "
                f"iterations ({len(self) // self.steps_per_epoch} epochs of {self.steps_per_epoch} steps)"
            )
        return it

    def apply(self, optimizer: torch.optim.Optimizer, it: int) -> float:
        """Set iteration ``it``'s learning rate on every group and its weight decay on all but ``no_decay`` groups.

        A group's ``lr_scale`` key, if present, multiplies its learning rate. Groups named ``no_decay`` (see
        :meth:`DINOMethod.get_params_groups`) keep their weight decay of 0, as DINO's second group does.

        Args:
            optimizer: the optimiser.
            it: global iteration, in ``[0, len(self))``.

        Returns:
            The teacher momentum of iteration ``it``, for :meth:`DINOMethod.update_teacher` after the step.
        """
        if not 0 <= it < len(self):
            raise IndexError(f"iteration {it} is outside the schedules' {len(self)} iterations")
        set_lr(optimizer, float(self.lr[it]))
        for group in optimizer.param_groups:
            if group.get("name") != "no_decay":
                group["weight_decay"] = float(self.weight_decay[it])
        return float(self.momentum[it])


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------


class FrontEnd(Protocol):
    """What :class:`DINOMethod` asks of a front end (an ``nn.Module``, frozen): one view batch -> backbone input.

    ``front_end(image, clean, global_view=...)``: ``image`` (B, 3, s, s) is the view the network's pixels come from
    (the photometric copy), ``clean`` the clean geometric crop of the same view when the data provides one
    (``data_loader.multicrop.MultiCropTransform(split_photometric=True)``) else None, ``global_view`` tells a global
    view from a local one (LAFS keeps all landmarks of a global view, 36 random ones of a local view). It returns the
    (B, 3, h, w) backbone input (LAFS: the landmark mosaic). It is called under ``torch.no_grad()``, in the mode
    (train/eval) of the method: random landmark jitter belongs to training mode only.
    """

    def __call__(self, image: torch.Tensor, clean: torch.Tensor | None, *, global_view: bool) -> torch.Tensor: ...


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of views; consecutive views of one resolution go through the backbone together.

    Keys are ``backbone.*`` and ``head.*``, as DINO's ``MultiCropWrapper``.

    Args:
        backbone: image -> (N, D) CLS features.
        head: (N, D) -> (N, K).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Project every view.

        Args:
            views: V tensors (B, 3, h_v, w_v).

        Returns:
            (V * B, K) head outputs, view-major.
        """
        features, start = [], 0
        for end in range(1, len(views) + 1):
            if end == len(views) or views[end].shape[-2:] != views[start].shape[-2:]:
                features.append(self.backbone(torch.cat(list(views[start:end]))))
                start = end
        return self.head(torch.cat(features))


@dataclass
class DINOConfig(MethodConfig):
    """Everything that defines a DINO model (stored in training checkpoints as ``model_config``).

    Attributes:
        arch: backbone (``model.vit.list_backbones``).
        patch_size: ViT patch size.
        img_size: global view side in pixels (the backbone's input size).
        out_dim: head output width K (DINO 65536, LAFS 100000).
        hidden_dim: head MLP width.
        bottleneck_dim: head width before the weight-normalised last layer.
        n_global: global views (the teacher's).
        n_local: local views.
        epochs: epochs of the run (teacher temperature schedule).
        warmup_teacher_temp: teacher temperature at epoch 0 (LAFS 0.07).
        teacher_temp: teacher temperature after the warm-up (0.04).
        warmup_teacher_temp_epochs: teacher temperature warm-up (LAFS 30).
        student_temp: student temperature.
        center_momentum: EMA momentum of the loss center.
        landmark_cnn: LAFS: every view becomes a landmark mosaic of a frozen landmark CNN (``LAFSViewFrontEnd``).
        landmark_tiles: LAFS tile orientation, ``"natural"`` or ``"reference"``.
        landmark_jitter: LAFS landmark jitter std in pixels (5).
        local_landmarks: LAFS landmarks kept by a local view (36: a 6 x 6 mosaic).
        drop_path_rate: stochastic depth of the student's last block, linearly spaced from 0 over the blocks (DINO
            and LAFS: 0.1); the teacher has none.
    """

    method: ClassVar[str] = METHOD
    arch: str = "vit_small"
    patch_size: int = 8
    img_size: int = 112
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_global: int = 2
    n_local: int = 8
    epochs: int = 100
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    landmark_cnn: bool = False
    landmark_tiles: str = "natural"
    landmark_jitter: float = 5.0
    local_landmarks: int = 36
    drop_path_rate: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


def set_stochastic_depth(backbone: PrefixViT, rate: float) -> None:
    """DINO's stochastic depth: block i drops its residual branches with probability ``rate * i / (depth - 1)``.

    The rates are DINO's ``torch.linspace(0, drop_path_rate, depth)``; a rate of 0 leaves the branch as an identity.
    ``DropPath`` scales the kept samples by 1 / (1 - p) and is active in training mode only.

    Args:
        backbone: the ViT whose blocks (``drop_path1``, ``drop_path2``) are set, in place.
        rate: the last block's drop probability.
    """
    rates = torch.linspace(0.0, rate, len(backbone.blocks)).tolist()
    for block, p in zip(backbone.blocks, rates):
        block.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        block.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


def mean_pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the N (N - 1) ordered pairs of distinct rows: (||sum_i u_i||^2 - N) / (N (N - 1))
    with u_i the L2-normalised rows.

    Args:
        features: (N, D), N >= 2.

    Returns:
        A scalar tensor in [-1 / (N - 1), 1].
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"the mean pairwise cosine needs at least 2 rows, got {n}")
    total = F.normalize(features.float(), dim=1).sum(dim=0)
    return (total.dot(total) - n) / (n * (n - 1))


class DINOMethod(MetaArch):
    """DINO student/teacher self-distillation (see the module docstring for the training step).

    ``student`` and ``teacher`` are :class:`MultiCropWrapper` (backbone + ``DINOHead``); the teacher starts as a
    copy of the student, has no gradients, is never wrapped in DDP and moves only by :meth:`update_teacher`.
    Evaluation features come from the teacher backbone. As in DINO, the student's blocks use stochastic depth
    (``cfg.drop_path_rate``) and the teacher's none.

    Variable resolution: views are grouped by size; a backbone built by ``create_backbone`` only takes
    ``img_size`` inputs, so local views (or front-end outputs) of another size need a backbone made with timm's
    ``dynamic_img_size=True`` (position embeddings resampled per size), passed as ``backbone``.

    Args:
        cfg: the configuration.
        front_end: frozen module applied to every view first (:class:`FrontEnd`; LAFS's landmark mosaic), or None.
        backbone: the student backbone (default ``create_backbone(cfg.arch, patch_size=..., img_size=...)``).
    """

    summary_scalars = ("teacher_entropy", "teacher_feature_cosine")

    def __init__(
        self, cfg: DINOConfig, *, front_end: nn.Module | None = None, backbone: PrefixViT | None = None
    ) -> None:
        super().__init__()
        if front_end is not None:
            trainable = [name for name, p in front_end.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(
                    f"the front end must be frozen (it is not trained nor synchronised across ranks); "
                    f"{len(trainable)} parameters require gradients, e.g. {trainable[:3]}"
                )
        self.cfg = cfg
        if backbone is None:
            backbone = create_backbone(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.img_size)
        head = DINOHead(
            backbone.embed_dim,
            cfg.out_dim,
            hidden_dim=cfg.hidden_dim,
            bottleneck_dim=cfg.bottleneck_dim,
            normalize_output=False,  # DINO's logits are cosines to the prototypes
        )
        set_stochastic_depth(backbone, cfg.drop_path_rate)
        self.student = MultiCropWrapper(backbone, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        set_stochastic_depth(self.teacher.backbone, 0.0)
        self.front_end = front_end
        self.dino_loss = DINOLoss(
            cfg.out_dim,
            n_local=cfg.n_local,
            epochs=cfg.epochs,
            n_global=cfg.n_global,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        )
        self.epoch = 0
        self.schedules: DINOSchedules | None = None
        self.freeze_last_layer = 1
        self._ddp_student: list[DistributedDataParallel] = []  # a list: not registered as a submodule

    # ------------------------------------------------------------------ training
    def use_schedules(self, schedules: DINOSchedules, *, freeze_last_layer: int = 1) -> None:
        """Set what the optimiser hooks apply: per-iteration lr, weight decay and teacher momentum.

        Args:
            schedules: built with ``steps_per_epoch = len(loader)``.
            freeze_last_layer: epochs during which the head's last layer is not updated (DINO: 1).
        """
        self.schedules = schedules
        self.freeze_last_layer = int(freeze_last_layer)

    def _iteration(self, progress: float) -> int:
        if self.schedules is None:
            raise RuntimeError(
                "DINOMethod has no schedules: call use_schedules(DINOSchedules.build(...)) before training (the "
                "teacher EMA momentum, learning rate and weight decay come from them)"
            )
        return self.schedules.iteration(progress)

    def begin_epoch(self, epoch: int) -> None:
        """Select the epoch whose teacher temperature the next steps use."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, progress: float) -> None:
        """Drop the last layer's gradients in the first epoch(s); set the iteration's lr and weight decay."""
        it = self._iteration(progress)
        self.cancel_last_layer_gradients(it // self.schedules.steps_per_epoch, self.freeze_last_layer)
        self.schedules.apply(optimizer, it)

    def after_optimizer_step(self, progress: float) -> None:
        """EMA of the teacher with the iteration's momentum."""
        self.update_teacher(float(self.schedules.momentum[self._iteration(progress)]))

    def batch_inputs(self, batch: Any, device: torch.device) -> tuple[list, list]:
        """``(views, label, uq_idx, ...)`` multi-crop items -> ``(global_views, local_views)`` on ``device``.

        ``views`` is the collated output of ``MultiCropTransform``: a list of (B, 3, s, s) tensors, or of
        ``(augmented, clean)`` pairs of them.
        """
        views = batch[0]
        n_views = self.cfg.n_global + self.cfg.n_local
        if not isinstance(views, (list, tuple)) or len(views) != n_views:
            got = len(views) if isinstance(views, (list, tuple)) else type(views).__name__
            raise ValueError(
                f"a DINO batch needs {n_views} views ({self.cfg.n_global} global + {self.cfg.n_local} local, e.g. "
                f"from data_loader.multicrop.MultiCropTransform), got {got}"
            )

        def move(view: Any) -> Any:
            if isinstance(view, torch.Tensor):
                return view.to(device, non_blocking=True)
            return tuple(t.to(device, non_blocking=True) for t in view)

        moved = [move(v) for v in views]
        return moved[: self.cfg.n_global], moved[self.cfg.n_global :]

    def prepare_for_distributed_training(self, device: torch.device, broadcast_buffers: bool = True) -> nn.Module:
        """Wrap only the student in DDP; rank 0's teacher and loss center are broadcast. Returns this module."""
        if get_world_size() > 1 and not self._ddp_student:
            for tensor in (*self.teacher.state_dict().values(), self.dino_loss.center):
                broadcast(tensor, src=0)
            device_ids = [device.index] if device.type == "cuda" else None
            self._ddp_student.append(
                DistributedDataParallel(self.student, device_ids=device_ids, broadcast_buffers=broadcast_buffers)
            )
        return self

    def no_sync(self) -> ContextManager:
        """DDP ``no_sync`` of the student (gradient accumulation)."""
        return self._ddp_student[0].no_sync() if self._ddp_student else contextlib.nullcontext()

    def _backbone_input(self, view: Any, *, global_view: bool) -> torch.Tensor:
        """A view (tensor or ``(augmented, clean)`` pair) through the front end, if any."""
        image, clean = (view, None) if isinstance(view, torch.Tensor) else view
        if self.front_end is None:
            return image
        with torch.no_grad():
            return self.front_end(image, clean, global_view=global_view)

    def forward(self, global_views: Sequence[Any], local_views: Sequence[Any]) -> dict[str, Any]:
        """One training forward: teacher on the global views, student on all, the DINO loss.

        Args:
            global_views: ``n_global`` views (B, 3, S, S) (tensors or ``(augmented, clean)`` pairs).
            local_views: ``n_local`` views (B, 3, s, s), same kinds.

        Returns:
            ``loss``, ``teacher_entropy`` (mean entropy of the teacher softmax, nats), ``teacher_feature_cosine``
            (:func:`mean_pairwise_cosine` of the teacher's CLS features of the first global view: near 1 when the
            features collapse onto one direction) and ``teacher_temp``.
        """
        if len(global_views) != self.cfg.n_global or len(local_views) != self.cfg.n_local:
            raise ValueError(
                f"expected {self.cfg.n_global} global and {self.cfg.n_local} local views, got {len(global_views)} "
                f"and {len(local_views)}"
            )
        global_inputs = [self._backbone_input(v, global_view=True) for v in global_views]
        local_inputs = [self._backbone_input(v, global_view=False) for v in local_views]
        with torch.no_grad():
            # the global views share one size, so this is what MultiCropWrapper does, with the features kept
            teacher_features = self.teacher.backbone(torch.cat(global_inputs))
            teacher_out = self.teacher.head(teacher_features)
            feature_cosine = mean_pairwise_cosine(teacher_features[: global_inputs[0].shape[0]])
        student = self._ddp_student[0] if self._ddp_student else self.student
        student_out = student(global_inputs + local_inputs)
        loss = self.dino_loss(student_out, teacher_out, self.epoch)
        return {
            "loss": loss,
            "teacher_entropy": self.dino_loss.teacher_entropy,
            "teacher_feature_cosine": feature_cosine,
            "teacher_temp": self.dino_loss.teacher_temp(self.epoch),
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

        Student parameters are equal on every rank after the (DDP-synchronised) step, so the teachers stay equal.

        Args:
            momentum: EMA momentum in [0, 1] (``DINOSchedules.momentum`` of the iteration).
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"teacher momentum must be in [0, 1], got {momentum}")
        teacher = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def clip_gradients(self, clip: float) -> None:
        """DINO's clipping: each student parameter's gradient is scaled to norm at most ``clip`` on its own.

        Call after ``scaler.unscale_(optimizer)``. Unlike ``clip_grad_norm_`` (one global norm), DINO clips every
        parameter tensor separately (``utils.clip_gradients``).

        Args:
            clip: maximum L2 norm of each parameter's gradient (DINO and LAFS: 3.0).
        """
        for p in self.student.parameters():
            if p.grad is not None:
                norm = torch.linalg.vector_norm(p.grad.detach().float())
                p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0).to(p.grad.dtype))

    def cancel_last_layer_gradients(self, epoch: int, freeze_last_layer: int = 1) -> None:
        """Drop the head's last-layer gradients during the first ``freeze_last_layer`` epochs (DINO's recipe).

        Args:
            epoch: 0-based epoch.
            freeze_last_layer: epochs during which the last layer is not updated.
        """
        if epoch >= freeze_last_layer:
            return
        for p in self.student.head.last_layer.parameters():
            p.grad = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the student backbone (the teacher runs without gradients)."""
        self.student.backbone.set_grad_checkpointing(enable)

    def get_params_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Student parameters: ``decay`` (weights) and ``no_decay`` (biases and 1-D parameters), as DINO."""
        decay, no_decay = [], []
        for name, param in self.student.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return [g for g in groups if g["params"]]

    @property
    def views_per_sample(self) -> int:
        """The global and the local crops of every image."""
        return self.cfg.n_global + self.cfg.n_local

    # ------------------------------------------------------------------ evaluation
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher backbone CLS features (B, D) of full images (through the front end as global views)."""
        return self.teacher.backbone(self._backbone_input(images, global_view=True))

    # ------------------------------------------------------------------ export
    def export(self, out_dir: Path, epoch: int, args: dict[str, Any]) -> None:
        """Write ``<out_dir>/checkpoint.pth`` in DINO's format: what ``train.py --pretrained-weights`` starts from.

        LAFS also writes the landmark CNN it used as ``<out_dir>/landmark_cnn.pth`` (reference key format), the
        ``--landmark-weights`` of a FaceGCD run with ``--landmark-cnn`` from this checkpoint.
        """
        atomic_save(self.dino_checkpoint(epoch, args), Path(out_dir) / DINO_CHECKPOINT)
        landmarks = self.landmark_front_end()
        if landmarks is not None:
            save_landmark_weights(landmarks, Path(out_dir) / LANDMARK_EXPORT)

    def landmark_front_end(self) -> LandmarkFrontEnd | None:
        """The landmark CNN and mosaic settings of a LAFS front end, or None."""
        return self.front_end.landmarks if isinstance(self.front_end, LAFSViewFrontEnd) else None

    def dino_checkpoint(self, epoch: int, args: argparse.Namespace | Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The official DINO ``checkpoint.pth`` layout (weights, epoch, args and the loss center).

        ``student`` keys are ``module.backbone.*`` / ``module.head.*`` (DINO saves its DDP-wrapped student),
        ``teacher`` keys ``backbone.*`` / ``head.*``; ``args`` is a plain dict, so the file loads with
        ``weights_only=True``, e.g. by ``model.vit.load_pretrained_backbone(..., checkpoint_key="teacher")``.
        The front end is not part of it (its own weights live wherever it came from).

        Args:
            epoch: the next epoch to train, as ``main_dino.py`` stores it (``epoch + 1`` after an epoch).
            args: the run's arguments.

        Returns:
            ``{"student", "teacher", "epoch", "args", "dino_loss"}``.
        """
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        return {
            "student": {f"module.{k}": v for k, v in self.student.state_dict().items()},
            "teacher": dict(self.teacher.state_dict()),
            "epoch": int(epoch),
            "args": dict(args or {}),
            "dino_loss": self.dino_loss.state_dict(),
        }


def build_dino(cfg: DINOConfig, *, landmark_weights: str | Path | None = None, weights_only: bool = True) -> DINOMethod:
    """A DINO (or, with ``cfg.landmark_cnn``, LAFS) method with a variable-resolution backbone.

    Args:
        cfg: the configuration.
        landmark_weights: LAFS: the trained landmark CNN (reference key format, e.g. a Part fViT run's
            ``landmark_cnn.pth``); required with ``cfg.landmark_cnn`` (a random CNN gives meaningless landmarks).
        weights_only: safe unpickling of ``landmark_weights``.

    Returns:
        The method; its backbone takes any multiple of the patch size (local views, LAFS's 48 px local mosaics).
    """
    front_end = None
    if cfg.landmark_cnn:
        if landmark_weights is None or not Path(landmark_weights).is_file():
            raise FileNotFoundError(
                f"LAFS (--method lafs) runs on the landmarks of a trained landmark CNN: --landmark-weights "
                f"{landmark_weights} does not exist (train one with --method recognition --landmark-cnn, which writes "
                f"<run>/{LANDMARK_EXPORT})"
            )
        landmarks = LandmarkFrontEnd(cfg.img_size, cfg.patch_size, orientation=cfg.landmark_tiles, frozen=True)
        check_local_landmarks(cfg.local_landmarks, landmarks.cnn.num_landmarks)
        load_landmark_weights(landmark_weights, landmarks, weights_only=weights_only)
        front_end = LAFSViewFrontEnd(landmarks, jitter_std=cfg.landmark_jitter, local_landmarks=cfg.local_landmarks)
    backbone = create_backbone(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.img_size, dynamic_img_size=True)
    return DINOMethod(cfg, front_end=front_end, backbone=backbone)
