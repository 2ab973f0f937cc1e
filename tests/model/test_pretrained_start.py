"""FaceGCD from a recognition checkpoint (``--pretrained-weights`` of a ``--method recognition`` ViT run): the
backbone and the conditioner start as that frozen ViT, and checkpoints that cannot fit are refused."""

from pathlib import Path

import pytest
import torch

from model.facegcd import ModelConfig, build_facegcd
from model.recognition import FaceRecognizer, RecognitionConfig
from utils.checkpoint import CheckpointError

VIT = dict(arch="vit_tiny", patch_size=16, img_size=32)


def _recognition_checkpoint(path: Path, **overrides) -> dict[str, torch.Tensor]:
    """Save a recognition checkpoint as the training loop writes it (``state_dict``, ``model_config``); returns its
    state dict. The weights are drawn afresh so that no initialisation could pass for them."""
    cfg = RecognitionConfig(**{**VIT, "embedding_size": 16, "num_classes": 5, **overrides})
    torch.manual_seed(123)
    model = FaceRecognizer(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    state = model.checkpoint_state_dict()
    torch.save({"state_dict": state, "model_config": cfg.to_dict(), "epoch": 3}, path)
    return state


def _facegcd(weights: Path, **overrides) -> torch.nn.Module:
    cfg = ModelConfig(**{**VIT, "prefix_length": 2, "hypernet_hidden_dim": 8, "head_out_dim": 16, **overrides})
    return build_facegcd(cfg, weights)


def test_recognition_checkpoint_starts_backbone_and_conditioner_as_its_frozen_vit(tmp_path):
    path = tmp_path / "start.pth.tar"
    state = _recognition_checkpoint(path)
    vit = {k[len("backbone.vit.") :]: v for k, v in state.items() if k.startswith("backbone.vit.")}
    model = _facegcd(path)

    backbone = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("prefix_generator.")}
    assert backbone.keys() == vit.keys()
    for key, value in vit.items():
        assert torch.equal(backbone[key], value), key
    # the conditioner keeps frozen copies of the trained blocks (11 with --grad-from-block 11) and shares the rest
    conditioner = model.conditioner.state_dict()
    assert conditioner.keys() == {k for k in vit if k.startswith("blocks.11.")}
    for key, value in conditioner.items():
        assert torch.equal(value, vit[key]), key
    assert not any(p.requires_grad for p in model.conditioner.parameters())
    assert all(p.requires_grad for p in model.backbone.blocks[11].parameters())
    assert not any(p.requires_grad for p in model.backbone.blocks[10].parameters())

    # the conditioning pass is the recognition ViT's own plain pass: its per-layer pooled, final-normed tokens
    reference = FaceRecognizer(RecognitionConfig(**{**VIT, "embedding_size": 16, "num_classes": 5}))
    reference.load_checkpoint_state_dict(state)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref_vit = reference.backbone.vit
        x = ref_vit.embed_tokens(images)
        expected = []
        for block in ref_vit.blocks:
            x = block(x)
            tokens = ref_vit.norm(x)
            expected.append(torch.nn.functional.layer_norm(tokens, tokens.shape[-1:], eps=1e-5).mean(dim=1))
        got = model.conditioner(model.backbone.embed_tokens(images), model.backbone)
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=0)


def test_conditioner_stays_the_start_after_a_training_step(tmp_path):
    path = tmp_path / "start.pth.tar"
    state = _recognition_checkpoint(path)
    model = _facegcd(path)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    images = torch.randn(8, 3, 32, 32)
    losses = model(images, torch.tensor([0, 1, 0, 1]), torch.tensor([True, True, False, False]))
    losses["loss"].backward()
    optimizer.step()
    assert not torch.equal(model.backbone.blocks[11].attn.qkv.weight, state["backbone.vit.blocks.11.attn.qkv.weight"])
    assert torch.equal(model.conditioner.blocks["11"].attn.qkv.weight, state["backbone.vit.blocks.11.attn.qkv.weight"])
    assert torch.equal(model.backbone.blocks[3].mlp.fc1.weight, state["backbone.vit.blocks.3.mlp.fc1.weight"])


@pytest.mark.parametrize(
    "stored, expected",
    [
        ({"patch_size": 8}, "--patch-size 8 at 32 px"),
        ({"img_size": 48}, "--patch-size 16 at 48 px"),
        ({"arch": "vit_small"}, "--arch vit_small (width 384)"),
    ],
)
def test_recognition_checkpoint_of_another_vit_is_refused(tmp_path, stored, expected):
    path = tmp_path / "start.pth.tar"
    _recognition_checkpoint(path, **stored)
    with pytest.raises(CheckpointError) as err:
        _facegcd(path)
    assert str(path) in str(err.value) and expected in str(err.value)
    assert "width 192, 16 px patches and 32 px inputs" in str(err.value)


def test_recognition_checkpoint_of_an_iresnet_is_refused(tmp_path):
    path = tmp_path / "r18.pth.tar"
    cfg = RecognitionConfig(arch="iresnet18", img_size=32, embedding_size=16, num_classes=3)
    torch.save({"state_dict": {"backbone.fc.weight": torch.zeros(1)}, "model_config": cfg.to_dict()}, path)
    with pytest.raises(
        CheckpointError, match=r"--arch iresnet18: a pretrained start .* must be one of its ViTs, vit_tiny"
    ):
        _facegcd(path)


@pytest.mark.parametrize(
    "start_mosaics, run_mosaics, warning",
    [
        (True, False, "trained on landmark mosaics (Part fViT): its ViT expects them, so use --landmark-cnn"),
        (False, True, "trained on whole images, and this --landmark-cnn model feeds its ViT landmark mosaics"),
        (True, True, None),
        (False, False, None),
    ],
)
def test_a_start_read_the_other_way_than_it_was_trained_is_named(tmp_path, caplog, start_mosaics, run_mosaics, warning):
    path = tmp_path / "start.pth.tar"
    _recognition_checkpoint(path, landmark_cnn=start_mosaics)
    with caplog.at_level("WARNING", logger="model.vit"):
        _facegcd(path, landmark_cnn=run_mosaics)
    messages = [r.getMessage() for r in caplog.records if r.name == "model.vit"]
    assert [m[: len(f"{path} was {warning}")] for m in messages] == ([f"{path} was {warning}"] if warning else [])
