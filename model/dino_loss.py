"""DINO's loss: cross-entropy between the teacher's centred, sharpened softmax and the student's softmax.

The teacher temperature follows a per-epoch linear warm-up; the center is an EMA of the teacher outputs over all
ranks (docs/pretraining.md). The method that uses it is ``model/dino.py``.

References:
    - DINO (Caron et al., ICCV 2021), facebookresearch/dino ``main_dino.py`` (``DINOLoss``: the loss, the center
      update and the teacher temperature schedule).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.distributed import all_reduce_sum


class DINOLoss(nn.Module):
    """DINO's cross-entropy between the centred, sharpened teacher softmax and the student softmax of other views.

    With G global and L local views of a batch of B images, teacher outputs t_g (rows g*B .. (g+1)*B) and student
    outputs s_v (all G + L views, globals first)::

        q_g = softmax((t_g - center) / tau_t(epoch)),  p_v = log_softmax(s_v / tau_s)
        loss = mean over the G * (G + L) - G pairs (g, v), v != g, of  mean_b  sum_k -q_g[b, k] * p_v[b, k]

    After the loss, under no grad, ``center <- m * center + (1 - m) * mean of the teacher rows over all ranks``.
    The teacher temperature rises linearly over ``warmup_teacher_temp_epochs`` (``np.linspace`` from
    ``warmup_teacher_temp`` to ``teacher_temp``, both included, as DINO), then stays at ``teacher_temp``.
    ``teacher_entropy`` holds the mean entropy (nats) of q over the last batch's teacher rows (this rank).

    Args:
        out_dim: width K of the head outputs.
        n_local: local views L.
        epochs: epochs of the run (length of the temperature schedule; later epochs use ``teacher_temp``).
        n_global: global views G (the teacher's).
        warmup_teacher_temp: teacher temperature at epoch 0.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: warm-up epochs (0: ``teacher_temp`` throughout).
        student_temp: student temperature tau_s.
        center_momentum: EMA momentum m of the center.
    """

    def __init__(
        self,
        out_dim: int,
        *,
        n_local: int,
        epochs: int,
        n_global: int = 2,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if out_dim < 1 or n_global < 1 or n_local < 0:
            raise ValueError(
                f"DINOLoss needs out_dim >= 1, n_global >= 1, n_local >= 0; got {out_dim}, {n_global}, {n_local}"
            )
        if n_global + n_local < 2:
            raise ValueError("DINOLoss needs at least 2 views (a global view is never compared with itself)")
        if epochs < 1 or not 0 <= warmup_teacher_temp_epochs <= epochs:
            raise ValueError(
                f"warmup_teacher_temp_epochs must be in [0, epochs={epochs}] (epochs >= 1), got "
                f"{warmup_teacher_temp_epochs}"
            )
        if min(warmup_teacher_temp, teacher_temp, student_temp) <= 0:
            raise ValueError(
                f"temperatures must be positive, got warmup_teacher_temp {warmup_teacher_temp}, teacher_temp "
                f"{teacher_temp}, student_temp {student_temp}"
            )
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.n_global = n_global
        self.n_local = n_local
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_temps = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.full(epochs - warmup_teacher_temp_epochs, teacher_temp),
            )
        )
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_entropy: torch.Tensor | None = None

    @property
    def n_views(self) -> int:
        """Student views per image, G + L."""
        return self.n_global + self.n_local

    def teacher_temp(self, epoch: int) -> float:
        """Teacher temperature of a 0-based epoch (the schedule's last value past its end)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        """The loss of one batch; then updates ``center`` and ``teacher_entropy``.

        Args:
            student_out: ((G + L) * B, K) head outputs of all views, view-major (all images of view 0 first).
            teacher_out: (G * B, K) teacher head outputs of the global views, same order.
            epoch: 0-based epoch (teacher temperature).

        Returns:
            The scalar loss (float32).
        """
        if student_out.ndim != 2 or student_out.shape[1] != self.out_dim or student_out.shape[0] % self.n_views:
            raise ValueError(
                f"student_out must be ({self.n_views} * B, {self.out_dim}) for {self.n_views} views, got "
                f"{tuple(student_out.shape)}"
            )
        batch = student_out.shape[0] // self.n_views
        if tuple(teacher_out.shape) != (self.n_global * batch, self.out_dim):
            raise ValueError(
                f"teacher_out must be ({self.n_global} * {batch}, {self.out_dim}) for {self.n_global} global views, "
                f"got {tuple(teacher_out.shape)}"
            )
        teacher_out = teacher_out.detach().float()
        with torch.autocast(device_type=student_out.device.type, enabled=False):
            q = F.softmax((teacher_out - self.center) / self.teacher_temp(epoch), dim=-1)
            log_p = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
            # cross[g, v] = mean over the batch of -sum_k q_g * log p_v
            cross = (
                -torch.einsum("gbk,vbk->gv", q.view(self.n_global, batch, -1), log_p.view(self.n_views, batch, -1))
                / batch
            )
            same_view = torch.eye(self.n_global, self.n_views, dtype=torch.bool, device=cross.device)
            loss = cross.masked_fill(same_view, 0.0).sum() / (cross.numel() - self.n_global)
        with torch.no_grad():
            self.teacher_entropy = torch.special.entr(q).sum(dim=-1).mean()
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the center with the mean teacher output over all rows of all ranks.

        Args:
            teacher_out: (N, K) teacher outputs of this rank.
        """
        stats = torch.cat([teacher_out.float().sum(dim=0), teacher_out.new_tensor([teacher_out.shape[0]]).float()])
        stats = all_reduce_sum(stats)
        batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
