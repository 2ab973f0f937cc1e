"""FaceGCD meta-architecture: shapes, determinism, trainable sets, checkpointing, state dicts, config inference."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from model import CheckpointError, FaceGCD, ModelConfig, build_facegcd, infer_model_config, load_pretrained_backbone


@pytest.fixture
def make_model(make_config, tiny_backbone_template):
    """Build a FaceGCD around a copy of the session backbone (as if it held pretrained weights)."""

    def factory(**overrides) -> FaceGCD:
        torch.manual_seed(1)
        return FaceGCD(make_config(**overrides), copy.deepcopy(tiny_backbone_template))

    return factory


@pytest.mark.parametrize("batch", [1, 3])
def test_shapes(make_model, batch):
    model = make_model()
    images = torch.randn(2 * batch, 3, 32, 32)
    tokens = model.backbone.embed_tokens(images)
    assert tokens.shape == (2 * batch, 5, 192)
    assert model.prefixes(tokens).shape == (12, 2, 2 * batch, 3, 4, 64)
    assert model.project(images).shape == (2 * batch, 128)
    out = model(images, torch.arange(batch), torch.ones(batch, dtype=torch.bool))
    assert set(out) == {"loss", "loss_unsup", "loss_sup", "labelled_fraction", "batches_without_labels"}
    assert torch.isfinite(out["loss"]) and out["batches_without_labels"].item() == 0.0
    unlabelled = model(images, torch.arange(batch), torch.zeros(batch, dtype=torch.bool))
    assert unlabelled["batches_without_labels"].item() == 1.0 and unlabelled["loss_sup"].item() == 0.0
    features = model.eval().extract_features(images)
    assert features.shape == (2 * batch, 192)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2 * batch))


def test_prefix_length_zero_is_plain_timm_vit(make_model, images):
    model = make_model(prefix_length=0).eval()
    assert model.conditioner is None and model.backbone.prefix_generator is None
    assert not any(k.startswith(("conditioner.", "backbone.prefix_generator.")) for k in model.state_dict())
    twin = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=0)
    twin.load_state_dict({k[len("backbone.") :]: v for k, v in model.state_dict().items() if "backbone." in k})
    with torch.no_grad():
        torch.testing.assert_close(model.extract_features(images), F.normalize(twin.eval()(images), dim=-1))


def test_eval_features_deterministic_and_batch_independent(make_model, images):
    model = make_model().eval()
    with torch.no_grad():
        batch = model.extract_features(images)
        torch.testing.assert_close(model.extract_features(images), batch, rtol=0, atol=0)
        alone = model.extract_features(images[2:3])
    torch.testing.assert_close(alone, batch[2:3], rtol=1e-4, atol=1e-5)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model.extract_features(images), batch, atol=1e-6)  # fresh random prompts


@pytest.mark.parametrize(
    "overrides",
    [{}, {"layer_embed": True, "grad_from_block": 0}, {"freeze": ("projection_head.mlp.0", "backbone.blocks.11.mlp")}],
)
def test_trainable_parameters_get_gradients_and_frozen_do_not(make_model, images, overrides):
    model = make_model(**overrides)
    out = model(images, torch.tensor([0, 1, 0]), torch.tensor([True, True, False]))
    out["loss"].backward()
    trainable = {n for n, _ in model.named_trainable_parameters()}
    first = model.cfg.first_trainable_block
    expected = {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("backbone.prefix_generator.", "projection_head."))
        or any(n.startswith(f"backbone.blocks.{i}.") for i in range(first, 12))
    }
    expected -= {"projection_head.last_layer.weight_g"}
    expected = {n for n in expected if not n.startswith(model.cfg.freeze)}
    assert trainable == expected
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
    assert model.conditioner is not None
    assert all(not p.requires_grad for p in model.conditioner.parameters())


def test_freeze_unknown_prefix_is_an_error(make_model):
    with pytest.raises(ValueError, match="backbone.nothing"):
        make_model(freeze=("backbone.nothing",))


def test_params_groups(make_model):
    model = make_model()
    groups = {g["name"]: g for g in model.get_params_groups(2e-5)}
    assert groups["decay"]["weight_decay"] == 2e-5 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert all(p.ndim <= 1 for p in groups["no_decay"]["params"])
    grouped = {id(p) for g in groups.values() for p in g["params"]}
    assert grouped == {id(p) for p in model.trainable_parameters()}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight"} <= model.no_weight_decay()


def test_grad_checkpointing_matches_plain_backward(make_model, images):
    model = make_model()
    labels, mask = torch.tensor([0, 1, 0]), torch.tensor([True, True, False])
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # same random base prompts in both runs
        model(images, labels, mask)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_trainable_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_state_dict_round_trip(make_model, images, tmp_path):
    model = make_model(layer_embed=True).eval()
    keys = set(model.state_dict())
    assert {"backbone.prefix_generator.eval_prompt_key", "backbone.prefix_generator.eval_prompt_value"} <= keys
    assert any(k.startswith("conditioner.blocks.11.") for k in keys)
    assert any(k.startswith("projection_head.last_layer.weight_v") for k in keys)
    torch.save({"state_dict": model.state_dict(), "model_config": model.cfg.to_dict()}, tmp_path / "ckpt.pth")

    saved = torch.load(tmp_path / "ckpt.pth", map_location="cpu", weights_only=True)
    restored = make_model(**dataclasses.asdict(ModelConfig.from_dict(saved["model_config"]))).eval()
    with torch.no_grad():  # move every parameter and buffer (eval prompts included) away from the saved values
        for value in restored.state_dict().values():
            value.add_(0.5)
    restored.load_model_state(saved["state_dict"], allow_missing_conditioner=False)
    with torch.no_grad():
        torch.testing.assert_close(restored.extract_features(images), model.extract_features(images), rtol=0, atol=0)


def test_reference_checkpoint_without_prompt_or_conditioner(make_model, images):
    model = make_model(seed=11)
    reference = {f"module.{k}": v for k, v in model.state_dict().items()}
    reference = {k: v for k, v in reference.items() if "eval_prompt" not in k and not k.startswith("module.cond")}
    target = make_model(seed=11)
    with torch.no_grad():
        target.backbone.prefix_generator.eval_prompt_key.zero_()
    with pytest.raises(RuntimeError, match="conditioner"):
        target.load_model_state(reference, allow_missing_conditioner=False)
    target.load_model_state(reference, allow_missing_conditioner=True)
    torch.testing.assert_close(
        target.backbone.prefix_generator.eval_prompt_key, model.backbone.prefix_generator.eval_prompt_key
    )
    with pytest.raises(RuntimeError, match="unexpected"):
        target.load_model_state(
            dict(reference, **{"module.extra.weight": torch.zeros(1)}), allow_missing_conditioner=True
        )


def test_infer_model_config(make_model, make_config):
    model = make_model(layer_embed=True, prefix_length=6)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    defaults = ModelConfig(prefix_length=10, seed=4)
    inferred = infer_model_config(state, defaults)
    assert (inferred.arch, inferred.patch_size, inferred.img_size) == ("vit_tiny", 16, 32)
    assert inferred.layer_embed and inferred.head_out_dim == 128 and inferred.prefix_length == 6
    assert inferred.seed == 4
    reference = {k: v for k, v in state.items() if "eval_prompt" not in k}
    assert infer_model_config(reference, defaults).prefix_length == 10
    plain = make_model(prefix_length=0).state_dict()
    assert infer_model_config(plain, defaults).prefix_length == 0
    with pytest.raises(ValueError, match="prefix_length"):
        infer_model_config(reference, ModelConfig(prefix_length=0))


def test_config_round_trip_and_validation(make_config):
    cfg = make_config(freeze=["projection_head"])
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.freeze == ("projection_head",)
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"arch": "vit_tiny", "wat": 1})
    assert ModelConfig.from_dict({"arch": "vit_tiny", "wat": 1}, strict=False).arch == "vit_tiny"
    with pytest.raises(ValueError, match="initializer"):
        make_config(initializer="normal")
    with pytest.raises(ValueError, match="arch"):
        make_config(arch="resnet50")


def test_build_from_pretrained_file(make_config, tiny_backbone_template, tmp_path):
    source = {k: torch.randn_like(v) for k, v in tiny_backbone_template.state_dict().items()}
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in source.items()}}, tmp_path / "dino.pth")
    model = build_facegcd(make_config(), pretrained_weights=tmp_path / "dino.pth")
    torch.testing.assert_close(model.backbone.blocks[2].attn.qkv.weight, source["blocks.2.attn.qkv.weight"])
    torch.testing.assert_close(model.conditioner.blocks["11"].mlp.fc2.bias, source["blocks.11.mlp.fc2.bias"])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_facegcd(make_config(), pretrained_weights=tmp_path / "missing.pth")

    # our own checkpoint can seed a backbone too (non-backbone entries are ignored)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "facegcd.pth.tar")
    backbone = copy.deepcopy(tiny_backbone_template)
    report = load_pretrained_backbone(backbone, tmp_path / "facegcd.pth.tar")
    assert any(k.startswith("projection_head.") for k in report["ignored"])
    torch.testing.assert_close(backbone.norm.weight, source["norm.weight"])


def test_hypernet_hidden_width_sets_the_generator_shapes_and_is_inferred(make_model, make_config):
    model = make_model(hypernet_hidden_dim=32)
    generator = model.backbone.prefix_generator
    for name in ("key_down", "key_up", "value_down", "value_up"):
        hypernet = getattr(generator, f"{name}_prefix_hypernet")
        assert hypernet.weight_generator[0].out_features == 32 and hypernet.bias_generator[2].in_features == 32
    # the default width is the paper's 1024
    assert make_model().backbone.prefix_generator.key_down_prefix_hypernet.weight_generator[0].out_features == 1024
    assert infer_model_config(model.state_dict(), make_config()).hypernet_hidden_dim == 32
    # a config stored before the field existed loads with the paper's width
    assert ModelConfig.from_dict({k: v for k, v in make_config().to_dict().items() if k != "hypernet_hidden_dim"})
    with pytest.raises(ValueError, match="hypernet_hidden_dim"):
        make_config(hypernet_hidden_dim=0)


def test_batch_inputs_concatenates_the_views_on_the_device_into_the_host_concatenation(make_model):
    """The views are moved one by one and joined on the device; the result is the host's [all view 1; all view 2]."""
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(3, 3, 32, 32, generator=gen), torch.randn(3, 3, 32, 32, generator=gen)]
    labels, labelled = torch.tensor([4, 0, 2]), torch.tensor([1, 0, 1], dtype=torch.uint8)
    batch = (views, labels, torch.arange(3), labelled)
    images, labels_out, mask = make_model().batch_inputs(batch, torch.device("cpu"))
    assert torch.equal(images, torch.cat(views, dim=0)) and images.shape == (6, 3, 32, 32)
    assert torch.equal(labels_out, labels) and torch.equal(mask, torch.tensor([True, False, True]))


def test_depth_builds_a_shallower_vit_of_the_arch_width(make_config, tmp_path):
    cfg = make_config(depth=3, grad_from_block=0)
    model = build_facegcd(cfg)
    assert len(model.backbone.blocks) == 3 and model.backbone.embed_dim == 192
    images = torch.randn(4, 3, 32, 32)
    tokens = model.backbone.embed_tokens(images)
    # one prefix pair per block: (depth, key/value, batch, heads, P, head dim)
    assert model.prefixes(tokens).shape == (3, 2, 4, 3, 4, 64)
    state = model.state_dict()
    assert infer_model_config(state, make_config(grad_from_block=0)).depth == 3
    assert ModelConfig.from_dict(cfg.to_dict()).depth == 3
    # files written before the field existed are 12 blocks deep
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "depth"}).depth == 12
    with pytest.raises(ValueError, match="grad_from_block 11 .expected below depth 3"):
        make_config(depth=3, grad_from_block=11)
    with pytest.raises(ValueError, match="depth 0"):
        make_config(depth=0, grad_from_block=0)


def test_deeper_checkpoint_is_refused_not_truncated(make_config, tiny_backbone_template, tmp_path):
    torch.save({"teacher": tiny_backbone_template.state_dict()}, tmp_path / "dino.pth")
    with pytest.raises(CheckpointError, match="checkpoint has 12 blocks, the backbone 3: its blocks 3-11") as err:
        build_facegcd(make_config(depth=3, grad_from_block=0), pretrained_weights=tmp_path / "dino.pth")
    assert "depth 3 and 16 px patches; is the checkpoint from another --arch, --patch-size or --depth?" in str(
        err.value
    )


def test_only_a_model_left_random_is_called_random(make_model, make_config, tmp_path, caplog):
    from model.facegcd import load_facegcd_checkpoint

    model = make_model()
    torch.save({"state_dict": model.state_dict(), "model_config": model.cfg.to_dict()}, tmp_path / "ckpt.pth")
    random_warning = "no --pretrained-weights given: the backbone is randomly initialised"
    with caplog.at_level("WARNING", logger="model.facegcd"):
        load_facegcd_checkpoint(tmp_path / "ckpt.pth", make_config())  # built, then given the checkpoint's weights
    assert random_warning not in caplog.messages
    with caplog.at_level("WARNING", logger="model.facegcd"):
        build_facegcd(make_config())
    assert caplog.messages.count(random_warning) == 1
