"""DINO projection head: names, frozen weight_g, weight normalisation, unit-norm output, parameter count."""

import torch
from torch.nn.utils.parametrizations import weight_norm

from model import DINOHead


def test_names_and_frozen_weight_g():
    head = DINOHead(192, 100)
    names = {n: p for n, p in head.named_parameters()}
    assert set(names) == {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {
        "last_layer.weight_g",
        "last_layer.weight_v",
    }
    assert names["last_layer.weight_g"].shape == (100, 1) and not names["last_layer.weight_g"].requires_grad
    assert torch.all(names["last_layer.weight_g"] == 1)
    assert names["last_layer.weight_v"].shape == (100, 256)


def test_output_matches_torch_weight_norm_and_is_normalised():
    torch.manual_seed(0)
    head = DINOHead(192, 100)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # exercise g
    reference = weight_norm(torch.nn.Linear(256, 100, bias=False), dim=0)
    reference.parametrizations.weight.original0.data.copy_(head.last_layer.weight_g)
    reference.parametrizations.weight.original1.data.copy_(head.last_layer.weight_v)
    x = torch.randn(5, 192)
    bottleneck = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    expected = torch.nn.functional.normalize(reference(bottleneck), dim=-1)
    out = head(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))


def test_vit_base_head_parameter_count():
    with torch.device("meta"):
        head = DINOHead(768)
    assert sum(p.numel() for p in head.mlp.parameters()) == 6_295_808
    assert sum(p.numel() for p in head.parameters()) == 23_138_560
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == 23_138_560 - 65_536


def test_dino_pretraining_head_outputs_cosines_to_the_prototypes():
    """DINO's head is not normalised again: each logit is cos(bottleneck, prototype k) (g = 1), |logit| <= 1."""
    from model.dino import DINOConfig, DINOMethod

    torch.manual_seed(0)
    cfg = DINOConfig(arch="vit_tiny", patch_size=16, img_size=32, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    head = DINOMethod(cfg).student.head
    assert not head.normalize_output
    x = torch.randn(6, 192)
    bottleneck = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    prototypes = torch.nn.functional.normalize(head.last_layer.weight_v, dim=-1)
    out = head(x)
    torch.testing.assert_close(out, bottleneck @ prototypes.T, rtol=1e-5, atol=1e-6)
    assert out.abs().max() <= 1.0 + 1e-6
    # typical cosines of 16-d directions are ~ 1/4, far from the ~1/8 of a unit-norm 64-d output
    assert out.norm(dim=-1).min() > 1.5
