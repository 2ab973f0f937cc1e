"""IResNet backbones: registry, hand-counted parameters, arcface_torch key names, block order, shapes, frozen
embedding scale, gradients, gradient checkpointing, input-size errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from model import iresnet
from model.iresnet import IBasicBlock, IResNet
from model.recognition import RecognitionConfig, build_recognizer
from trainer.optim import create_optimizer
from utils.checkpoint import CheckpointError

LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


def _hand_count(layers: tuple[int, ...], s: int = 7, emb: int = 512) -> int:
    """Parameters from the layer shapes (BN: weight + bias = 2·C; PReLU: C slopes; convs have no bias)."""
    stem = 3 * 64 * 3 * 3 + 2 * 64 + 64  # conv1 + bn1 + prelu = 1,728 + 128 + 64 = 1,920

    def block(cin: int, c: int, shortcut: bool) -> int:
        # bn1 + conv1 (3x3, cin -> c) + bn2 + prelu + conv2 (3x3, c -> c) + bn3 [+ 1x1 conv cin -> c + its BN]
        n = 2 * cin + 9 * cin * c + 2 * c + c + 9 * c * c + 2 * c
        return n + (cin * c + 2 * c if shortcut else 0)

    total, cin = stem, 64
    for c, blocks in zip((64, 128, 256, 512), layers):
        total += block(cin, c, True) + (blocks - 1) * block(c, c, False)
        cin = c
    # bn2 (2·512) + fc (512·s·s·emb weights + emb biases) + features BatchNorm1d (emb scale + emb shift)
    return total + 2 * 512 + (512 * s * s * emb + emb) + 2 * emb


def _small(seed: int = 0, **kwargs) -> IResNet:
    torch.manual_seed(seed)
    return iresnet.iresnet18(img_size=48, **kwargs)


def test_registered_with_timm_and_no_name_clash():
    assert sorted(timm.list_models("iresnet*")) == sorted(LAYERS)
    for name in LAYERS:
        assert timm.models.model_entrypoint(name) is getattr(iresnet, name)
    model = timm.create_model("iresnet18", img_size=48, dropout=0.2, embedding_size=128)
    assert isinstance(model, IResNet) and model.num_features == 128 and model.dropout.p == 0.2
    assert model.fc.in_features == 512 * 3 * 3
    with pytest.raises(ValueError, match="pretrained=True would download.*load_arcface_torch_backbone"):
        timm.create_model("iresnet50", pretrained=True)
    with pytest.raises(TypeError, match="iresnet18: unexpected arguments drop_path_rate"):
        iresnet.iresnet18(drop_path_rate=0.1)


@pytest.mark.parametrize("arch", sorted(LAYERS))
def test_parameter_counts_by_hand(arch):
    with torch.device("meta"):
        model = timm.create_model(arch)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == _hand_count(LAYERS[arch])
    assert trainable == total - 512  # the BatchNorm1d scale is a parameter but frozen
    assert model.num_features == 512


def test_parameter_totals_match_the_quoted_sizes():
    # iresnet50: stem 1,920; stages 226,752 + 1,117,824 + 16,278,272 + 13,118,464; bn2 1,024;
    # fc 512·49·512 + 512 = 12,845,568; features 1,024  ->  43,590,848
    assert _hand_count(LAYERS["iresnet50"]) == 43_590_848
    # iresnet100: stem 1,920; stages 226,752 + 3,780,096 + 35,181,312 + 13,118,464; head as above -> 65,156,160
    assert _hand_count(LAYERS["iresnet100"]) == 65_156_160
    # The quoted ~43.6M / ~65.2M are these totals rounded; they include the 512 frozen scales (43,590,336 and
    # 65,155,648 are trainable), a difference far below the rounding.
    assert round(43_590_848 / 1e6, 1) == 43.6 and round(65_156_160 / 1e6, 1) == 65.2
    # At 48 px the map is 3x3, so only fc changes: 512·9·512 instead of 512·49·512.
    assert _hand_count(LAYERS["iresnet50"], s=3) == 43_590_848 - 512 * 40 * 512


def test_state_dict_names_and_shapes_are_arcface_torch():
    with torch.device("meta"):
        model = iresnet.iresnet18()
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"conv1.weight", "prelu.weight", "fc.weight", "fc.bias"}
    expected |= {f"{m}.{k}" for m in ("bn1", "bn2", "features") for k in bn}
    for stage in range(1, 5):
        for index in range(2):
            prefix = f"layer{stage}.{index}."
            expected |= {prefix + n for n in ("conv1.weight", "conv2.weight", "prelu.weight")}
            expected |= {f"{prefix}{m}.{k}" for m in ("bn1", "bn2", "bn3") for k in bn}
        expected |= {f"layer{stage}.0.downsample.0.weight"} | {f"layer{stage}.0.downsample.1.{k}" for k in bn}
    sd = model.state_dict()
    assert set(sd) == expected
    shapes = {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer4.1.prelu.weight": (512,),
        "fc.weight": (512, 512 * 7 * 7),
        "features.weight": (512,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_block_order_and_stride_on_second_conv():
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
    block = IBasicBlock(4, 6, stride=2, downsample=down)
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    with torch.no_grad():  # non-trivial BN statistics and affine terms, PReLU slopes
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
        block.prelu.weight.uniform_(-0.5, 0.5)
    block.eval()
    x = torch.randn(2, 4, 8, 8)

    def bn(m: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, 1e-5)

    out = bn(block.bn1, x)
    out = F.conv2d(out, block.conv1.weight, padding=1)
    out = F.prelu(bn(block.bn2, out), block.prelu.weight)
    out = bn(block.bn3, F.conv2d(out, block.conv2.weight, stride=2, padding=1))
    shortcut = bn(down[1], F.conv2d(x, down[0].weight, stride=2))
    with torch.no_grad():
        assert torch.allclose(block(x), out + shortcut, atol=1e-5)
        assert block(x).shape == (2, 6, 4, 4)
        # Without a projection the shortcut is the identity (and there is no activation after the sum).
        same = IBasicBlock(6, 6).eval()
        y = torch.randn(2, 6, 4, 4)
        residual = same.bn3(same.conv2(same.prelu(same.bn2(same.conv1(same.bn1(y))))))
        assert torch.allclose(same(y), residual + y, atol=1e-6)


def test_stage_strides_and_output_shapes_at_112_and_48():
    torch.manual_seed(0)
    model = iresnet.iresnet18().eval()
    for stage in model.stages:
        assert stage[0].conv2.stride == (2, 2) and all(b.conv2.stride == (1, 1) for b in stage[1:])
    with torch.no_grad():
        x = torch.randn(2, 3, 112, 112)
        h = model.prelu(model.bn1(model.conv1(x)))
        sizes = [h.shape[-1]]
        for stage in model.stages:
            h = stage(h)
            sizes.append(h.shape[-1])
        assert sizes == [112, 56, 28, 14, 7]
        assert model.forward_features(x).shape == (2, 512, 7, 7)
        assert model(x).shape == (2, 512)
    small = _small().eval()
    with torch.no_grad():
        assert small.forward_features(torch.randn(2, 3, 48, 48)).shape == (2, 512, 3, 3)
        assert small(torch.randn(2, 3, 48, 48)).shape == (2, 512)


def test_iresnet100_forward_at_112():
    torch.manual_seed(0)
    # Batch statistics in the 2-D BatchNorms: with the N(0, 0.1²) init and default running statistics, an untrained
    # IResNet-100 overflows in eval mode (as arcface_torch's does); BatchNorm1d in eval mode accepts a batch of 1.
    model = iresnet.iresnet100().train()
    model.features.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 112, 112))
    assert out.shape == (1, 512) and torch.isfinite(out).all()


def test_initialisation_as_arcface_torch():
    model = _small()
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Conv2d)])
    assert weights.std().item() == pytest.approx(0.1, rel=0.01) and abs(weights.mean().item()) < 1e-3
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    assert torch.equal(model.prelu.weight, torch.full((64,), 0.25))
    assert torch.equal(model.features.weight, torch.ones(512)) and not model.features.weight.requires_grad
    assert model.features.bias.requires_grad


def test_gradients_reach_every_trainable_parameter_and_the_scale_stays_one():
    model = _small().train()
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    target = torch.randn(4, 512, generator=torch.Generator().manual_seed(2))
    (model(x) * target).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.features.weight.grad is None

    # A plain SGD over all parameters (weight decay included) skips the frozen scale; the shift moves.
    bias_before = model.features.bias.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4).step()
    assert torch.equal(model.features.weight, torch.ones(512))
    assert not torch.equal(model.features.bias, bias_before)

    # Our optimiser factory takes the trainable ones; the frozen scale is still 1 after a step.
    optimizer = create_optimizer([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=5e-4)
    optimizer.step()
    assert torch.equal(model.features.weight, torch.ones(512))

    # Loading an arcface_torch-layout state dict keeps the scale frozen.
    fresh = _small(seed=5)
    fresh.load_state_dict(model.state_dict())
    assert not fresh.features.weight.requires_grad


def test_grad_checkpointing_gives_same_outputs_grads_and_running_stats():
    model = _small().train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    out, out_ckpt = model(x), ckpt(x)
    out.square().sum().backward()
    out_ckpt.square().sum().backward()
    assert torch.allclose(out, out_ckpt, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    # The recomputation in backward does not update the BatchNorm statistics a second time.
    sd, sd_ckpt = model.state_dict(), ckpt.state_dict()
    for key, value in sd.items():
        assert torch.allclose(value.float(), sd_ckpt[key].float(), rtol=1e-5, atol=1e-7), key
    assert sd_ckpt["layer3.1.bn2.num_batches_tracked"].item() == 1
    assert ckpt.layer2[0].bn1.momentum == 0.1  # restored after the recomputation


@pytest.mark.parametrize("img_size", [100, 8, 0, -16])
def test_bad_img_size_is_a_clear_error(img_size):
    with pytest.raises(ValueError, match=rf"img_size must be a positive multiple of 16 .*got {img_size}$"):
        iresnet.iresnet18(img_size=img_size)


def test_wrong_input_size_is_a_clear_error():
    model = _small().eval()
    with pytest.raises(ValueError, match=r"img_size 48 expects \(B, 3, 48, 48\) images, got \(1, 3, 112, 112\)"):
        model(torch.randn(1, 3, 112, 112))


def test_fc_and_feature_norm_run_in_float32_outside_autocast():
    model = _small().eval()
    seen = {}
    model.dropout.register_forward_hook(lambda module, args, out: seen.update(head_in=out))
    model.fc.register_forward_hook(lambda module, args, out: seen.update(fc_out=out))
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embedding = model(x)
    assert seen["head_in"].dtype == torch.bfloat16  # the stages, bn2 and dropout run under autocast
    assert seen["fc_out"].dtype == torch.float32 and embedding.dtype == torch.float32
    # arcface_torch: fc(x.float()) then the feature BatchNorm, both in float32 (bf16 values are exact in float32)
    with torch.no_grad():
        fc = F.linear(seen["head_in"].float(), model.fc.weight, model.fc.bias)
        f = model.features
        expected = F.batch_norm(fc, f.running_mean, f.running_var, f.weight, f.bias, False, 0.0, 1e-5)
    torch.testing.assert_close(seen["fc_out"], fc, rtol=0, atol=0)
    torch.testing.assert_close(embedding, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- arcface_torch backbone.pth files
# arcface_torch backbones/iresnet.py: stem conv1 (3x3, 3 -> 64) + bn1 + prelu; layer1..layer4 of IBasicBlocks
# (bn1, conv1 3x3, bn2, prelu, conv2 3x3 with the stage's stride, bn3), widths 64/128/256/512, every stage's first
# block with stride 2 and downsample = (conv1x1 stride 2, BatchNorm2d); then bn2 (512), dropout, fc
# (512·7·7 -> num_features at 112 px; 512·s·s in general) and features (BatchNorm1d). iresnet18 has [2, 2, 2, 2].
R18_BLOCKS = (2, 2, 2, 2)
WIDTHS = (64, 128, 256, 512)
FILE_SIDE = 2  # 32 px input: fc.weight is (512, 512·2·2)
FILE_EMBEDDING = 512


def _bn_entries(name: str, channels: int) -> dict[str, tuple[int, ...]]:
    shapes = {"weight": (channels,), "bias": (channels,), "running_mean": (channels,), "running_var": (channels,)}
    return {f"{name}.{k}": v for k, v in shapes.items()} | {f"{name}.num_batches_tracked": ()}


def _arcface_torch_shapes(blocks: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an arcface_torch IResNet backbone.pth, typed from its module layout (not our state_dict)."""
    shapes = {"conv1.weight": (64, 3, 3, 3), **_bn_entries("bn1", 64), "prelu.weight": (64,)}
    cin = 64
    for stage, (width, count) in enumerate(zip(WIDTHS, blocks), start=1):
        for index in range(count):
            p = f"layer{stage}.{index}."
            shapes |= _bn_entries(p + "bn1", cin)
            shapes[p + "conv1.weight"] = (width, cin, 3, 3)
            shapes |= _bn_entries(p + "bn2", width)
            shapes[p + "prelu.weight"] = (width,)
            shapes[p + "conv2.weight"] = (width, width, 3, 3)
            shapes |= _bn_entries(p + "bn3", width)
            if index == 0:
                shapes[p + "downsample.0.weight"] = (width, cin, 1, 1)
                shapes |= _bn_entries(p + "downsample.1", width)
            cin = width
    shapes |= _bn_entries("bn2", 512)
    shapes |= {"fc.weight": (FILE_EMBEDDING, 512 * FILE_SIDE**2), "fc.bias": (FILE_EMBEDDING,)}
    return shapes | _bn_entries("features", FILE_EMBEDDING)


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded values of a trained-looking scale: convs and fc N(0, 1/fan_in), BN statistics and affine terms away
    from their initial values, PReLU slopes in [0, 0.5]."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("prelu.weight"):
            state[key] = torch.rand(shape, generator=gen) * 0.5
        elif len(shape) > 1:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        elif key.endswith(".weight") and key.startswith("features"):
            state[key] = torch.ones(shape)  # arcface_torch freezes this scale at 1
        elif key.endswith(".weight"):
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:  # biases and running means
            state[key] = 0.1 * torch.randn(shape, generator=gen)
    return state


def _functional_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """arcface_torch's eval-mode forward written out with torch.nn.functional on the file's raw tensors (float64)."""
    sd = {k: v.double() for k, v in sd.items()}

    def bn(name: str, t: torch.Tensor) -> torch.Tensor:
        stats = (sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"], sd[f"{name}.bias"])
        return F.batch_norm(t, *stats, training=False, eps=1e-5)

    h = F.prelu(bn("bn1", F.conv2d(x.double(), sd["conv1.weight"], padding=1)), sd["prelu.weight"])
    for stage, count in enumerate(blocks, start=1):
        for index in range(count):
            p = f"layer{stage}.{index}."
            stride = 2 if index == 0 else 1
            out = F.conv2d(bn(p + "bn1", h), sd[p + "conv1.weight"], padding=1)
            out = F.prelu(bn(p + "bn2", out), sd[p + "prelu.weight"])
            out = bn(p + "bn3", F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1))
            if index == 0:
                h = bn(p + "downsample.1", F.conv2d(h, sd[p + "downsample.0.weight"], stride=2)) + out
            else:
                h = h + out
    flat = torch.flatten(bn("bn2", h), 1)  # dropout is the identity in eval mode
    return bn("features", F.linear(flat, sd["fc.weight"], sd["fc.bias"]))


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An arcface_torch iresnet18 backbone.pth for 32 px input with seeded values, and its state dict."""
    state = _random_state(_arcface_torch_shapes(R18_BLOCKS))
    path = tmp_path_factory.mktemp("arcface_torch") / "backbone.pth"
    torch.save(state, path)
    return path, state


def test_arcface_torch_backbone_loads_as_it_is_and_embeds_as_arcface_torch(r18_file):
    path, state = r18_file
    model = iresnet.load_arcface_torch_backbone(path)
    assert not model.training and tuple(len(stage) for stage in model.stages) == R18_BLOCKS
    assert model.img_size == 32 and model.num_features == FILE_EMBEDDING
    assert not model.features.weight.requires_grad  # still frozen after loading
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    expected = _functional_forward(state, x, R18_BLOCKS)
    with torch.no_grad():
        embedding = model(x)
    assert expected.abs().max() > 1.0  # a non-trivial embedding, compared at float32 precision
    torch.testing.assert_close(embedding.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    # naming the architecture the file holds gives the same model
    named = iresnet.load_arcface_torch_backbone(path, "iresnet18")
    with torch.no_grad():
        torch.testing.assert_close(named(x), embedding, rtol=0, atol=0)


def test_arcface_torch_file_of_another_architecture_is_refused_by_name(r18_file, tmp_path):
    path, state = r18_file
    with pytest.raises(CheckpointError) as info:
        iresnet.load_arcface_torch_backbone(path, "iresnet34")
    message = str(info.value)
    assert str(path) in message and "iresnet34 (3, 4, 6, 3) at 32 px" in message
    assert "the file has blocks per stage (2, 2, 2, 2) (iresnet18)" in message
    assert "missing keys: layer1.2.bn1.weight" in message and "unexpected keys" not in message
    # into an existing model of the right architecture but another input size: fc.weight's shapes are named
    model48 = iresnet.iresnet18(img_size=48)
    with pytest.raises(CheckpointError, match=r"shapes: fc\.weight \(512, 2048\) \(model \(512, 4608\)\)"):
        iresnet.load_arcface_torch_weights(model48, path)
    # block counts of no known architecture (a stage short of iresnet18) cannot be inferred
    short = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"short\.pth: blocks per stage \(2, 2, 2, 1\) match no arcface_torch"):
        iresnet.load_arcface_torch_backbone(tmp_path / "short.pth")
    # a training checkpoint is not a bare state dict
    torch.save({"epoch": 3, "state_dict_backbone": state}, tmp_path / "checkpoint_gpu_0.pt")
    with pytest.raises(CheckpointError, match=r"not a bare state dict.*epoch, state_dict_backbone"):
        iresnet.load_arcface_torch_backbone(tmp_path / "checkpoint_gpu_0.pt")


def test_recognition_fine_tunes_from_an_arcface_torch_file(r18_file):
    path, state = r18_file
    cfg = RecognitionConfig(arch="iresnet18", img_size=32, embedding_size=FILE_EMBEDDING, num_classes=5)
    model = build_recognizer(cfg, path)  # train.py --method recognition --pretrained-weights backbone.pth
    loaded = model.backbone.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert not model.backbone.features.weight.requires_grad
    with pytest.raises(CheckpointError, match=r"does not fit iresnet34 \(3, 4, 6, 3\) at 32 px.*missing keys"):
        build_recognizer(RecognitionConfig(**{**vars(cfg), "arch": "iresnet34"}), path)
    with pytest.raises(CheckpointError, match=r"shapes: fc\.weight \(512, 2048\) \(model \(64, 2048\)\)"):
        build_recognizer(RecognitionConfig(**{**vars(cfg), "embedding_size": 64}), path)
