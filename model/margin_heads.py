"""Margin-softmax heads for face recognition (docs/recognition.md): combined margin, AdaFace, GB-CosFace.

Every head is called as ``head(cosine, labels, norms=None)``:

- ``cosine`` (B, C): cosines between the L2-normalised embeddings and the L2-normalised class centres held by the
  caller, possibly a subset of all classes (Partial FC);
- ``labels`` (B,) int64: the column of the sample's target class in ``cosine``, or -1 when that column is not in
  this tensor (another rank holds it);
- ``norms`` (B,): the embeddings' L2 norms before normalisation (used by AdaFace only).

Heads compute in float32 with autocast disabled, whatever the input dtype. Softmax heads (``kind = "softmax"``) return
(B, C) float32 logits with the margin applied at the target column, to be fed to a (distributed) softmax
cross-entropy; GB-CosFace (``kind = "positive_negative"``) returns its scalar loss and exposes ``loss_from_parts`` for
Partial FC, which computes the positive cosine and the smooth maximum of the negatives across ranks.

References:
    - ArcFace (Deng et al., CVPR 2019; TPAMI 2022), insightface ``recognition/arcface_torch/losses.py``
      (``CombinedMarginLoss``); margin presets from the ArcFace paper, Table 2, and arcface_torch's configs.
    - SphereFace (Liu et al., CVPR 2017), eq. 7: the monotone extension psi(theta) = (-1)^k cos(m theta) - 2k.
    - CosFace (Wang et al., CVPR 2018).
    - AdaFace (Kim et al., CVPR 2022), github mk-minchul/AdaFace ``head.py``.
    - GB-CosFace (Sun et al., 2022), the authors' ``GBCosFace`` loss module.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.distributed import all_reduce_sum

logger = logging.getLogger(__name__)

MARGIN_HEADS = ("arcface", "cosface", "sphereface", "combined", "adaface", "gbcosface")


def _check_inputs(cosine: torch.Tensor, labels: torch.Tensor, allow_missing: bool = True) -> None:
    """Raise ValueError unless ``cosine`` is (B, C) and ``labels`` (B,) integer columns in [-1, C) (or [0, C))."""
    if cosine.dim() != 2:
        raise ValueError(f"cosine must be (B, C), got shape {tuple(cosine.shape)}")
    if labels.shape != (cosine.shape[0],):
        raise ValueError(
            f"labels must be ({cosine.shape[0]},) to match cosine {tuple(cosine.shape)}, got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 column indices, got dtype {labels.dtype}")
    if labels.numel() == 0:
        return
    low = -1 if allow_missing else 0
    lo, hi = int(labels.min()), int(labels.max())
    if lo < low or hi >= cosine.shape[1]:
        bad = lo if lo < low else hi
        raise ValueError(
            f"label column {bad} is outside [{low}, {cosine.shape[1]}) for cosine of shape {tuple(cosine.shape)}"
            + (" (-1 marks a target held elsewhere)" if allow_missing else " (this head needs every target column)")
        )


def _target_index(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose target column is present, and those columns."""
    rows = torch.nonzero(labels >= 0).squeeze(1)
    return rows, labels[rows].long()


class CombinedMargin(nn.Module):
    """Combined angular/additive margin: ArcFace, CosFace, SphereFace and their combinations (insightface).

    With theta the angle of a cosine and ``phi = m1 * theta + m2``, the target logit is ``s * (psi(theta) - m3)`` and
    every other logit ``s * cos(theta)``, where ``psi(theta) = cos(phi)``: plain, as arcface_torch's
    ``CombinedMarginLoss`` computes it (``easy_margin`` off; its ``th`` / ``mm`` constants are unused), also where
    phi > pi. There cos(phi) rises again, so a worse angle gets a larger target logit: ArcFace (m2 = 0.5) at theta = 3
    has phi = 3.5 and psi = cos(3.5) = -0.936, above psi(pi - 0.5) = -1. ``monotone_past_pi=True`` continues psi past
    pi with SphereFace's monotone extension ``psi = (-1)^k cos(phi) - 2k``, ``k = floor(phi / pi)``: continuous,
    non-increasing in theta on [0, pi], and equal to the plain formula for k = 0 (at theta = 3: -cos(3.5) - 2 =
    -1.064). The ``sphereface`` preset uses it (arcface_torch has no m1 != 1 path; SphereFace's paper defines it).

    Gradient: straight-through, as arcface_torch (its margin is applied under ``no_grad``): the target logit's value
    has the margin, its gradient is that of ``s * cos`` (d logit / d cos = s for every column). This stays finite at
    cos = +-1, where the exact derivative m1 sin(m1 theta + m2) / sin(theta) of the angular margin is infinite; for
    CosFace (m1 = 1, m2 = 0) straight-through is the exact derivative.

    Inter-class filtering (arcface_torch's rule): when ``interclass_filtering_threshold > 0``, every non-target cosine
    above the threshold (in rows with or without a target column here) is treated as a noisy label: its logit becomes
    0 (cosine set to 0, no gradient). Target logits are never filtered.

    Presets (``build_margin_head``): ArcFace (1.0, 0.5, 0.0); CosFace (1.0, 0.0, 0.4) -- arcface_torch's default
    m3 = 0.4, adopted over the 0.35 of the CosFace paper; SphereFace (1.35, 0.0, 0.0) and the combination CM1 (1.0,
    0.3, 0.2), both from the ArcFace paper's Table 2; s = 64. CM1 is cos(theta + 0.3) - 0.2, as in the paper and
    insightface's MXNet ``train.py``; arcface_torch's ``CombinedMarginLoss`` applies only m3 whenever m3 > 0 (m2 is
    dropped) and refuses m1 != 1.

    Args:
        s: logit scale.
        m1: multiplicative angular margin (> 0; 1 = none).
        m2: additive angular margin in radians (>= 0).
        m3: additive cosine margin (>= 0).
        interclass_filtering_threshold: cosine above which non-target logits are zeroed, in [0, 1); 0 = off.
        monotone_past_pi: continue the target past phi = pi with SphereFace's monotone extension instead of plain
            cos(phi); 0/1 accepted (``--head-args monotone_past_pi=1``).
    """

    kind = "softmax"

    def __init__(
        self,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        interclass_filtering_threshold: float = 0.0,
        monotone_past_pi: bool = False,
    ) -> None:
        super().__init__()
        if s <= 0 or m1 <= 0 or m2 < 0 or m3 < 0:
            raise ValueError(
                f"CombinedMargin needs s > 0, m1 > 0, m2 >= 0, m3 >= 0; got s={s}, m1={m1}, m2={m2}, m3={m3}"
            )
        if not 0.0 <= interclass_filtering_threshold < 1.0:
            raise ValueError(
                f"interclass_filtering_threshold must be in [0, 1) (0 = off), got {interclass_filtering_threshold}"
            )
        if monotone_past_pi not in (0, 1):
            raise ValueError(f"monotone_past_pi must be 0/1 (False/True), got {monotone_past_pi!r}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.monotone_past_pi = bool(monotone_past_pi)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}, "
            f"monotone_past_pi={self.monotone_past_pi}"
        )

    @torch.no_grad()
    def margin_cosine(self, cos_target: torch.Tensor) -> torch.Tensor:
        """``psi(theta) - m3`` for target cosines (any shape; clamped to [-1, 1]), float32, without gradient."""
        theta = torch.acos(cos_target.float().clamp(-1.0, 1.0))
        phi = self.m1 * theta + self.m2
        if not self.monotone_past_pi:
            return torch.cos(phi) - self.m3
        k = torch.floor(phi / math.pi).clamp_min(0.0)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return sign * torch.cos(phi) - 2.0 * k - self.m3

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """Margin logits.

        Args:
            cosine: (B, C) cosines.
            labels: (B,) target columns, -1 where the target column is not in ``cosine``.
            norms: ignored.

        Returns:
            (B, C) float32 logits.
        """
        _check_inputs(cosine, labels)
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            cos = cosine.float()
            logits = cos * self.s
            rows, cols = _target_index(labels)
            if self.interclass_filtering_threshold > 0:
                noisy = cos.detach() > self.interclass_filtering_threshold
                noisy[rows, cols] = False
                logits.masked_fill_(noisy, 0.0)
            if rows.numel():
                target = cos.detach()[rows, cols]
                # straight-through: add the margin as a constant, the gradient stays s
                logits.index_put_((rows, cols), (self.margin_cosine(target) - target) * self.s, accumulate=True)
        return logits


class AdaFace(nn.Module):
    """AdaFace: a margin adapted to image quality, with the feature norm as the quality proxy (Kim et al., CVPR 2022).

    With n the embedding norm (detached, clipped to [0.001, 100]) and EMA buffers mu, sigma of the batch norms::

        mu    <- t_alpha * mean(n) + (1 - t_alpha) * mu        (training mode only, before use)
        sigma <- t_alpha * std(n) + (1 - t_alpha) * sigma      (std with Bessel's correction, as torch.std)
        g     =  clip((n - mu) / (sigma + eps) * h, -1, 1)
        theta = acos(clamp(cos, -1 + eps, 1 - eps))
        target logit  = s * (cos(clip(theta - m * g, eps, pi - eps)) - (m + m * g))
        other logits  = s * cos

    The updated buffers are used for the current batch, as in the authors' code. Every row's norm counts in the batch
    statistics, including rows whose target column is held by another rank (label -1), which get no margin. A batch
    of one sample updates ``batch_mean`` only (its standard deviation is undefined). Buffers are not updated in eval
    mode; they are registered buffers, so they are checkpointed.

    Gradient: the exact derivative of the target logit, d/d cos = s * sin(theta - m g) / sin(theta) inside the
    clamps and 0 where a clamp is active (so finite at cos = +-1). Differences from the authors' code: non-target
    cosines are used as given (they clamp every cosine to [-1 + eps, 1 - eps]), and the head receives the cosines
    instead of holding the class centres.

    Args:
        s: logit scale.
        m: margin.
        h: concentration of the norm scaler (about 68 % of g in [-h, h]).
        t_alpha: EMA momentum of the norm statistics.
        eps: clamp tolerance for the cosine, the angle and the std denominator.
    """

    kind = "softmax"

    def __init__(
        self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01, eps: float = 1e-3
    ) -> None:
        super().__init__()
        if s <= 0 or m < 0 or h <= 0 or not 0.0 < t_alpha <= 1.0 or not 0.0 < eps < 0.5:
            raise ValueError(
                f"AdaFace needs s > 0, m >= 0, h > 0, 0 < t_alpha <= 1, 0 < eps < 0.5; "
                f"got s={s}, m={m}, h={h}, t_alpha={t_alpha}, eps={eps}"
            )
        self.s, self.m, self.h, self.t_alpha, self.eps = float(s), float(m), float(h), float(t_alpha), float(eps)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}, eps={self.eps}"

    @torch.no_grad()
    def _update_statistics(self, safe_norms: torch.Tensor) -> None:
        if safe_norms.numel() == 0:
            return
        self.batch_mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * safe_norms.mean())
        if safe_norms.numel() > 1:
            self.batch_std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * safe_norms.std())

    def margin_scaler(self, norms: torch.Tensor) -> torch.Tensor:
        """g = clip((clip(n, 0.001, 100) - mu) / (sigma + eps) * h, -1, 1) from the current buffers, (B,) float32."""
        safe = norms.detach().float().clamp(0.001, 100.0)
        return ((safe - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1.0, 1.0)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """Margin logits.

        Args:
            cosine: (B, C) cosines.
            labels: (B,) target columns, -1 where the target column is not in ``cosine``.
            norms: (B,) embedding norms before normalisation (required).

        Returns:
            (B, C) float32 logits.
        """
        _check_inputs(cosine, labels)
        if norms is None or norms.shape != labels.shape:
            got = None if norms is None else tuple(norms.shape)
            raise ValueError(
                f"AdaFace needs norms of shape {tuple(labels.shape)} (the embeddings' L2 norms), got {got}"
            )
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            if self.training:
                self._update_statistics(norms.detach().float().clamp(0.001, 100.0))
            g = self.margin_scaler(norms)
            cos = cosine.float()
            logits = cos * self.s
            rows, cols = _target_index(labels)
            if rows.numel():
                theta = torch.acos(cos[rows, cols].clamp(-1.0 + self.eps, 1.0 - self.eps))
                g_rows = g[rows]
                theta_m = (theta - self.m * g_rows).clamp(self.eps, math.pi - self.eps)
                target = torch.cos(theta_m) - (self.m + self.m * g_rows)
                logits.index_put_((rows, cols), target * self.s)
        return logits


class GBCosFace(nn.Module):
    """GB-CosFace: CosFace-style margins against a global boundary (Sun et al., 2022; docs/recognition.md).

    From the target cosine cos_p and the smooth maximum of the negatives cos_n = logsumexp_j(s * cos_j) / s (the scale
    inside the smooth maximum is s = 32, as in the authors' code; "logits x 64" in method.md is the 2s of the two-way
    cross-entropies below)::

        cos_v = (cos_p + cos_n) / 2                                   (detached)
        b     = cos_v + alpha * (p_v - cos_v)                         (detached)
        L_pos = CE(2s * [cos_p - m, b], 0)     = softplus(2s * (b - cos_p + m))
        L_neg = CE(2s * [b - m, cos_n], 0)     = softplus(2s * (cos_n - b + m))
        loss  = (mean(L_pos) + mean(L_neg)) / 2

    The global boundary p_v (buffer ``pv``) is an EMA of the batch mean of cos_v: on the first training batch it is
    set to that mean clamped to ``pv_range`` (``pv_initialised`` becomes True); each training batch uses the current
    ``pv`` and then stores ``clamp((1 - rate) * pv + rate * mean(cos_v), pv_range)``. This is the authors' update
    (they clamp before use instead of after the update, which gives the same sequence of used values). The batch mean
    is all-reduced over ranks (exact global mean) unless ``batch_is_global``; the authors initialise from each rank's
    own first batch, we from the global one, so all ranks agree from the start. In eval mode ``pv`` is not changed (an
    uninitialised head uses this batch's clamped mean).

    Args:
        s: scale (inside the smooth maximum; the two-way logits use 2s).
        m: margin.
        alpha: pull of the per-sample boundary towards p_v.
        rate: EMA rate of p_v.
        pv_range: (low, high) clamp of p_v.
    """

    kind = "positive_negative"

    def __init__(
        self,
        s: float = 32.0,
        m: float = 0.16,
        alpha: float = 0.15,
        rate: float = 0.01,
        pv_range: tuple[float, float] = (0.5, 0.7),
    ) -> None:
        super().__init__()
        low, high = (float(v) for v in pv_range)
        if s <= 0 or m < 0 or not 0.0 <= alpha <= 1.0 or not 0.0 < rate <= 1.0 or not -1.0 <= low <= high <= 1.0:
            raise ValueError(
                "GBCosFace needs s > 0, m >= 0, 0 <= alpha <= 1, 0 < rate <= 1, -1 <= pv_range low <= high <= 1; "
                f"got s={s}, m={m}, alpha={alpha}, rate={rate}, pv_range={tuple(pv_range)}"
            )
        self.s, self.m, self.alpha, self.rate = float(s), float(m), float(alpha), float(rate)
        self.pv_range = (low, high)
        self.register_buffer("pv", torch.tensor(0.0))
        self.register_buffer("pv_initialised", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, alpha={self.alpha}, rate={self.rate}, pv_range={self.pv_range}"

    @torch.no_grad()
    def _boundary(self, cos_v: torch.Tensor, batch_is_global: bool) -> torch.Tensor:
        """The p_v used for this batch (0-dim); in training mode also updates the buffers."""
        low, high = self.pv_range
        stats = torch.stack([cos_v.sum(), cos_v.new_tensor(float(cos_v.numel()))]).double()
        if self.training and not batch_is_global:
            all_reduce_sum(stats)
        batch_mean = (stats[0] / stats[1].clamp_min(1.0)).float()
        if not bool(self.pv_initialised):
            used = batch_mean.clamp(low, high)
            if not self.training:
                return used
            self.pv.copy_(used)
            self.pv_initialised.fill_(True)
        used = self.pv.clone()
        if self.training:
            self.pv.copy_(((1.0 - self.rate) * used + self.rate * batch_mean).clamp(low, high))
        return used

    def loss_from_parts(self, cos_p: torch.Tensor, cos_n: torch.Tensor, batch_is_global: bool = False) -> torch.Tensor:
        """GB-CosFace loss from the positive cosines and the negatives' smooth maximum.

        Args:
            cos_p: (B,) target cosines.
            cos_n: (B,) logsumexp_j(s * cos_j over the negative classes j) / s.
            batch_is_global: True when the B rows are already the batch of all ranks (Partial FC gathers it); False
                all-reduces the batch mean of cos_v over ranks (DDP without Partial FC; every rank must call this).

        Returns:
            Scalar float32 loss (mean over the B rows).
        """
        if cos_p.dim() != 1 or cos_p.shape != cos_n.shape:
            raise ValueError(f"cos_p and cos_n must both be (B,), got {tuple(cos_p.shape)} and {tuple(cos_n.shape)}")
        with torch.autocast(device_type=cos_p.device.type, enabled=False):
            cos_p, cos_n = cos_p.float(), cos_n.float()
            cos_v = ((cos_p + cos_n) / 2).detach()
            pv = self._boundary(cos_v, batch_is_global)
            boundary = cos_v + self.alpha * (pv - cos_v)
            loss_pos = F.softplus(2 * self.s * (boundary - cos_p + self.m))
            loss_neg = F.softplus(2 * self.s * (cos_n - boundary + self.m))
            return (loss_pos.mean() + loss_neg.mean()) / 2

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """GB-CosFace loss when every class is in ``cosine`` (no Partial FC).

        Args:
            cosine: (B, C) cosines over all classes, C >= 2.
            labels: (B,) target columns in [0, C).
            norms: ignored.

        Returns:
            Scalar float32 loss; under DDP the batch mean of cos_v is all-reduced (``batch_is_global=False``).
        """
        _check_inputs(cosine, labels, allow_missing=False)
        if cosine.shape[1] < 2:
            raise ValueError(
                f"GBCosFace needs at least 2 classes (one negative), got cosine of shape {tuple(cosine.shape)}"
            )
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            cos = cosine.float()
            index = labels.long()[:, None]
            cos_p = cos.gather(1, index).squeeze(1)
            negatives = (cos * self.s).scatter(1, index, float("-inf"))
            cos_n = torch.logsumexp(negatives, dim=1) / self.s
        return self.loss_from_parts(cos_p, cos_n, batch_is_global=False)


_PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "arcface": (CombinedMargin, dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)),
    "cosface": (CombinedMargin, dict(s=64.0, m1=1.0, m2=0.0, m3=0.4)),
    "sphereface": (CombinedMargin, dict(s=64.0, m1=1.35, m2=0.0, m3=0.0, monotone_past_pi=True)),
    "combined": (CombinedMargin, dict(s=64.0, m1=1.0, m2=0.3, m3=0.2)),
    "adaface": (AdaFace, {}),
    "gbcosface": (GBCosFace, {}),
}


def build_margin_head(name: str, **overrides: Any) -> nn.Module:
    """A margin head by name with its preset hyper-parameters, overridden by keyword arguments.

    Args:
        name: one of ``MARGIN_HEADS``.
        **overrides: constructor arguments of the head class (e.g. ``s=32``, ``interclass_filtering_threshold=0.4``).

    Returns:
        The head module.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown margin head {name!r}; choose one of {', '.join(MARGIN_HEADS)}")
    cls, preset = _PRESETS[name]
    head = cls(**{**preset, **overrides})
    logger.info("margin head %s: %s", name, head)
    return head
