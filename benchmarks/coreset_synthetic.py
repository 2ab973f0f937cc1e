"""Level-1 FaceCoresetNet experiment on synthetic embeddings: which template pooling survives long clips and
low-quality frames? (docs/coreset.md, section "Experiment")

World: identity centres mu uniform on the unit sphere in D = ``--dim`` dimensions. An image of quality q in [0, 1] is
normalize(mu + s(q) eps) with eps ~ N(0, I / D) and s(q) = 0.3 + 2.7 (1 - q) (cosine to mu about 0.96 at q = 1, 0.35
at q = 0); its norm is 10 + 30 q + N(0, 1) (norm as quality, as AdaFace's). A clip repeats one such draw with tiny
jitter (normalize(f + 0.05 eps'), the same norm up to N(0, 0.5)): near-duplicate video frames. Low-quality media
have q ~ U(0, 0.15), the others q ~ U(0.15, 1).

Training (the paper's protocol on the synthetic world): ``--train-identities`` identities, templates of N ~ U{1..20}
frames made of clips of min(3, U{1..remaining}) frames, every media low quality with probability 0.2; the aggregator
(K = 3) and an AdaFace head (s 48, m 0.8, h 0.333) over the training identities, AdamW (``--lr``, weight decay 1e-3,
none on gamma), ``--steps`` steps of ``--batch`` templates.

Evaluation, per setting of the sweep (clip length L x low-quality share rho): two templates per held-out identity,
each U{1..5} single images plus one clip of L frames; every media (single or clip) low quality with probability rho.
All genuine pairs and all impostor pairs; TAR at FAR 1e-3 and 1e-2 (insightface's closest-FPR rule). Poolings:

- ``mean``: mean of the unit features (every frame counts once);
- ``norm-sum``: sum of norm x unit (insightface's N1 without media ids);
- ``media-mean-sum``: mean per media with the true clip ids, then sum (insightface's N1 pooling, this project's IJB);
- ``fps gamma=0``, ``fps learned``: the core alone (K = 3, argmax farthest-point picks with gamma 0 / the trained
  gamma), its norm-scaled features averaged;
- ``coreset``: the trained aggregator.

Usage: ``python -m benchmarks.coreset_synthetic --threads 1 --output coreset_synthetic.json``
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import add_common_args, environment, save_results, setup
from model.coreset import CoresetAggregator, select_core
from model.margin_heads import build_margin_head
from model.partial_fc import PartialFC
from utils.evaluation.ijb import pair_scores, template_features
from utils.evaluation.roc import format_tar_table, roc_curve, tar_at_far

logger = logging.getLogger(__name__)

FARS = (1e-3, 1e-2)
LOW_Q = 0.15


class World:
    """Identity centres and the image model of the module docstring."""

    def __init__(self, identities: int, dim: int, generator: torch.Generator) -> None:
        self.dim, self.generator = dim, generator
        self.centres = F.normalize(torch.randn(identities, dim, generator=generator), dim=1)

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def media(self, identity: torch.Tensor, low: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Frames of media (one draw each, repeated ``lengths`` times with jitter): (unit features, norms)."""
        count = len(identity)
        u = torch.rand(count, generator=self.generator)
        quality = torch.where(low, LOW_Q * u, LOW_Q + (1 - LOW_Q) * u)
        spread = 0.3 + 2.7 * (1.0 - quality)
        base = F.normalize(
            self.centres[identity] + spread[:, None] * self._randn(count, self.dim) / self.dim**0.5, dim=1
        )
        norms = (10.0 + 30.0 * quality + self._randn(count)).clamp_min(1.0)
        frames = base.repeat_interleave(lengths, 0)
        jitter = 0.05 * self._randn(len(frames), self.dim) / self.dim**0.5
        frame_norms = (norms.repeat_interleave(lengths) + 0.5 * self._randn(len(frames))).clamp_min(1.0)
        return F.normalize(frames + jitter, dim=1), frame_norms


def _pad(rows: list[torch.Tensor], norms: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    width = max(len(r) for r in rows)
    units = torch.zeros(len(rows), width, rows[0].shape[1])
    padded_norms = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r, n) in enumerate(zip(rows, norms)):
        units[i, : len(r)], padded_norms[i, : len(r)], mask[i, : len(r)] = r, n, True
    return units, padded_norms, mask


def training_batch(world: World, identities: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Templates of the paper's protocol for ``identities`` (module docstring): (units, norms, mask)."""
    rows, norms = [], []
    for identity in identities.tolist():
        remaining, lengths = int(rng.integers(1, 21)), []
        while remaining:
            lengths.append(min(3, int(rng.integers(1, remaining + 1))))
            remaining -= lengths[-1]
        count = len(lengths)
        low = torch.from_numpy(rng.random(count) < 0.2)
        u, n = world.media(torch.full((count,), identity), low, torch.tensor(lengths))
        rows.append(u)
        norms.append(n)
    return _pad(rows, norms)


def test_templates(world: World, identities: range, clip: int, low_share: float, rng: np.random.Generator):
    """Two templates per identity: U{1..5} singles + one clip of ``clip`` frames; media low quality w.p. ``low_share``.

    Returns:
        (units, norms, mask, media ids (padded, -1), owner identity per template).
    """
    rows, norms, medias, owner = [], [], [], []
    for identity in identities:
        for _ in range(2):
            singles = int(rng.integers(1, 6))
            lengths = torch.tensor([clip] + [1] * singles)
            low = torch.from_numpy(rng.random(len(lengths)) < low_share)
            u, n = world.media(torch.full((len(lengths),), identity), low, lengths)
            rows.append(u)
            norms.append(n)
            medias.append(torch.arange(len(lengths)).repeat_interleave(lengths))
            owner.append(identity)
    units, norms_p, mask = _pad(rows, norms)
    media = torch.full(mask.shape, -1, dtype=torch.int64)
    for i, m in enumerate(medias):
        media[i, : len(m)] = m
    return units, norms_p, mask, media, torch.tensor(owner)


def train(world: World, identities: int, args: argparse.Namespace) -> CoresetAggregator:
    """The aggregator trained with an AdaFace head on the training identities."""
    torch.manual_seed(args.seed)
    model = CoresetAggregator(args.dim, 3)
    head = PartialFC(args.dim, identities, build_margin_head("adaface", s=48.0, m=0.8, h=0.333))
    rest = [p for p in [*model.parameters(), *head.parameters()] if p is not model.gamma]
    optimizer = torch.optim.AdamW(
        [{"params": [model.gamma], "weight_decay": 0.0}, {"params": rest, "weight_decay": 1e-3}], lr=args.lr
    )
    rng = np.random.default_rng(args.seed)
    model.train()
    head.train()
    for step in range(args.steps):
        labels = torch.from_numpy(rng.integers(0, identities, args.batch))
        units, norms, mask = training_batch(world, labels, rng)
        unit, norm = model(units, norms, mask)
        loss = head(unit * norm, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            logger.info("step %d: loss %.3f, gamma %.4f", step, loss.item(), model.gamma.item())
    return model.eval()


def _fps_core_mean(units, norms, mask, gamma: float) -> torch.Tensor:
    rows, valid = select_core(units, norms, gamma, 3, mask)
    core = rows @ (units * norms[..., None])
    weights = valid.float()[..., None]
    return (core * weights).sum(1) / weights.sum(1)


@torch.no_grad()
def poolings(model: CoresetAggregator, units, norms, mask, media) -> dict[str, torch.Tensor]:
    """(T, D) template features of every pooling of the module docstring."""
    weights = mask.float()[..., None]
    flat_template = torch.arange(len(units))[:, None].expand_as(mask)[mask]
    scaled = (units * norms[..., None])[mask].double()
    _, media_mean = template_features(scaled, flat_template, media[mask])
    out = {
        "mean": (units * weights).sum(1) / weights.sum(1),
        "norm-sum": (units * norms[..., None] * weights).sum(1),
        "media-mean-sum": media_mean,
        "fps gamma=0": _fps_core_mean(units, norms, mask, 0.0),
        "fps learned": _fps_core_mean(units, norms, mask, model.gamma.item()),
        "coreset": model(units, norms, mask)[0],
    }
    return {name: F.normalize(feats.float(), dim=1) for name, feats in out.items()}


def evaluate(model: CoresetAggregator, world: World, identities: range, clip: int, low_share: float, seed: int):
    """TAR@FAR of every pooling on held-out templates of one sweep setting."""
    units, norms, mask, media, owner = test_templates(world, identities, clip, low_share, np.random.default_rng(seed))
    first, second = torch.triu_indices(len(owner), len(owner), 1)
    labels = owner[first] == owner[second]
    table = {}
    for name, feats in poolings(model, units, norms, mask, media).items():
        scores = pair_scores(feats, first, second)
        table[name] = tar_at_far(roc_curve(scores, labels), fars=FARS)
    return table


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the experiment."""
    parser = argparse.ArgumentParser(description="FaceCoresetNet on synthetic embeddings (level 1).")
    parser.add_argument("--dim", type=int, default=128, help="embedding size (default: 128)")
    parser.add_argument("--train-identities", type=int, default=500, help="training identities (default: 500)")
    parser.add_argument("--test-identities", type=int, default=300, help="held-out identities (default: 300)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default: 1500)")
    parser.add_argument("--batch", type=int, default=64, help="templates per step (default: 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--clips", type=int, nargs="+", default=[1, 10, 30], help="clip lengths (default: 1 10 30)")
    parser.add_argument(
        "--low-shares", type=float, nargs="+", default=[0.0, 0.35, 0.7], help="low-quality shares (default: 0 .35 .7)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    add_common_args(parser, device=False)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed)
    world = World(args.train_identities + args.test_identities, args.dim, generator)
    model = train(world, args.train_identities, args)
    held_out = range(args.train_identities, args.train_identities + args.test_identities)
    results, tables = [], {}
    for clip in args.clips:
        for share in args.low_shares:
            table = evaluate(model, world, held_out, clip, share, args.seed + 1)
            results.append(
                {
                    "clip": clip,
                    "low_share": share,
                    "tar_at_far": {k: {str(f): t for f, t in v.items()} for k, v in table.items()},
                }
            )
            tables[f"L={clip}, low={share}"] = table
    text = []
    for setting, table in tables.items():
        text.append(f"### {setting}\n\n" + format_tar_table(table))
    logger.info("TAR (%%) at FAR on held-out templates:\n%s", "\n\n".join(text))
    return {"gamma": model.gamma.item(), "sweep": results, "markdown": "\n\n".join(text)}


def main(args: argparse.Namespace) -> int:
    setup(args.threads)
    save_results(
        {"args": vars(args), "environment": environment(torch.device("cpu")), "results": run(args)}, args.output, logger
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
