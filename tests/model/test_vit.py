"""Backbone: registry, parameter counts, equivalence with timm, prefix attention, checkpointing, weight loading."""

import argparse
import math
import re

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from model import CheckpointError, PrefixViT, create_backbone, list_backbones, load_pretrained_backbone
from model.prefix_attention import PrefixAttention


@pytest.mark.parametrize(
    "arch,patch,expected,tokens",
    [
        ("vit_tiny", 8, 5_413_824, 197),
        ("vit_tiny", 16, 5_496_192, 50),
        ("vit_small", 8, 21_444_480, 197),
        ("vit_small", 16, 21_609_216, 50),
        ("vit_base", 8, 85_356_288, 197),
        ("vit_base", 16, 85_685_760, 50),
    ],
)
def test_parameter_counts_at_112(arch, patch, expected, tokens):
    with torch.device("meta"):
        model = create_backbone(arch, patch_size=patch, img_size=112)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.num_tokens == tokens


def test_registry_and_errors():
    assert list_backbones() == ["vit_tiny", "vit_small", "vit_base"]
    with torch.device("meta"):
        model = timm.create_model("vit_small", patch_size=16, img_size=32)
    assert isinstance(model, PrefixViT) and model.embed_dim == 384 and model.num_tokens == 5
    with pytest.raises(ValueError, match="vit_huge"):
        create_backbone("vit_huge")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_backbone("vit_tiny", patch_size=16, img_size=40)
    with pytest.raises(ValueError, match="download"):
        timm.create_model("vit_tiny", pretrained=True)


def test_dino_parameter_names(tiny_backbone_template):
    names = set(tiny_backbone_template.state_dict())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "norm.bias"}
    expected |= {
        f"blocks.0.{m}.{p}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    }
    assert expected <= names
    assert not any(n.startswith("head") for n in names)


def _timm_twin(model: PrefixViT) -> VisionTransformer:
    """Plain timm VisionTransformer with the same weights."""
    twin = VisionTransformer(
        img_size=model.patch_embed.img_size,
        patch_size=16,
        embed_dim=model.embed_dim,
        depth=12,
        num_heads=model.blocks[0].attn.num_heads,
        num_classes=0,
        weight_init="skip",
    )
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


@pytest.mark.parametrize("arch", ["vit_tiny", "vit_small"])
def test_prefix_free_model_equals_timm(arch, tiny_backbone_template):
    torch.manual_seed(0)
    model = tiny_backbone_template if arch == "vit_tiny" else create_backbone(arch, patch_size=16, img_size=32)
    model.eval()
    twin = _timm_twin(model)
    x = torch.randn(3, 3, 32, 32)
    heads = model.blocks[0].attn.num_heads
    empty = torch.zeros(12, 2, 3, heads, 0, model.embed_dim // heads)
    with torch.no_grad():
        ref = twin(x)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(model(x, empty), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_features(x), twin.forward_features(x), rtol=0, atol=0)


def test_prefix_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = PrefixAttention(32, num_heads=4, qkv_bias=True).eval()
    x, prefix = torch.randn(2, 5, 32), torch.randn(2, 2, 4, 3, 8)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    k = torch.cat([prefix[0], k], dim=2)
    v = torch.cat([prefix[1], v], dim=2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)  # (B, H, 5, 3 + 5)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x, prefix=prefix), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(attn(x, prefix=prefix), attn(x), atol=1e-3)


@pytest.mark.parametrize("with_prefix", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_explicit_cpu_training_kernel_equals_fused(monkeypatch, with_prefix, mask_kind):
    """The CPU-training attention path gives the fused kernel's outputs and gradients (inputs and weights)."""
    torch.manual_seed(0)
    attn = PrefixAttention(32, num_heads=4, qkv_bias=True).train()
    x = torch.randn(3, 5, 32)
    prefix = torch.randn(2, 3, 4, 2, 8) if with_prefix else None
    keys = 5 + (2 if with_prefix else 0)
    mask = {
        None: None,
        "bool": torch.rand(3, 1, 5, keys) > 0.3,
        "float": torch.randn(3, 1, 5, keys),
    }[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # every query keeps a key
    results = []
    for kernel in ("explicit", "fused"):
        monkeypatch.setattr(PrefixAttention, "cpu_training_kernel", kernel)
        attn.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_(True)
        p_in = prefix.clone().requires_grad_(True) if with_prefix else None
        out = attn(x_in, attn_mask=mask, prefix=p_in)
        out.square().sum().backward()
        results.append([out, x_in.grad, attn.qkv.weight.grad] + ([p_in.grad] if with_prefix else []))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert results[0][1].abs().sum() > 0


def test_cpu_training_kernel_choice(monkeypatch):
    """auto: explicit only for CPU training under a low-precision autocast; fused in float32 and without autograd."""
    attn = PrefixAttention(32, num_heads=4)
    x = torch.randn(2, 5, 32)
    assert not attn.uses_explicit_kernel(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn.uses_explicit_kernel(x)
        with torch.no_grad():
            assert not attn.uses_explicit_kernel(x)
    assert attn.uses_explicit_kernel(x.bfloat16())
    monkeypatch.setattr(PrefixAttention, "cpu_training_kernel", "explicit")
    assert attn.uses_explicit_kernel(x)
    monkeypatch.setattr(PrefixAttention, "cpu_training_kernel", "fused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not attn.uses_explicit_kernel(x)
    monkeypatch.setattr(PrefixAttention, "cpu_training_kernel", "flash")
    with pytest.raises(ValueError, match="cpu_training_kernel"):
        attn.uses_explicit_kernel(x)


def test_grad_checkpointing_gives_same_gradients(tiny_backbone):
    torch.manual_seed(0)
    model = tiny_backbone
    model.requires_grad_(False)
    model.blocks[11].requires_grad_(True)
    x = torch.randn(2, 3, 32, 32)
    prefixes = torch.randn(12, 2, 2, 3, 4, 64)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        p = prefixes.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model(x, p).square().sum().backward()
        grads.append((p.grad, model.blocks[11].mlp.fc2.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[1][0][0].abs().sum() > 0  # gradients reach the first layer's prefixes


def _fake_dino_checkpoint(source: dict[str, torch.Tensor], grid: int = 4) -> dict:
    """A full DINO training checkpoint: teacher/student wrapped as module.backbone.*, head.* extras, args, and a
    position embedding on a `grid` x `grid` patch grid."""
    teacher = {f"module.backbone.{k}": v.clone() for k, v in source.items()}
    dim = source["pos_embed"].shape[-1]
    teacher["module.backbone.pos_embed"] = torch.randn(1, 1 + grid * grid, dim)
    teacher["module.head.mlp.0.weight"] = torch.randn(16, dim)
    teacher["module.head.last_layer.weight_g"] = torch.ones(8, 1)
    student = {k: v + 1.0 for k, v in teacher.items()}
    args = argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=8)
    return {"teacher": teacher, "student": student, "args": args, "epoch": 7, "optimizer": {"lr": 0.1}}


def test_load_timm_state_dict_file(tmp_path, tiny_backbone_template, tiny_backbone):
    source = {k: torch.randn_like(v) for k, v in tiny_backbone_template.state_dict().items()}
    state = dict(source, **{"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)})
    torch.save(state, tmp_path / "timm.pth")
    report = load_pretrained_backbone(tiny_backbone, tmp_path / "timm.pth")
    assert report["ignored"] == ["head.bias", "head.weight"]
    for name, value in tiny_backbone.state_dict().items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)


def test_load_errors_name_the_problem(tmp_path, tiny_backbone):
    model = tiny_backbone
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_pretrained_backbone(model, tmp_path / "nothing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_pretrained_backbone(model, tmp_path / "garbage.pth")

    cases = {
        "wider.pth": ("module.backbone.blocks.0.attn.qkv.weight", torch.zeros(1152, 384)),
        "patch8.pth": ("module.backbone.patch_embed.proj.weight", torch.zeros(192, 3, 8, 8)),
    }
    for name, (key, value) in cases.items():
        checkpoint = _fake_dino_checkpoint(model.state_dict(), grid=2)
        checkpoint["teacher"][key] = value
        torch.save(checkpoint, tmp_path / name)
        with pytest.raises(CheckpointError, match=re.escape(f"{key[16:]}: checkpoint {tuple(value.shape)}")):
            load_pretrained_backbone(model, tmp_path / name)

    incomplete = _fake_dino_checkpoint(model.state_dict(), grid=2)
    del incomplete["teacher"]["module.backbone.norm.weight"], incomplete["teacher"]["module.backbone.cls_token"]
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(CheckpointError, match="cls_token, norm.weight"):
        load_pretrained_backbone(model, tmp_path / "incomplete.pth")
