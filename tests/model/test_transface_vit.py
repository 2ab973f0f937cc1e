"""TransFace's patch-9 ViT: the token layout, masking, sizes, and the release's model.pt loading and embedding as is."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import load_worker, run_torchrun_worker
from model.backbones import create_embedding_backbone, list_embedding_backbones
from model.recognition import FaceRecognizer, RecognitionConfig, build_recognizer
from model.transface_vit import TransFaceViT, create_transface_vit, token_pixel_box
from trainer.engine import uint8_embedder
from trainer.precision import Precision
from utils.checkpoint import CheckpointError

DIST_WORKER = Path(__file__).with_name("_transface_dist_worker.py")
dist_worker = load_worker(DIST_WORKER)


def _small(**kwargs) -> TransFaceViT:
    """Width 16, 2 blocks, 112 px (144 tokens), embedding 8."""
    torch.manual_seed(0)
    return TransFaceViT(16, 2, img_size=112, embedding_size=8, **kwargs)


def _captured_block_input(model: TransFaceViT, images: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(images)
    handle.remove()
    return seen[0]


def _captured_gate_input(model: TransFaceViT, images: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.senet.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(images)
    handle.remove()
    return seen[0].view(images.shape[0], model.num_patches, model.embed_dim)


def test_token_to_pixel_map_and_the_unseen_border():
    # token t covers rows 9 (t // 12) ... + 8 and columns 9 (t % 12) ... + 8
    assert token_pixel_box(13) == (slice(9, 18), slice(9, 18))
    assert token_pixel_box(143) == (slice(99, 108), slice(99, 108))
    assert token_pixel_box(1) == (slice(0, 9), slice(9, 18))
    model = _small()
    tokens = model.patch_embed(torch.zeros(1, 3, 112, 112))
    assert tokens.shape == (1, 144, 16)
    changed = torch.zeros(1, 3, 112, 112)
    changed[:, :, 9:18, 9:18] = 1.0  # token 13's pixels only
    moved = (model.patch_embed(changed) - tokens).abs().sum(dim=2)[0]
    assert moved.nonzero().flatten().tolist() == [13]
    # pixel rows and columns 108-111 are never seen: the embedding ignores them
    model.eval()
    images = torch.randn(2, 3, 112, 112)
    border = images.clone()
    border[:, :, 108:, :] = 5.0
    border[:, :, :, 108:] = -5.0
    torch.testing.assert_close(model(border), model(images), rtol=0, atol=0)


@pytest.mark.parametrize("ratio, release, kept", [(0.25, False, 108), (0.05, False, 136), (0.05, True, 129)])
def test_masking_keeps_int_t_times_one_minus_r_tokens_and_restores_the_mask_token(ratio, release, kept):
    # int(144 * 0.75) = 108; int(144 * 0.95) = 136.8 -> 136; the release masks 10 % whatever r: int(129.6) = 129
    model = _small(mask_ratio=ratio, release_masking=release).train()
    images = torch.randn(3, 3, 112, 112)
    assert _captured_block_input(model, images).shape == (3, kept, 16)
    tokens = _captured_gate_input(model, images)
    is_mask = (tokens == model.mask_token.detach()).all(dim=2)
    assert is_mask.sum(dim=1).tolist() == [144 - kept] * 3
    assert not torch.equal(is_mask[0], is_mask[1])  # each sample draws its own tokens


def test_without_masking_the_mask_token_is_kept_but_frozen():
    # unused, so not trained: a trainable parameter without a gradient would stall DDP's reduction
    assert not _small().mask_token.requires_grad and _small(mask_ratio=0.1).mask_token.requires_grad
    assert "mask_token" in _small().state_dict()  # the release's model.pt holds it whatever the ratio


def test_eval_never_masks():
    model = _small(mask_ratio=0.5).eval()
    images = torch.randn(2, 3, 112, 112)
    assert _captured_block_input(model, images).shape == (2, 144, 16)
    torch.testing.assert_close(model(images), model(images), rtol=0, atol=0)


def test_gate_and_token_std_are_the_gated_tokens_statistics():
    model = _small().eval()
    images = torch.randn(2, 3, 112, 112)
    out = model.forward_with_tokens(images)
    tokens = _captured_gate_input(model, images)
    # g = sigmoid(W2 relu(W1 flatten(X))), both without bias
    w1, w2 = model.senet[0].weight, model.senet[2].weight
    gate = torch.sigmoid(F.relu(tokens.flatten(1) @ w1.T) @ w2.T)
    torch.testing.assert_close(out.gate, gate)
    gated = tokens * gate[..., None]
    # std over the D channels with Bessel's correction: sqrt(sum (x - mean)^2 / (D - 1))
    std = ((gated - gated.mean(dim=2, keepdim=True)) ** 2).sum(dim=2).div(15).sqrt()
    torch.testing.assert_close(out.token_std, std)
    assert out.embedding.shape == (2, 8) and out.gate.shape == (2, 144) and out.token_std.shape == (2, 144)


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    images = torch.randn(2, 3, 112, 112)
    grads = []
    for enable in (False, True):
        model = _small().train()
        model.set_grad_checkpointing(enable)
        model(images).square().sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_transface_s_shapes_and_parameter_count():
    # D = 512, 12 blocks, T = 144 tokens, E = 512:
    #   block: LN 2D + qkv 3D^2 + proj D^2 + D + LN 2D + fc1 4D^2 + 4D + fc2 4D^2 + D = 12 D^2 + 10 D = 3,150,848
    #   12 blocks 37,810,176; patch embed 3*81*D + D = 124,928; pos embed T D = 73,728; mask token 512; norm 1,024
    #   neck: T D * D = 37,748,736 + BN 1,024 + D * 512 = 262,144 + BN 1,024 = 38,012,928
    #   gate: T D * T = 10,616,832 + T * T = 20,736 = 10,637,568
    #   total 86,660,864 (the 86.7M of the release's vit_s)
    model = create_transface_vit("transface_vit_s").eval()
    assert sum(p.numel() for p in model.parameters()) == 86_660_864
    assert len(model.blocks) == 12 and model.embed_dim == 512 and model.mask_ratio == 0.0
    out = model.forward_with_tokens(torch.randn(2, 3, 112, 112))
    assert [tuple(t.shape) for t in out] == [(2, 512), (2, 144), (2, 144)]


def test_registered_names():
    for arch in ("transface_vit_t", "transface_vit_s", "transface_vit_b", "transface_vit_l"):
        assert arch in list_embedding_backbones()
    model = create_embedding_backbone("transface_vit_t", img_size=36, embedding_size=64, mask_ratio=0.3)
    assert model.num_patches == 16 and model.num_features == 64 and model.kept_tokens() == 11  # int(16 * 0.7)


# The release's vit_t (D = 256, 12 blocks, 144 tokens, embedding 512): every key of its model.pt and its shape, from
# its module structure (patch_embed.proj conv, pos_embed, mask_token, blocks.i.{norm1, attn.qkv (no bias), attn.proj,
# norm2, mlp.fc1, mlp.fc2}, norm, feature = Linear/BN/Linear/BN, senet = Linear/ReLU/Linear/Sigmoid).
D, E, T = 256, 512, 144
RELEASE_KEYS = [
    ("pos_embed", (1, T, D)),
    ("mask_token", (1, 1, D)),
    ("patch_embed.proj.weight", (D, 3, 9, 9)),
    ("patch_embed.proj.bias", (D,)),
    ("norm.weight", (D,)),
    ("norm.bias", (D,)),
    ("feature.0.weight", (D, T * D)),
    ("feature.1.weight", (D,)),
    ("feature.1.bias", (D,)),
    ("feature.1.running_mean", (D,)),
    ("feature.1.running_var", (D,)),
    ("feature.1.num_batches_tracked", ()),
    ("feature.2.weight", (E, D)),
    ("feature.3.weight", (E,)),
    ("feature.3.bias", (E,)),
    ("feature.3.running_mean", (E,)),
    ("feature.3.running_var", (E,)),
    ("feature.3.num_batches_tracked", ()),
    ("senet.0.weight", (T, T * D)),
    ("senet.2.weight", (T, T)),
]
BLOCK_KEYS = [
    ("norm1.weight", (D,)),
    ("norm1.bias", (D,)),
    ("attn.qkv.weight", (3 * D, D)),
    ("attn.proj.weight", (D, D)),
    ("attn.proj.bias", (D,)),
    ("norm2.weight", (D,)),
    ("norm2.bias", (D,)),
    ("mlp.fc1.weight", (4 * D, D)),
    ("mlp.fc1.bias", (4 * D,)),
    ("mlp.fc2.weight", (D, 4 * D)),
    ("mlp.fc2.bias", (D,)),
]


def _release_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    keys = RELEASE_KEYS + [(f"blocks.{i}.{name}", shape) for i in range(12) for name, shape in BLOCK_KEYS]
    state = {}
    for name, shape in keys:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=gen)
        elif "norm" in name and name.endswith("weight") or name.startswith("feature.") and name.count(".") == 2:
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 50
            state[name] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return state


def _release_embedding(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The release's forward in evaluation mode, written out from the state dict alone."""
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=9)
    tokens = tokens.flatten(2).transpose(1, 2) + state["pos_embed"]
    b = x.shape[0]
    for i in range(12):
        p = {name: state[f"blocks.{i}.{name}"] for name, _ in BLOCK_KEYS}
        h = F.layer_norm(tokens, (D,), p["norm1.weight"], p["norm1.bias"])
        q, k, v = (h @ p["attn.qkv.weight"].T).view(b, T, 3, 8, D // 8).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (D // 8) ** -0.5, dim=-1)
        tokens = tokens + F.linear(
            (attn @ v).transpose(1, 2).reshape(b, T, D), p["attn.proj.weight"], p["attn.proj.bias"]
        )
        h = F.layer_norm(tokens, (D,), p["norm2.weight"], p["norm2.bias"])
        h = F.relu6(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
        tokens = tokens + F.linear(h, p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    tokens = F.layer_norm(tokens, (D,), state["norm.weight"], state["norm.bias"])
    gate = torch.sigmoid(F.relu(tokens.flatten(1) @ state["senet.0.weight"].T) @ state["senet.2.weight"].T)
    out = (tokens * gate[..., None]).flatten(1) @ state["feature.0.weight"].T
    for bn in ("feature.1", "feature.3"):
        out = F.batch_norm(
            out,
            state[f"{bn}.running_mean"],
            state[f"{bn}.running_var"],
            state[f"{bn}.weight"],
            state[f"{bn}.bias"],
            eps=2e-5,
        )
        if bn == "feature.1":
            out = out @ state["feature.2.weight"].T
    return out


def test_release_model_pt_loads_as_is_and_embeds_like_the_release(tmp_path):
    state = _release_state()
    path = tmp_path / "model.pt"
    torch.save(state, path)
    cfg = RecognitionConfig(arch="transface_vit_t", patch_size=9, num_classes=4)
    model = build_recognizer(cfg, pretrained_weights=path).eval()
    loaded = model.backbone.state_dict()
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name
    # an aligned 112 px uint8 face through the face preset: (x / 255 - 0.5) / 0.5, no resize or crop
    pixels = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    embed = uint8_embedder(model, 112, torch.device("cpu"), Precision("cpu", None, False, "test"), preset="face")
    want = _release_embedding(state, (pixels.float() / 255 - 0.5) / 0.5)
    torch.testing.assert_close(embed(pixels), want, rtol=1e-4, atol=1e-4)

    # a file of another size, or not a state dict, is one clear error naming it
    del state["senet.2.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="model.pt does not fit .*missing \\['senet.2.weight'\\]"):
        build_recognizer(cfg, pretrained_weights=path)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_processes_give_the_ehsm_weighted_loss_and_gradients_of_one(tmp_path):
    # half the batch per rank: the token stds travel through DDP, the EHSM weights are gathered like the labels
    gen = torch.Generator().manual_seed(2)
    batch = {"images": torch.randn(6, 3, 36, 36, generator=gen), "labels": torch.tensor([0, 1, 2, 3, 4, 1])}
    torch.manual_seed(0)
    model = FaceRecognizer(RecognitionConfig(**dist_worker.CONFIG)).eval()
    out = model(batch["images"], batch["labels"])
    out["loss"].backward()
    torch.save(batch, tmp_path / "batch.pt")
    run_torchrun_worker(DIST_WORKER, [tmp_path / "batch.pt", tmp_path / "out.pt"], timeout=110)
    dist = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(dist["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # rank 0 logs the mean weight of its own half
        weights = 1 + torch.exp(-model.backbone.forward_with_tokens(batch["images"]).token_std.mean(dim=1))
    assert dist["ehsm_weight"].item() == pytest.approx(weights[:3].mean().item(), rel=1e-5)
    assert out["ehsm_weight"].item() == pytest.approx(weights.mean().item(), rel=1e-5)
    torch.testing.assert_close(dist["centres"], model.partial_fc.weight.grad, rtol=1e-4, atol=1e-6)
    for name, param in model.backbone.named_parameters():
        if param.grad is not None:
            scale = float(param.grad.abs().max())
            torch.testing.assert_close(dist["backbone"][name], param.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
