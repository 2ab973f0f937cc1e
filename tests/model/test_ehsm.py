"""EHSM (TransFace's entropy-guided hard sample mining): the weights worked out by hand, the weighted Partial FC loss
against autograd of the weighted cross-entropy, and its place in the recognizer. The 2-process check is in
tests/model/test_partial_fc.py (test_two_processes, the ``weighted`` run)."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.ehsm import ehsm_weights
from model.margin_heads import build_margin_head
from model.partial_fc import PartialFC
from model.recognition import FaceRecognizer, RecognitionConfig


def test_weights_from_token_stds_worked_out_by_hand():
    tokens = torch.zeros(2, 144, 4)
    tokens[0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # every token of sample 0; sample 1 all zeros
    std = tokens.std(dim=2)  # Bessel: sqrt(4 / 3) = 1.1547
    assert std[0, 0].item() == pytest.approx(math.sqrt(4 / 3))
    # w = 1 + exp(-1.1547) = 1.3152; zeros: 1 + exp(0) = 2
    torch.testing.assert_close(ehsm_weights(std), torch.tensor([1.3152, 2.0]), rtol=0, atol=1e-4)
    # per-token std 1: 1 + e^-1 = 1.3679; gamma 2 on std 0.5: 1 + e^-1 again
    torch.testing.assert_close(ehsm_weights(torch.ones(1, 144)), torch.tensor([1.3679]), rtol=0, atol=1e-4)
    torch.testing.assert_close(
        ehsm_weights(torch.full((1, 144), 0.5), gamma=2.0), torch.tensor([1.3679]), atol=1e-4, rtol=0
    )
    # top-K: stds [3, 1, 0, ...]: K = 2 averages 3 and 1 -> 1 + e^-2 = 1.1353; K = 0 (all) -> mean 4 / 144
    std = torch.zeros(1, 144)
    std[0, :2] = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(ehsm_weights(std, topk=2), torch.tensor([1.1353]), rtol=0, atol=1e-4)
    torch.testing.assert_close(ehsm_weights(std), torch.tensor([1 + math.exp(-4 / 144)]))
    with pytest.raises(ValueError, match="--ehsm-topk 145"):
        ehsm_weights(std, topk=145)


def test_weights_carry_no_gradient():
    std = torch.rand(3, 144, requires_grad=True)
    assert not ehsm_weights(std).requires_grad


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 8, generator=gen) * 10, torch.randint(5, (6,), generator=gen), 0.1 * torch.randn(5, 8)


@pytest.mark.parametrize("normalise", ["batch", "weights"])
def test_weighted_loss_gradient_equals_autograd_of_the_weighted_cross_entropy(normalise):
    embeddings, labels, centres = _data()
    weights = 1 + torch.rand(6)
    pfc = PartialFC(8, 5, build_margin_head("arcface"), seed=0)
    pfc.load_full_weight(centres)
    emb = embeddings.clone().requires_grad_(True)
    loss = pfc(emb, labels, weights, weight_normalise=normalise)["loss"]
    loss.backward()
    # by autograd: mean(w.detach() * CE) (or sum(w CE) / sum(w)) of a plain ArcFace classifier
    ref_emb, ref_w = embeddings.clone().requires_grad_(True), centres.clone().requires_grad_(True)
    cosine = F.normalize(ref_emb, dim=1) @ F.normalize(ref_w, dim=1).T
    ce = F.cross_entropy(build_margin_head("arcface")(cosine, labels), labels, reduction="none")
    want = (weights * ce).sum() / (weights.sum() if normalise == "weights" else 6)
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(emb.grad, ref_emb.grad)
    torch.testing.assert_close(pfc.weight.grad, ref_w.grad)


def test_unit_weights_give_the_unweighted_loss_and_bad_uses_fail_clearly():
    embeddings, labels, centres = _data(1)
    pfc = PartialFC(8, 5, build_margin_head("arcface"), seed=0)
    pfc.load_full_weight(centres)
    torch.testing.assert_close(pfc(embeddings, labels, torch.ones(6))["loss"], pfc(embeddings, labels)["loss"])
    with pytest.raises(ValueError, match="must be \\(6,\\)"):
        pfc(embeddings, labels, torch.ones(5))
    gb = PartialFC(8, 5, build_margin_head("gbcosface"), seed=0)
    with pytest.raises(ValueError, match="need a softmax margin head"):
        gb(embeddings, labels, torch.ones(6))
    with pytest.raises(ValueError, match="--ehsm weights a softmax cross-entropy; --head gbcosface"):
        FaceRecognizer(
            RecognitionConfig(arch="transface_vit_t", img_size=36, num_classes=4, head="gbcosface", ehsm=True)
        )


def test_recognizer_weights_each_sample_by_its_token_stds():
    torch.manual_seed(0)
    cfg = RecognitionConfig(
        arch="transface_vit_t", img_size=36, patch_size=9, embedding_size=16, num_classes=6, drop_path=0.0, ehsm=True
    )
    model = FaceRecognizer(cfg).train()
    images, labels = torch.randn(4, 3, 36, 36), torch.tensor([0, 1, 2, 5])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(images, labels)
    outputs = model.backbone.forward_with_tokens(images)  # the same training-mode forward (no masking or drop path)
    model.load_state_dict(state)  # undo the BatchNorm statistics of that extra forward
    weights = 1 + torch.exp(-outputs.token_std.mean(dim=1))
    want = model.partial_fc(outputs.embedding, labels, weights)["loss"]
    torch.testing.assert_close(out["loss"], want)
    assert not torch.allclose(out["loss"], model.partial_fc(outputs.embedding, labels)["loss"])
    torch.testing.assert_close(out["ehsm_weight"], weights.mean())
