"""Frozen conditioning pass: pooling formulas, weight sharing, frozen copies, no gradient."""

import torch

from model import FrozenConditioner


def _plain_layer_outputs(backbone, tokens):
    """Normalised outputs E_l (B, T, D) of every block of the plain backbone."""
    outputs, x = [], tokens
    for block in backbone.blocks:
        x = block(x)
        outputs.append(backbone.norm(x))
    return outputs


def test_pooling_matches_definitions(tiny_backbone, images):
    tokens = tiny_backbone.embed_tokens(images)
    layers = _plain_layer_outputs(tiny_backbone, tokens)
    plain = FrozenConditioner(tiny_backbone, first_trainable_block=11)(tokens, tiny_backbone)
    embed = FrozenConditioner(tiny_backbone, first_trainable_block=11, layer_embed=True)(tokens, tiny_backbone)
    assert plain.shape == embed.shape == (12, 6, 192)
    for i, e in enumerate(layers):
        torch.testing.assert_close(embed[i], e.mean(dim=1), rtol=1e-5, atol=1e-5)
        z = (e - e.mean(-1, keepdim=True)) / torch.sqrt(e.var(-1, unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(plain[i], z.mean(dim=1), rtol=1e-4, atol=1e-5)
    # a HyperNet LayerNorm's affine applied to the pooled z equals the token mean of that LayerNorm
    ln = torch.nn.LayerNorm(192)
    torch.nn.init.normal_(ln.weight), torch.nn.init.normal_(ln.bias)
    torch.testing.assert_close(ln.weight * plain[3] + ln.bias, ln(layers[3]).mean(1), rtol=1e-4, atol=1e-4)


def test_shares_frozen_blocks_and_copies_trained_ones(tiny_backbone, images):
    conditioner = FrozenConditioner(tiny_backbone, first_trainable_block=11)
    assert sorted(conditioner.state_dict()) == sorted(f"blocks.11.{k}" for k in tiny_backbone.blocks[11].state_dict())
    assert all(not p.requires_grad for p in conditioner.parameters())
    tokens = tiny_backbone.embed_tokens(images)
    before = conditioner(tokens, tiny_backbone)
    with torch.no_grad():  # "training" block 11 of the backbone does not move the conditioning pass
        tiny_backbone.blocks[11].mlp.fc2.weight.add_(1.0)
    torch.testing.assert_close(conditioner(tokens, tiny_backbone), before, rtol=0, atol=0)
    with torch.no_grad():  # frozen blocks are shared, not copied
        tiny_backbone.blocks[3].mlp.fc2.weight.add_(1.0)
    assert not torch.allclose(conditioner(tokens, tiny_backbone)[3], before[3])
    torch.testing.assert_close(conditioner(tokens, tiny_backbone)[:3], before[:3], rtol=0, atol=0)


def test_all_blocks_copied_when_all_train(tiny_backbone):
    conditioner = FrozenConditioner(tiny_backbone, first_trainable_block=0)
    assert sorted(conditioner.blocks.keys(), key=int) == [str(i) for i in range(12)]


def test_runs_without_gradient(tiny_backbone, images):
    tokens = tiny_backbone.embed_tokens(images).detach().requires_grad_(True)
    out = FrozenConditioner(tiny_backbone, first_trainable_block=11)(tokens, tiny_backbone)
    assert not out.requires_grad and out.grad_fn is None
