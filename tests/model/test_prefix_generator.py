"""HyperNetwork prefix generator: parameter counts, shapes, prompt modes and the prefix formula."""

import pytest
import torch
import torch.nn.functional as F

from model import PrefixGenerator


def _generator(**overrides) -> PrefixGenerator:
    values = dict(embed_dim=192, num_heads=3, depth=12, prefix_length=4, seed=5)
    values.update(overrides)
    return PrefixGenerator(**values)


@pytest.mark.parametrize(
    "dim,heads,layer_embed,expected",
    [
        (768, 12, False, 10_668_320),
        (768, 12, True, 16_990_496),
        (384, 6, False, 7_519_520),
        (384, 6, True, 10_680_608),
        (192, 3, False, 5_945_120),
        (192, 3, True, 7_525_664),
    ],
)
def test_parameter_counts(dim, heads, layer_embed, expected):
    with torch.device("meta"):
        gen = PrefixGenerator(embed_dim=dim, num_heads=heads, depth=12, prefix_length=10, layer_embed=layer_embed)
    assert sum(p.numel() for p in gen.parameters()) == expected


def test_module_names_follow_the_reference():
    names = set(_generator().state_dict()) | set(_generator(layer_embed=True).state_dict())
    for net in ("key_down", "key_up", "value_down", "value_up"):
        for part in ("weight_generator.0.weight", "weight_generator.2.bias", "bias_generator.2.weight"):
            assert f"{net}_prefix_hypernet.{part}" in names
        assert f"{net}_prefix_hypernet.layer_norm.weight" in names
        assert f"{net}_prefix_hypernet.layer_embedding.weight" in names
    assert {"prefix_layer_norm.weight", "eval_prompt_key", "eval_prompt_value"} <= names


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layer_embed", [False, True])
def test_output_shape_any_batch(batch, layer_embed):
    gen = _generator(layer_embed=layer_embed)
    cond = torch.randn(12, batch, 192)
    assert gen(cond).shape == (12, 2, batch, 3, 4, 64)
    assert gen.eval()(cond).shape == (12, 2, batch, 3, 4, 64)


def test_prefix_formula_for_one_layer_and_image():
    torch.manual_seed(0)
    gen = _generator().eval()
    for p in gen.parameters():  # larger weights than the 0.01 init, so every term matters
        p.data.normal_(std=0.2)
    cond = torch.randn(12, 2, 192)
    out = gen(cond)
    layer, image = 7, 1

    def emitted(net, out_f, in_f):
        h = net.layer_norm.weight * cond[layer, image] + net.layer_norm.bias
        return net.weight_generator(h).view(out_f, in_f), net.bias_generator(h)

    for kind, prompt, (down, up) in (
        (0, gen.eval_prompt_key, (gen.key_down_prefix_hypernet, gen.key_up_prefix_hypernet)),
        (1, gen.eval_prompt_value, (gen.value_down_prefix_hypernet, gen.value_up_prefix_hypernet)),
    ):
        w_down, b_down = emitted(down, 16, 64)
        w_up, b_up = emitted(up, 64, 16)
        for pos, head in ((0, 0), (3, 2)):
            z = prompt[pos, head]
            expected = gen.prefix_layer_norm(w_up @ F.relu(w_down @ z + b_down) + b_up)
            torch.testing.assert_close(out[layer, kind, image, head, pos], expected, rtol=1e-4, atol=1e-5)


def test_layer_embed_input_is_concatenated():
    torch.manual_seed(0)
    gen = _generator(layer_embed=True)
    net = gen.key_down_prefix_hypernet
    cond = torch.randn(12, 2, 192)
    weight, bias = net(cond)
    h = torch.cat([cond[4, 1], net.layer_embedding.weight[4]])
    torch.testing.assert_close(weight[4, 1], net.weight_generator(h).view(16, 64))
    torch.testing.assert_close(bias[4, 1], net.bias_generator(h))


def test_training_prompt_is_random_per_sample_and_call():
    gen = _generator().train()
    cond = torch.randn(12, 1, 192).expand(12, 2, 192)  # two identical images
    first, second = gen(cond), gen(cond)
    assert not torch.allclose(first[:, :, 0], first[:, :, 1])
    assert not torch.allclose(first, second)
    assert not torch.allclose(first[:, 0], first[:, 1])  # keys and values use different prompts


def test_eval_prompt_fixed_seeded_and_batch_independent():
    gen = _generator().eval()
    cond = torch.randn(12, 3, 192)
    torch.testing.assert_close(gen(cond), gen(cond), rtol=0, atol=0)
    torch.testing.assert_close(gen(cond[:, 1:2]), gen(cond)[:, :, 1:2], rtol=1e-4, atol=1e-5)
    same_seed, other_seed = _generator(), _generator(seed=6)
    torch.testing.assert_close(same_seed.eval_prompt_key, gen.eval_prompt_key, rtol=0, atol=0)
    assert not torch.equal(other_seed.eval_prompt_key, gen.eval_prompt_key)
    assert gen.eval_prompt_key.shape == (4, 3, 64) and gen.eval_prompt_key.abs().max() <= 1
    assert not torch.equal(gen.eval_prompt_key, gen.eval_prompt_value)


def test_eval_prompt_resample_reproduces_reference_randomness():
    gen = _generator(eval_prompt="resample").eval()
    cond = torch.randn(12, 2, 192)
    assert not torch.allclose(gen(cond), gen(cond))


def test_zero_initializer():
    gen = _generator(initializer="zero")
    cond = torch.randn(12, 2, 192)
    assert torch.count_nonzero(gen.eval_prompt_key) == 0
    torch.testing.assert_close(gen.train()(cond), gen.eval()(cond), rtol=0, atol=0)
    # with a zero prompt every position and head of one image and layer gets the same prefix
    out = gen(cond)
    torch.testing.assert_close(out[..., :, :, :], out[..., :1, :1, :].expand_as(out), rtol=0, atol=0)


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="initializer"):
        _generator(initializer="normal")
    with pytest.raises(ValueError, match="eval_prompt"):
        _generator(eval_prompt="random")
    with pytest.raises(ValueError, match="prefix_length"):
        _generator(prefix_length=0)


def test_autocast_dtype():
    gen = _generator()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gen(torch.randn(12, 2, 192)).dtype == torch.bfloat16
