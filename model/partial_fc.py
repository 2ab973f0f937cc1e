"""Partial FC: class centres sharded over ranks, with sampled negative centres (An et al., CVPR 2022).

Rank r holds the contiguous class block ``[start, end)`` of ``utils.distributed.contiguous_shard(num_classes)`` as
its ``weight`` parameter (not wrapped in DDP). Each step:

1. the ranks' embeddings (with autograd) and labels are all-gathered in rank order, so every rank sees the global
   batch; the backward of the gather sums the gradients of all ranks and hands each rank its own rows, so a rank's
   embeddings get the gradient of the global loss (local batch sizes may differ: they are exchanged as host integers
   over gloo, ``utils.distributed.all_gather_ints``, so the exchange does not wait for the device);
2. with ``sample_rate`` r < 1 (training mode only), each rank keeps its positive centres (classes of the global
   batch in its block) plus uniformly drawn negatives, ``max(#positives, int(r * num_local))`` centres in all;
3. cosines ``normalize(emb) @ normalize(weight[index]).T`` in float32 (autocast off) go to the margin head with the
   labels remapped to columns of the kept centres (-1 where the target lives on another rank);
4. softmax heads: a distributed softmax cross-entropy (row maxima all-reduced with MAX, sums of exponentials and
   target logits all-reduced with SUM), averaged over the global batch; optional constant per-sample weights
   (TransFace's EHSM), gathered like the labels, give sum_i w_i l_i / N (or / sum_i w_i). ``positive_negative``
   heads (GB-CosFace): the target cosine and the logsumexp over the negative centres are assembled the same way and
   passed to ``head.loss_from_parts(cos_p, cos_n, batch_is_global=True)``.

The loss is replicated: every rank computes the same value. The SUM all-reduces feeding it therefore pass gradients
through unchanged (each rank already holds d loss / d sum), while the embedding gather reduces gradients over ranks.
Under DDP, which averages the backbone gradients over W ranks, the backbone then receives 1/W of the global-loss
gradient (arcface_torch multiplies the embedding gradient by W inside its gather to compensate); scale it with
``embeddings.register_hook(lambda g: g * world_size)`` where the plain global-loss gradient is wanted.

Labels are checked (all in [0, num_classes), else a ValueError naming the label, its rank and num_classes, raised
on every rank) on the first forward after construction and after each ``train()`` / ``eval()`` call: the training
loop calls ``train()`` at the start of every epoch, so once per epoch. The check reads the global labels on the host;
the other steps read nothing back for it.

Reproducibility: the initial centres (normal, std 0.01) are drawn in blocks of ``INIT_BLOCK`` classes, block k from a
generator seeded with ``derive_seed(seed, 0, k)``, so the full matrix is the same for any world size; the negatives of
training step t on rank r come from a generator seeded with ``derive_seed(seed, 1, t, r)``, where t is ``step`` (it
counts the sampled steps). ``seed`` and ``step`` are Python integers, so drawing reads nothing from the device; the
state dict holds them as int64 tensors under the keys ``seed`` and ``step``, as when they were buffers, so
checkpoints of either kind load. With world size 1 and no process group the module is a plain full classifier.

Checkpoints: ``gather_classes`` / ``full_weight`` assemble a (num_classes, ...) tensor on rank 0 only, in rounds of
``CHECKPOINT_BLOCK`` classes moved to the CPU as they arrive (``utils.distributed.gather_shards_to_primary``), so no
rank holds more than a block of other ranks' classes on its device; ``shard_classes`` / ``load_full_weight`` slice a
saved tensor for any world size.

References: insightface ``recognition/arcface_torch/partial_fc_v2.py`` (``PartialFC_V2``, ``DistCrossEntropyFunc``,
``AllGatherFunc``); "Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs by
Partial FC" (An et al., CVPR 2022).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils.distributed import (
    all_gather_ints,
    contiguous_shard,
    gather_shards_to_primary,
    get_rank,
    get_world_size,
)

logger = logging.getLogger(__name__)

INIT_BLOCK = 4096  # classes per generator seed of the initial centres
WEIGHT_NORMALISATIONS = ("batch", "weights")  # per-sample weighted loss divided by N or by the sum of the weights
CHECKPOINT_BLOCK = 65_536  # classes rank 0 receives per round when gathering centres or their optimiser state
_MASK64 = (1 << 64) - 1


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chained over them; the same on every platform and Python version)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def _gather_rows(tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's (counts[r], ...) tensor concatenated in rank order (padded to the longest for the collective)."""
    world, longest = len(counts), max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = tensor.new_empty((world * longest, *tensor.shape[1:]))
    dist.all_gather_single(out, padded)
    if all(n == longest for n in counts):
        return out
    return torch.cat([out[r * longest : r * longest + n] for r, n in enumerate(counts)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of rows; the backward sums the gathered gradient over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ctx.counts, ctx.rank = counts, get_rank()
        return _gather_rows(local.contiguous(), counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        counts, longest = ctx.counts, max(ctx.counts)
        padded = grad.new_zeros((len(counts) * longest, *grad.shape[1:]))
        offset = 0
        for r, n in enumerate(counts):
            padded[r * longest : r * longest + n] = grad[offset : offset + n]
            offset += n
        mine = grad.new_empty((longest, *grad.shape[1:]))
        dist.reduce_scatter_single(mine, padded)
        return mine[: counts[ctx.rank]], None


class _AllReduceReplicated(torch.autograd.Function):
    """SUM all-reduce whose result feeds a computation replicated on every rank: the gradient passes unchanged.

    With y = sum_r x_r and a loss L(y) computed identically on every rank, each rank's backward receives dL/dy, which
    is dL/dx_r; summing the ranks' gradients (``torch.distributed.nn.functional.all_reduce``) would give W dL/dy.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _CosineToCentres(torch.autograd.Function):
    """``normalized_emb @ normalize(weight).T`` without a normalised (c, D) copy of the centres.

    With raw = e W^T, inv_j = 1 / max(||w_j||, 1e-12) and cos = raw * inv (as ``F.normalize``), the gradients are
    dL/de = (G * inv) W and dL/dw_j = ((G * inv)^T e)_j - inv_j^2 (sum_i G_ij cos_ij) w_j (second term only where
    ||w_j|| > 1e-12): two matrix products and one pass over the centres, where autograd through ``F.normalize`` makes
    several (c, D) temporaries.
    """

    @staticmethod
    def forward(ctx, emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        norms = weight.norm(dim=1)
        inv = norms.clamp_min(1e-12).reciprocal()
        cosine = (emb @ weight.T).mul_(inv)
        ctx.save_for_backward(emb, weight, inv, cosine, norms > 1e-12)
        return cosine

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        emb, weight, inv, cosine, scaled = ctx.saved_tensors
        grad_scaled = grad * inv
        grad_emb = grad_scaled @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            coef = torch.where(scaled, inv * inv * (grad * cosine).sum(dim=0), 0.0)
            grad_weight = (grad_scaled.T @ emb).addcmul_(weight, coef[:, None], value=-1.0)
        return grad_emb, grad_weight


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Row maxima of (N, c), -inf for c = 0 (a rank that kept no centre)."""
    if x.shape[1] == 0:
        return x.new_full((x.shape[0],), float("-inf"))
    return x.amax(dim=1)


def shared_seed() -> int:
    """A seed drawn from torch's global generator on rank 0 and broadcast, so every rank holds the same one."""
    box = [int(torch.randint(0, 2**62, (1,)))]
    if get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


class CounterState(nn.Module):
    """A module whose Python-integer attributes named in ``counters`` are saved in its state dict as int64 tensors
    (so drawing from seeds derived from them reads nothing from the device, and checkpoints of buffers load)."""

    counters: tuple[str, ...] = ()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.counters:
            destination[prefix + name] = torch.tensor(getattr(self, name), dtype=torch.int64)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        counters = {}
        for name in self.counters:
            key = prefix + name
            value = state_dict.pop(key, None)  # load_state_dict hands each module its own copy of the dict
            if value is None:
                if strict:
                    missing_keys.append(key)
            elif torch.is_tensor(value) and value.numel() == 1 and not value.is_floating_point():
                counters[name] = int(value)
            else:
                error_msgs.append(f"{key}: expected a one-element integer tensor, got {value!r}")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name, value in counters.items():
            setattr(self, name, value)


class PartialFC(CounterState):
    """Model-parallel margin-softmax classifier with optional sampling of negative class centres.

    Args:
        embedding_size: D.
        num_classes: total number of classes over all ranks (>= world size).
        head: a margin head from ``model.margin_heads`` (``kind`` "softmax" or "positive_negative").
        sample_rate: fraction r in (0, 1] of this rank's centres used per training step (``--sample-rate``).
        seed: seed of the initial centres and of the sampling; None draws one from torch's global generator on rank 0
            and broadcasts it.
    """

    counters = ("seed", "step")

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        head: nn.Module,
        sample_rate: float = 1.0,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"--sample-rate must be in (0, 1], got {sample_rate}")
        kind = getattr(head, "kind", None)
        if kind not in ("softmax", "positive_negative"):
            raise ValueError(f"head {type(head).__name__} has kind {kind!r}; expected 'softmax' or 'positive_negative'")
        self.world_size, self.rank = get_world_size(), get_rank()
        if embedding_size <= 0 or num_classes < max(self.world_size, 2 if kind == "positive_negative" else 1):
            raise ValueError(
                f"PartialFC needs embedding_size > 0 and num_classes >= world size {self.world_size} (>= 2 for "
                f"{type(head).__name__}); got embedding_size={embedding_size}, num_classes={num_classes}"
            )
        self.embedding_size, self.num_classes, self.sample_rate = embedding_size, num_classes, float(sample_rate)
        shard = contiguous_shard(num_classes, self.rank, self.world_size)
        self.class_start, self.class_end = shard.start, shard.stop
        self.num_local = shard.stop - shard.start
        self.seed = shared_seed() if seed is None else int(seed)
        self.step = 0
        self.weight = nn.Parameter(self._initial_rows(self.seed))
        self.head = head
        self._check_labels_next = True
        logger.info(
            "PartialFC: classes [%d, %d) of %d on rank %d, D=%d, sample rate %g, %s head",
            self.class_start,
            self.class_end,
            num_classes,
            self.rank,
            embedding_size,
            sample_rate,
            type(head).__name__,
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"classes=[{self.class_start}, {self.class_end}), sample_rate={self.sample_rate}"
        )

    def train(self, mode: bool = True) -> PartialFC:
        """Set the mode; the next forward checks its labels (the training loop calls this every epoch)."""
        self._check_labels_next = True
        return super().train(mode)

    def _initial_rows(self, seed: int) -> torch.Tensor:
        """This rank's rows of the world-size independent N(0, 0.01^2) initial centre matrix."""
        rows = torch.empty(self.num_local, self.embedding_size)
        for block in range(self.class_start // INIT_BLOCK, (self.class_end - 1) // INIT_BLOCK + 1):
            gen = torch.Generator().manual_seed(derive_seed(seed, 0, block))
            values = torch.randn(INIT_BLOCK, self.embedding_size, generator=gen).mul_(0.01)
            offset = block * INIT_BLOCK
            first, last = max(self.class_start, offset), min(self.class_end, offset + INIT_BLOCK)
            rows[first - self.class_start : last - self.class_start] = values[first - offset : last - offset]
        return rows

    def gather_classes(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's (num_local, ...) tensor into (num_classes, ...) on rank 0, on the CPU (collective).

        The classes travel in rounds of ``CHECKPOINT_BLOCK`` (``utils.distributed.gather_shards_to_primary``): rank 0
        holds the CPU result and one round's buffers, the other ranks nothing beyond one padded chunk.

        Args:
            tensor: a tensor whose first dimension is this rank's classes (the weight, its gradient, optimiser state).

        Returns:
            The full tensor in class order (detached, on the CPU) on rank 0; None on the other ranks.
        """
        if tensor.shape[0] != self.num_local:
            raise ValueError(
                f"gather_classes expects {self.num_local} rows (this rank's classes), got {tuple(tensor.shape)}"
            )
        return gather_shards_to_primary(tensor, self.num_classes, CHECKPOINT_BLOCK)

    def shard_classes(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows ``[start, end)`` of a (num_classes, ...) tensor (a copy), for any world size."""
        if full.shape[0] != self.num_classes:
            raise ValueError(f"shard_classes expects {self.num_classes} rows (all classes), got {tuple(full.shape)}")
        return full[self.class_start : self.class_end].clone()

    def full_weight(self) -> torch.Tensor | None:
        """The (num_classes, D) centre matrix on the CPU on rank 0, None on the other ranks (collective)."""
        return self.gather_classes(self.weight)

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Load this rank's slice of a (num_classes, D) centre matrix saved with any world size."""
        if tuple(full.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"load_full_weight expects a ({self.num_classes}, {self.embedding_size}) centre matrix, "
                f"got {tuple(full.shape)}"
            )
        self.weight.copy_(self.shard_classes(full).to(self.weight))

    def _batch_sizes(self, embeddings: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Every rank's batch size (exchanged on the host); raises when this rank's shapes do not fit."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be (b, {self.embedding_size}), got {tuple(embeddings.shape)}")
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(
                f"labels must be ({embeddings.shape[0]},) to match the embeddings, got {tuple(labels.shape)}"
            )
        return all_gather_ints(labels.shape[0]) if self.world_size > 1 else [labels.shape[0]]

    def _check_labels(self, labels: torch.Tensor, counts: list[int]) -> None:
        """Raise (on every rank: all hold the global batch) when a label lies outside [0, num_classes).

        Args:
            labels: the global batch's labels, rank after rank.
            counts: every rank's batch size.
        """
        bad = (labels < 0) | (labels >= self.num_classes)
        if not bool(bad.any()):
            return
        first = int(torch.nonzero(bad)[0])
        rank, start = 0, 0
        while first >= start + counts[rank]:
            start += counts[rank]
            rank += 1
        raise ValueError(
            f"label {int(labels[first])} (rank {rank}, {int(bad[start : start + counts[rank]].sum())} bad in its "
            f"batch) is outside [0, num_classes) with num_classes={self.num_classes}"
        )

    def _select(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Kept centre indices (None = all) and the labels as columns of the kept centres (-1 when not here)."""
        local = labels - self.class_start
        here = (labels >= self.class_start) & (labels < self.class_end)
        num_sample = int(self.sample_rate * self.num_local)
        if not self.training or num_sample >= self.num_local:
            return None, torch.where(here, local, -1)
        positives = torch.unique(local[here])
        if num_sample <= positives.numel():
            index = positives
        else:
            gen = torch.Generator(device=labels.device)
            gen.manual_seed(derive_seed(self.seed, 1, self.step, self.rank))
            scores = torch.rand(self.num_local, generator=gen, device=labels.device)
            scores[positives] = 2.0
            index = torch.topk(scores, num_sample, sorted=False).indices.sort().values
        self.step += 1
        columns = torch.searchsorted(index, local.clamp(0, self.num_local - 1))
        return index, torch.where(here, columns, -1)

    def _all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def _all_reduce_replicated(self, tensor: torch.Tensor) -> torch.Tensor:
        return _AllReduceReplicated.apply(tensor) if self.world_size > 1 else tensor

    def _softmax_loss(
        self,
        logits: torch.Tensor,
        cosine: torch.Tensor,
        columns: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
        normalise: str = "batch",
    ) -> dict[str, torch.Tensor]:
        rows = torch.nonzero(columns >= 0).squeeze(1)
        cols = columns[rows]
        with torch.no_grad():
            maxima = self._all_reduce_max(torch.stack([_row_max(logits), _row_max(cosine)]))
        sum_exp = torch.exp(logits - maxima[0][:, None]).sum(dim=1)
        target_logit = logits.new_zeros(logits.shape[0]).index_put((rows,), logits[rows, cols])
        target_cos = cosine.new_zeros(cosine.shape[0]).index_put((rows,), cosine.detach()[rows, cols])
        sums = self._all_reduce_replicated(torch.stack([sum_exp, target_logit, target_cos]))
        per_sample = torch.log(sums[0]) + maxima[0] - sums[1]
        if sample_weight is None:
            loss = per_sample.mean()
        else:
            denominator = sample_weight.sum() if normalise == "weights" else per_sample.shape[0]
            loss = (sample_weight * per_sample).sum() / denominator
        return {"loss": loss, "accuracy": (sums[2].detach() >= maxima[1]).float().mean()}

    def _positive_negative_loss(self, cosine: torch.Tensor, columns: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = torch.nonzero(columns >= 0).squeeze(1)
        cols = columns[rows]
        scale = float(self.head.s)
        negatives = (cosine * scale).index_put((rows, cols), cosine.new_tensor(float("-inf")))
        with torch.no_grad():
            maxima = self._all_reduce_max(torch.stack([_row_max(negatives), _row_max(cosine)]))
        if bool(torch.isinf(maxima[0]).any()):
            raise ValueError(
                f"{type(self.head).__name__} needs a negative centre for every sample, but some sample's only kept "
                f"centre is its own class; raise --sample-rate (now {self.sample_rate})"
            )
        sum_exp = torch.exp(negatives - maxima[0][:, None]).sum(dim=1)
        target_cos = cosine.new_zeros(cosine.shape[0]).index_put((rows,), cosine[rows, cols])
        sums = self._all_reduce_replicated(torch.stack([sum_exp, target_cos]))
        cos_n = (torch.log(sums[0]) + maxima[0]) / scale
        loss = self.head.loss_from_parts(sums[1], cos_n, batch_is_global=True)
        return {"loss": loss, "accuracy": (sums[1].detach() >= maxima[1]).float().mean()}

    def forward(
        self,
        local_embeddings: torch.Tensor,
        local_labels: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
        *,
        weight_normalise: str = "batch",
    ) -> dict[str, torch.Tensor]:
        """Margin-softmax loss of the global batch over this rank's (sampled) centres; collective over all ranks.

        Args:
            local_embeddings: (b, D) this rank's embeddings (not normalised; any float dtype).
            local_labels: (b,) class ids in [0, num_classes) (checked on the first forward after ``train()`` /
                ``eval()``, see the module docstring).
            sample_weight: optional (b,) per-sample weights of this rank's samples (softmax heads only; TransFace's
                EHSM). They are constants (detached) and gathered like the labels; the loss becomes
                sum_i w_i l_i / N over the global batch of N samples, or / sum_i w_i with ``weight_normalise``
                "weights".
            weight_normalise: "batch" (divide by N, the release's) or "weights" (divide by the sum of the weights).

        Returns:
            ``{"loss": scalar float32 (mean over the global batch, the same on every rank), "accuracy": top-1 of the
            cosines over the kept centres (target cosine >= every kept cosine), detached}``.
        """
        labels = local_labels.reshape(-1).long()
        counts = self._batch_sizes(local_embeddings, labels)
        if sample_weight is not None:
            sample_weight = self._check_sample_weight(sample_weight, labels.shape[0], weight_normalise)
        if self.world_size > 1:
            embeddings = _GatherWithGrad.apply(local_embeddings, counts)
            labels = _gather_rows(labels, counts)
            if sample_weight is not None:
                sample_weight = _gather_rows(sample_weight, counts)
        else:
            embeddings = local_embeddings
        if self._check_labels_next:
            self._check_labels(labels, counts)
            self._check_labels_next = False
        index, columns = self._select(labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.float()
            norms = emb.norm(dim=1)
            weight = (self.weight if index is None else self.weight[index]).float()
            cosine = _CosineToCentres.apply(F.normalize(emb, dim=1), weight)
            if self.head.kind == "softmax":
                logits = self.head(cosine, columns, norms)
                return self._softmax_loss(logits, cosine, columns, sample_weight, weight_normalise)
            return self._positive_negative_loss(cosine, columns)

    def _check_sample_weight(self, sample_weight: torch.Tensor, rows: int, normalise: str) -> torch.Tensor:
        """The weights as a detached float32 (b,) vector; raises for a head or shape they do not apply to."""
        if self.head.kind != "softmax":
            raise ValueError(
                f"per-sample loss weights (--ehsm) need a softmax margin head; {type(self.head).__name__} is "
                f"{self.head.kind!r}"
            )
        if normalise not in WEIGHT_NORMALISATIONS:
            raise ValueError(f"weight normalisation {normalise!r}: expected one of {', '.join(WEIGHT_NORMALISATIONS)}")
        if sample_weight.shape != (rows,):
            raise ValueError(f"sample_weight must be ({rows},) to match the labels, got {tuple(sample_weight.shape)}")
        return sample_weight.detach().float()
