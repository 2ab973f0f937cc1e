"""GCD contrastive objective (docs/method.md, section 6): InfoNCE on all samples + SupCon on labelled samples.

References:
    - SimCLR InfoNCE (Chen et al., ICML 2020) as used by GCD (Vaze et al., CVPR 2022, `info_nce_logits`).
    - Supervised Contrastive Learning (Khosla et al., NeurIPS 2020), github HobbitLong/SupContrast.
"""

import logging
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _split_views(z: torch.Tensor, num_samples: int) -> int:
    """Number of views V when `z` stacks V views of `num_samples` samples view-major."""
    if num_samples <= 0 or z.shape[0] % num_samples or z.shape[0] // num_samples < 2:
        raise ValueError(
            f"features of shape {tuple(z.shape)} must stack >= 2 views of {num_samples} samples ([view 1; view 2])"
        )
    return z.shape[0] // num_samples


def info_nce_loss(z: torch.Tensor, temperature: float = 1.0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE over all rows: L = -mean_i log(exp(S_ii+ / tau) / sum_{j != i} exp(S_ij / tau)), S = z z^T.

    Args:
        z: Features (2B, d) stacked [all view 1; all view 2]; L2-normalised here (float32).
        temperature: tau (`--temperature`, 1.0).
        mask: Optional (B,) bool selecting the samples that take part (`--contrast-unlabel-only`).

    Returns:
        Scalar loss (0 with a graph when no sample is selected).
    """
    if z.shape[0] % 2:
        raise ValueError(f"info_nce_loss expects [view 1; view 2] rows, got {z.shape[0]} rows")
    z = F.normalize(z.float(), dim=-1)
    if mask is not None:
        view1, view2 = z.chunk(2)
        z = torch.cat([view1[mask], view2[mask]])
    n = z.shape[0] // 2
    if n == 0:
        return z.sum() * 0.0
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.arange(2 * n, device=z.device).add(n).remainder(2 * n)
    return F.cross_entropy(logits, positives)


def supcon_loss(
    z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07, base_temperature: float = 0.07
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., "all" anchors) over labelled samples.

    L = mean_a -(tau / tau_b) mean_{p in P(a)} log(exp(z_a.z_p / tau) / sum_{k != a} exp(z_a.z_k / tau)), with P(a)
    every other view of the same label (the anchor's other view included) and the row maximum subtracted.

    Args:
        z: Features (V*n, d) of n labelled samples, view-major ([all view 1; all view 2; ...]); used as given.
        labels: Labels (n,).
        temperature: tau (0.07).
        base_temperature: tau_b (0.07).

    Returns:
        Scalar loss (0 with a graph when n == 0).
    """
    z = z.float()
    if labels.numel() == 0:
        return z.sum() * 0.0
    views = _split_views(z, labels.numel())
    labels = labels.reshape(-1).repeat(views)
    logits = (z @ z.T) / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    mean_log_prob_pos = (log_prob * positives).sum(dim=1) / positives.sum(dim=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def gcd_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    *,
    sup_con_weight: float = 0.35,
    temperature: float = 1.0,
    sup_con_temperature: float = 0.07,
    contrast_unlabel_only: bool = False,
) -> dict[str, torch.Tensor]:
    """GCD objective L = (1 - w) L_u + w L_s, in float32; a batch without labelled samples skips SupCon.

    Args:
        z: Projections (2B, d), [all view 1; all view 2].
        labels: Labels (B,) (only labelled entries are read).
        labelled_mask: (B,) bool, True for labelled samples.
        sup_con_weight: w (`--sup-con-weight`, 0.35).
        temperature: InfoNCE temperature (`--temperature`, 1.0).
        sup_con_temperature: SupCon temperature and base temperature (0.07).
        contrast_unlabel_only: Restrict InfoNCE to unlabelled samples.

    Returns:
        {"loss", "loss_unsup", "loss_sup", "has_labelled"} (scalars; `has_labelled` bool).
    """
    labelled_mask = labelled_mask.to(device=z.device, dtype=torch.bool).reshape(-1)
    if z.shape[0] != 2 * labelled_mask.numel() or labels.numel() != labelled_mask.numel():
        raise ValueError(
            f"gcd_loss: {z.shape[0]} feature rows, {labels.numel()} labels and {labelled_mask.numel()} mask entries;"
            " expected 2B rows and B labels / mask entries"
        )
    with torch.autocast(device_type=z.device.type, enabled=False):
        return _gcd_loss_fp32(
            z.float(), labels, labelled_mask, sup_con_weight, temperature, sup_con_temperature, contrast_unlabel_only
        )


def _gcd_loss_fp32(
    z: torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    sup_con_weight: float,
    temperature: float,
    sup_con_temperature: float,
    contrast_unlabel_only: bool,
) -> dict[str, torch.Tensor]:
    """Body of `gcd_loss`, called with autocast off so the similarity logits are float32."""
    loss_unsup = info_nce_loss(z, temperature, mask=~labelled_mask if contrast_unlabel_only else None)
    loss = (1.0 - sup_con_weight) * loss_unsup
    has_labelled = bool(labelled_mask.any())
    if has_labelled:
        view1, view2 = z.chunk(2)
        sup_z = torch.cat([view1[labelled_mask], view2[labelled_mask]])
        loss_sup = supcon_loss(sup_z, labels.to(z.device)[labelled_mask], sup_con_temperature, sup_con_temperature)
        loss = loss + sup_con_weight * loss_sup
    else:
        loss_sup = torch.zeros((), device=z.device)
    return {
        "loss": loss,
        "loss_unsup": loss_unsup.detach(),
        "loss_sup": loss_sup.detach(),
        "has_labelled": torch.tensor(has_labelled, device=z.device),
    }
