"""Partial FC: equality with a plain full classifier (1 and 2 processes), sampling, errors, checkpoint helpers."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import load_worker, run_torchrun_worker
from model.margin_heads import build_margin_head
from model.partial_fc import INIT_BLOCK, PartialFC
from utils.distributed import contiguous_shard

WORKER = Path(__file__).with_name("_partial_fc_dist_worker.py")
worker = load_worker(WORKER)


def full_classifier_step(head, embeddings, labels, weight):
    """Loss and gradients of the plain (unsharded, unsampled) margin classifier."""
    emb = embeddings.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    cosine = F.normalize(emb, dim=1) @ F.normalize(w, dim=1).T
    if head.kind == "softmax":
        loss = F.cross_entropy(head(cosine, labels, emb.norm(dim=1)), labels)
    else:
        loss = head(cosine, labels)
    loss.backward()
    return loss.detach(), emb.grad, w.grad


def weighted_classifier_step(data: dict, weights: torch.Tensor, normalise: str) -> tuple[torch.Tensor, ...]:
    """Loss and gradients of sum_i w_i CE_i / N (or / sum_i w_i) through a plain full ArcFace classifier."""
    emb = data["embeddings"][0].clone().requires_grad_(True)
    w = data["weight"].clone().requires_grad_(True)
    labels = data["labels"][0]
    cosine = F.normalize(emb, dim=1) @ F.normalize(w, dim=1).T
    per_sample = F.cross_entropy(build_margin_head("arcface")(cosine, labels), labels, reduction="none")
    loss = (weights * per_sample).sum() / (weights.sum() if normalise == "weights" else len(labels))
    loss.backward()
    return loss.detach(), emb.grad, w.grad


def assert_matches_full_classifier(run: dict, name: str) -> None:
    head = build_margin_head(name, **worker.HEAD_ARGS.get(name, {}))
    data = run["data"]
    for step, got in enumerate(run["steps"]):
        loss, emb_grad, w_grad = full_classifier_step(
            head, data["embeddings"][step], data["labels"][step], data["weight"]
        )
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5), (name, step)
        # float32: sums in another order (ranks, fused centre gradient) differ by ~1e-7 of the gradient's scale
        for got_grad, want in ((got["embedding_grad"], emb_grad), (got["weight_grad"], w_grad)):
            assert torch.allclose(got_grad, want, rtol=1e-4, atol=2e-6 * want.abs().max().item()), (name, step)
        for key, value in head.state_dict().items():
            assert torch.allclose(got["buffers"][key].float(), value.float(), atol=1e-6), (name, step, key)


@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface", "adaface", "gbcosface"])
def test_single_process_equals_full_classifier(name):
    data = worker.make_batches([9])
    pfc = PartialFC(worker.DIM, worker.CLASSES, build_margin_head(name, **worker.HEAD_ARGS.get(name, {})), seed=1)
    pfc.load_full_weight(data["weight"])
    steps = []
    for step in range(2):
        emb = data["embeddings"][step].clone().requires_grad_(True)
        out = pfc(emb, data["labels"][step])
        out["loss"].backward()
        steps.append(
            {
                "loss": out["loss"].detach(),
                "embedding_grad": emb.grad,
                "weight_grad": pfc.weight.grad.clone(),
                "buffers": {k: v.clone() for k, v in pfc.head.state_dict().items()},
            }
        )
        pfc.weight.grad = None
    assert_matches_full_classifier({"data": data, "steps": steps}, name)


def test_accuracy_and_autocast_dtype():
    weight = torch.eye(4, 6)
    pfc = PartialFC(6, 4, build_margin_head("cosface"), seed=0)
    pfc.load_full_weight(weight)
    emb = 3.0 * weight[[2, 0, 1]] + 0.01
    out = pfc(emb, torch.tensor([2, 0, 1]))
    assert out["accuracy"].item() == 1.0  # each embedding points at its own centre
    assert pfc(emb, torch.tensor([1, 0, 1]))["accuracy"].item() == pytest.approx(2 / 3)
    # bfloat16 embeddings under autocast: a float32 loss within 1 % of the float32 loss (random batch, loss ~ 30)
    gen = torch.Generator().manual_seed(3)
    emb, labels = torch.randn(8, 6, generator=gen), torch.randint(4, (8,), generator=gen)
    full = pfc(emb, labels)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = pfc(emb.bfloat16().requires_grad_(True), labels)
    assert low["loss"].dtype == torch.float32
    assert low["loss"].item() == pytest.approx(full.item(), rel=0.01)


def test_sampling_keeps_positives_and_the_expected_count():
    # 50 classes, r = 0.2 -> int(0.2 * 50) = 10 centres per step unless the batch has more distinct classes
    pfc = PartialFC(8, 50, build_margin_head("arcface", s=8.0), sample_rate=0.2, seed=4)
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 3, 17, 42])
    kept_sets = []
    for _ in range(2):
        emb = torch.randn(4, 8, generator=gen)
        pfc(emb, labels)["loss"].backward()
        kept = torch.nonzero(pfc.weight.grad.abs().sum(1) > 0).squeeze(1)
        assert set(labels.tolist()) <= set(kept.tolist())
        assert kept.numel() == 10
        kept_sets.append(kept)
        pfc.weight.grad = None
    assert pfc.step == 2
    assert not torch.equal(kept_sets[0], kept_sets[1])  # step-seeded draws differ between steps
    # the same seed and step give the same sample
    again = PartialFC(8, 50, build_margin_head("arcface", s=8.0), sample_rate=0.2, seed=4)
    again(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), labels)["loss"].backward()
    assert torch.equal(torch.nonzero(again.weight.grad.abs().sum(1) > 0).squeeze(1), kept_sets[0])
    # more distinct classes (12) than int(r * C) = 10: exactly the positives
    many = torch.arange(12) * 4
    pfc(torch.randn(12, 8, generator=gen), many)["loss"].backward()
    assert torch.equal(torch.nonzero(pfc.weight.grad.abs().sum(1) > 0).squeeze(1), many)


def test_sampled_loss_is_the_softmax_over_the_kept_centres():
    head = build_margin_head("arcface", s=8.0)
    pfc = PartialFC(8, 30, head, sample_rate=0.3, seed=5)
    gen = torch.Generator().manual_seed(1)
    emb, labels = torch.randn(5, 8, generator=gen), torch.tensor([4, 9, 9, 20, 29])
    out = pfc(emb, labels)
    out["loss"].backward()
    kept = torch.nonzero(pfc.weight.grad.abs().sum(1) > 0).squeeze(1)  # 9 = int(0.3 * 30) centres
    assert kept.numel() == 9
    columns = torch.searchsorted(kept, labels)  # labels as columns of the kept centres
    cosine = F.normalize(emb, dim=1) @ F.normalize(pfc.weight.detach()[kept], dim=1).T
    expected = F.cross_entropy(head(cosine, columns), columns)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # eval mode uses every centre: the full-classifier loss
    pfc.eval()
    full = F.normalize(emb, dim=1) @ F.normalize(pfc.weight.detach(), dim=1).T
    assert pfc(emb, labels)["loss"].item() == pytest.approx(
        F.cross_entropy(head(full, labels), labels).item(), rel=1e-5
    )


def test_errors():
    head = build_margin_head("arcface")
    for rate in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"--sample-rate must be in \(0, 1\], got {rate}"):
            PartialFC(8, 10, head, sample_rate=rate)
    pfc = PartialFC(8, 10, head, seed=0)
    with pytest.raises(ValueError, match=r"label 10 .* outside \[0, num_classes\) with num_classes=10"):
        pfc(torch.randn(3, 8), torch.tensor([1, 10, 2]))
    with pytest.raises(ValueError, match="label -1"):
        pfc(torch.randn(2, 8), torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"embeddings must be \(b, 8\)"):
        pfc(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="load_full_weight expects a"):
        pfc.load_full_weight(torch.zeros(9, 8))
    with pytest.raises(ValueError, match="shard_classes expects 10 rows"):
        pfc.shard_classes(torch.zeros(5, 8))
    # GB-CosFace with a sample that keeps only its own centre: no negative to compare with
    gb = PartialFC(4, 2, build_margin_head("gbcosface"), sample_rate=0.5, seed=0)
    with pytest.raises(ValueError, match="raise --sample-rate"):
        gb(torch.randn(2, 4), torch.tensor([0, 0]))


def test_labels_are_checked_on_the_first_step_after_train_or_eval():
    pfc = PartialFC(8, 10, build_margin_head("arcface"), seed=0)
    pfc(torch.randn(2, 8), torch.tensor([1, 2]))  # the first step is checked
    # the epoch's other steps read nothing back: label 10 goes unnoticed (its target lies on no rank)
    assert torch.isfinite(pfc(torch.randn(2, 8), torch.tensor([1, 10]))["loss"])
    pfc.train()  # the training loop's start of an epoch
    with pytest.raises(ValueError, match=r"label 10 \(rank 0, 2 bad in its batch\) .*num_classes=10"):
        pfc(torch.randn(3, 8), torch.tensor([0, 10, 12]))
    with pytest.raises(ValueError, match="label -1"):  # a failed check stays pending
        pfc(torch.randn(2, 8), torch.tensor([3, -1]))
    pfc(torch.randn(2, 8), torch.tensor([3, 4]))
    pfc.eval()
    with pytest.raises(ValueError, match="label 11"):
        pfc(torch.randn(1, 8), torch.tensor([11]))


def test_seed_and_step_are_integers_saved_as_int64_tensors():
    pfc = PartialFC(8, 50, build_margin_head("arcface", s=8.0), sample_rate=0.2, seed=4)
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 3, 17, 42])
    batches = [torch.randn(4, 8, generator=gen) for _ in range(3)]
    for emb in batches[:2]:
        pfc(emb, labels)
    assert type(pfc.seed) is int and type(pfc.step) is int and (pfc.seed, pfc.step) == (4, 2)
    state = pfc.state_dict()
    assert state["seed"].dtype == state["step"].dtype == torch.int64
    assert (state["seed"].item(), state["step"].item()) == (4, 2)
    resumed = PartialFC(8, 50, build_margin_head("arcface", s=8.0), sample_rate=0.2, seed=9)
    resumed.load_state_dict(state)
    assert type(resumed.step) is int and (resumed.seed, resumed.step) == (4, 2)
    kept = []
    for module in (pfc, resumed):  # the third step draws the same negatives with and without the interruption
        module(batches[2], labels)["loss"].backward()
        kept.append(torch.nonzero(module.weight.grad.abs().sum(1) > 0).squeeze(1))
    assert kept[0].numel() == 10 and torch.equal(kept[0], kept[1])
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "step"'):
        resumed.load_state_dict({k: v for k, v in state.items() if k != "step"})
    with pytest.raises(RuntimeError, match="step: expected a one-element integer tensor"):
        resumed.load_state_dict({**state, "step": torch.tensor(2.0)})


def test_initial_centres_and_checkpoint_helpers():
    num_classes = INIT_BLOCK + 5  # spans two init blocks
    pfc = PartialFC(4, num_classes, build_margin_head("arcface"), seed=11)
    same = PartialFC(4, num_classes, build_margin_head("arcface"), seed=11)
    other = PartialFC(4, num_classes, build_margin_head("arcface"), seed=12)
    assert torch.equal(pfc.weight, same.weight) and not torch.equal(pfc.weight, other.weight)
    assert pfc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    full = pfc.full_weight()
    assert torch.equal(full, pfc.weight.detach())
    replacement = torch.randn(num_classes, 4)
    pfc.load_full_weight(replacement)
    assert torch.equal(pfc.weight.detach(), replacement)
    assert torch.equal(pfc.gather_classes(pfc.shard_classes(replacement * 3)), replacement * 3)
    assert set(pfc.state_dict()) == {"seed", "step", "weight"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["arcface", "adaface", "gbcosface"])
def test_cuda_matches_cpu(name):
    data = worker.make_batches([9], steps=1)
    results = []
    for device in ("cpu", "cuda"):
        pfc = PartialFC(worker.DIM, worker.CLASSES, build_margin_head(name), seed=1).to(device)
        pfc.load_full_weight(data["weight"])
        emb = data["embeddings"][0].to(device).requires_grad_(True)
        out = pfc(emb, data["labels"][0].to(device))
        out["loss"].backward()
        results.append((out["loss"].item(), emb.grad.cpu(), pfc.weight.grad.cpu()))
        sampled = PartialFC(worker.DIM, worker.CLASSES, build_margin_head(name), sample_rate=0.5, seed=1).to(device)
        assert torch.isfinite(sampled(emb.detach(), data["labels"][0].to(device))["loss"])
    (cpu_loss, cpu_emb, cpu_w), (gpu_loss, gpu_emb, gpu_w) = results
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)
    assert torch.allclose(gpu_emb, cpu_emb, rtol=1e-3, atol=1e-4 * cpu_emb.abs().max().item())
    assert torch.allclose(gpu_w, cpu_w, rtol=1e-3, atol=1e-4 * cpu_w.abs().max().item())


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_processes(tmp_path):
    out = tmp_path / "pfc.pt"
    run_torchrun_worker(WORKER, [out], timeout=110)
    saved = torch.load(out, weights_only=True)

    # (a) r = 1: same loss, embedding gradients, centre gradients and head buffers as one full classifier
    for name, run in saved["heads"].items():
        assert_matches_full_classifier(run, name)
    assert_matches_full_classifier(saved["variable"], "arcface")  # local batches of 7 and 3
    # per-sample weights (TransFace's EHSM), gathered like the labels: the weighted loss of one process
    weighted = saved["weighted"]
    for normalise in ("batch", "weights"):
        want = weighted_classifier_step(weighted["data"], weighted["sample_weights"], normalise)
        got = weighted[normalise]
        assert got["loss"].item() == pytest.approx(want[0].item(), rel=1e-5), normalise
        for got_grad, want_grad in zip((got["embedding_grad"], got["weight_grad"]), want[1:]):
            assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=2e-6 * want_grad.abs().max().item()), normalise

    # (b) r = 0.5 on 2 x 20 classes: rank 0 keeps exactly its 12 positives, rank 1 its 3 positives + 7 negatives
    sampling = saved["sampling"]
    labels = sampling["labels"]
    kept0, kept1 = sampling["kept"]
    assert torch.equal(kept0, torch.unique(labels[labels < 20]))
    assert kept1.numel() == 10 and {21, 25, 30} <= set(kept1.tolist()) and (kept1 >= 20).all()
    kept = torch.cat([kept0, kept1])
    head = build_margin_head("arcface", s=8.0)
    columns = torch.searchsorted(kept, labels)
    cosine = F.normalize(sampling["embeddings"], dim=1) @ F.normalize(sampling["weight"][kept], dim=1).T
    assert sampling["loss"].item() == pytest.approx(F.cross_entropy(head(cosine, columns), columns).item(), rel=1e-5)
    assert sampling["step"] == 1

    # (c) a bad label on rank 1 raises on both ranks, naming the label and num_classes
    for message in saved["bad_label"]:
        assert "label 99 (rank 1" in message and "num_classes=11" in message

    # checkpoints: the seeded initial centres do not depend on the world size; shards follow contiguous_shard
    checkpoint = saved["checkpoint"]
    single = PartialFC(worker.DIM, INIT_BLOCK + 5, build_margin_head("arcface"), seed=7)
    assert torch.equal(checkpoint["initial"], single.weight.detach())
    table = torch.arange(worker.CLASSES * 3, dtype=torch.float32).view(worker.CLASSES, 3)
    for rank, shard in enumerate(checkpoint["shards"]):
        assert torch.equal(shard, table[contiguous_shard(worker.CLASSES, rank, 2)])
    assert torch.equal(checkpoint["round_trip"], table * 2)
    assert checkpoint["range"] == (0, 5)
    # the block gather: the whole table on rank 0, on the CPU, in class order; nothing returned on rank 1
    for block in worker.GATHER_BLOCKS:
        assert checkpoint["blocks"][block].device.type == "cpu"
        assert torch.equal(checkpoint["blocks"][block], table), block
    assert torch.equal(checkpoint["blocks"]["ids"], torch.arange(100, 111))  # rows 100 + class id
    assert all(checkpoint["returned"][0].values()) and not any(checkpoint["returned"][1].values())
    assert checkpoint["batch_sizes"] == [3, 7]  # 3 + 4 * rank, exchanged on the host

    # GB-CosFace without Partial FC: global batch mean of cos_v = (0.6 + 0.5 + 0.4) / 3 = 0.5 -> p_v = 0.5 on both
    # ranks; second batch mean (0.7 + 0.7 + 1.0) / 3 = 0.8 -> p_v = 0.99 * 0.5 + 0.01 * 0.8 = 0.503
    for pv in saved["gbcosface_ddp"]:
        assert pv == pytest.approx([0.5, 0.503], abs=1e-6)
