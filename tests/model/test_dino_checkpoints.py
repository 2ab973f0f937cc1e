"""Official DINO files load as they are: backbone-only `dino_vit*_pretrain.pth` and full training `checkpoint.pth`.

The files are written from DINO's own layout (facebookresearch/dino: `vision_transformer.VisionTransformer` with
`num_classes=0`, `DINOHead`, and the `save_dict` of `main_dino.py`), with the key names spelled out here and the
shapes computed from the ViT-Tiny dimensions, never from our model's `state_dict()`. Trained FaceGCD checkpoints
(`--checkpoint_weights`, `--initial-checkpoint`) go through `load_facegcd_checkpoint`, tested at the end.
"""

import argparse
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import TINY_MODEL_ARGS

import extract_features
import SSK
from model import CheckpointError, build_facegcd, load_pretrained_backbone
from model.facegcd import load_facegcd_checkpoint
from utils.checkpoint import load_checkpoint
from utils.report import RESULTS_FILE

DIM = 192  # DINO vit_tiny: embed_dim 192, depth 12, 3 heads, mlp_ratio 4
DEPTH = 12
HEAD_HIDDEN, HEAD_BOTTLENECK, HEAD_OUT = 32, 16, 64  # DINOHead(nlayers=3) widths, shrunk from 2048 / 256 / 65536


def dino_backbone(patch: int, grid: int, seed: int) -> dict[str, torch.Tensor]:
    """A DINO ViT backbone state dict (the layout of `dino_vitbase8_pretrain.pth`) for a `grid` x `grid` image."""
    shapes = {
        "cls_token": (1, 1, DIM),
        "pos_embed": (1, 1 + grid * grid, DIM),
        "patch_embed.proj.weight": (DIM, 3, patch, patch),
        "patch_embed.proj.bias": (DIM,),
        "norm.weight": (DIM,),
        "norm.bias": (DIM,),
    }
    for i in range(DEPTH):
        shapes |= {
            f"blocks.{i}.norm1.weight": (DIM,),
            f"blocks.{i}.norm1.bias": (DIM,),
            f"blocks.{i}.attn.qkv.weight": (3 * DIM, DIM),
            f"blocks.{i}.attn.qkv.bias": (3 * DIM,),
            f"blocks.{i}.attn.proj.weight": (DIM, DIM),
            f"blocks.{i}.attn.proj.bias": (DIM,),
            f"blocks.{i}.norm2.weight": (DIM,),
            f"blocks.{i}.norm2.bias": (DIM,),
            f"blocks.{i}.mlp.fc1.weight": (4 * DIM, DIM),
            f"blocks.{i}.mlp.fc1.bias": (4 * DIM,),
            f"blocks.{i}.mlp.fc2.weight": (DIM, 4 * DIM),
            f"blocks.{i}.mlp.fc2.bias": (DIM,),
        }
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def dino_head(seed: int) -> dict[str, torch.Tensor]:
    """A DINOHead state dict: MLP Linear-GELU-Linear-GELU-Linear, then the weight-normed `last_layer`."""
    shapes = {
        "mlp.0.weight": (HEAD_HIDDEN, DIM),
        "mlp.0.bias": (HEAD_HIDDEN,),
        "mlp.2.weight": (HEAD_HIDDEN, HEAD_HIDDEN),
        "mlp.2.bias": (HEAD_HIDDEN,),
        "mlp.4.weight": (HEAD_BOTTLENECK, HEAD_HIDDEN),
        "mlp.4.bias": (HEAD_BOTTLENECK,),
        "last_layer.weight_g": (HEAD_OUT, 1),
        "last_layer.weight_v": (HEAD_OUT, HEAD_BOTTLENECK),
    }
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def dino_args(**extra) -> argparse.Namespace:
    """`main_dino.py` arguments as DINO stores them (after `init_distributed_mode` added rank, world_size, gpu)."""
    values = dict(
        arch="vit_tiny",
        patch_size=16,
        out_dim=HEAD_OUT,
        norm_last_layer=True,
        momentum_teacher=0.996,
        use_bn_in_head=False,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        use_fp16=True,
        weight_decay=0.04,
        weight_decay_end=0.4,
        clip_grad=3.0,
        batch_size_per_gpu=64,
        epochs=100,
        freeze_last_layer=1,
        lr=0.0005,
        warmup_epochs=10,
        min_lr=1e-06,
        optimizer="adamw",
        drop_path_rate=0.1,
        global_crops_scale=(0.4, 1.0),
        local_crops_number=8,
        local_crops_scale=(0.05, 0.4),
        data_path="/path/to/imagenet/train/",
        output_dir=".",
        saveckp_freq=20,
        seed=0,
        num_workers=10,
        dist_url="env://",
        local_rank=0,
        rank=0,
        world_size=8,
        gpu=0,
    )
    return argparse.Namespace(**(values | extra))


GRAD_SCALER_STATE = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}


def dino_training_checkpoint(args: argparse.Namespace, fp16_scaler: dict | None = None) -> dict:
    """A `main_dino.py` checkpoint for a 224-px patch-16 run: the student is DDP-wrapped (`module.`), the teacher
    is not; both are a MultiCropWrapper (`backbone.`, `head.`)."""
    teacher = {f"backbone.{k}": v for k, v in dino_backbone(16, 14, seed=1).items()}
    teacher |= {f"head.{k}": v for k, v in dino_head(seed=2).items()}
    student = {f"module.backbone.{k}": v for k, v in dino_backbone(16, 14, seed=3).items()}
    student |= {f"module.head.{k}": v for k, v in dino_head(seed=4).items()}
    group = dict(betas=(0.9, 0.999), eps=1e-08, amsgrad=False, maximize=False, foreach=None, capturable=False)
    optimizer = {
        "state": {0: {"step": torch.tensor(5000.0), "exp_avg": torch.zeros(DIM), "exp_avg_sq": torch.zeros(DIM)}},
        "param_groups": [
            dict(group, lr=1e-5, weight_decay=0.3, params=[0, 1]),
            dict(group, lr=1e-5, weight_decay=0.0, params=[2]),
        ],
    }
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": optimizer,
        "epoch": 100,
        "args": args,
        "fp16_scaler": None if fp16_scaler is None else dict(fp16_scaler, _growth_tracker=17),
        "dino_loss": {"center": torch.randn(1, HEAD_OUT, generator=torch.Generator().manual_seed(5))},
    }


def resampled_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINO's `interpolate_pos_encoding`: CLS kept, the patch grid resized bicubically (align_corners False)."""
    old = round((pos_embed.shape[1] - 1) ** 0.5)
    patches = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def assert_backbone_holds(backbone: torch.nn.Module, source: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every DINO backbone tensor (`prefix` + name) is in `backbone`; `pos_embed` resampled to its grid."""
    state = backbone.state_dict()
    names = [k[len(prefix) :] for k in source if k.startswith(prefix)]
    assert len(names) == 6 + 12 * DEPTH
    for name in names:
        expected = source[prefix + name]
        if name == "pos_embed":
            expected = resampled_pos_embed(expected, backbone.patch_embed.grid_size[0])
            torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(state[name], expected, rtol=0, atol=0, msg=name)


class WarmupSchedule:
    """A project-specific object of the kind a DINO fork keeps in its `args`."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs


def test_backbone_only_pretrain_file_loads_through_pretrained_weights(make_config, tmp_path):
    """`dino_vitbase8_pretrain.pth` layout: plain keys, a 224-px patch-8 pos_embed (1, 785, D) -> (1, 197, D)."""
    source = dino_backbone(8, 28, seed=0)
    assert source["pos_embed"].shape == (1, 785, DIM)
    path = tmp_path / "dino_vittiny8_pretrain.pth"
    torch.save(source, path)
    model = build_facegcd(make_config(patch_size=8, img_size=112), pretrained_weights=path)
    assert model.backbone.pos_embed.shape == (1, 197, DIM)
    assert_backbone_holds(model.backbone, source)
    for name, value in model.conditioner.blocks["11"].state_dict().items():  # the frozen conditioning copy
        torch.testing.assert_close(value, source[f"blocks.11.{name}"], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fp16_scaler", [GRAD_SCALER_STATE, None], ids=["fp16", "fp32"])
def test_training_checkpoint_loads_teacher_by_default_and_ignores_heads(tiny_backbone, tmp_path, fp16_scaler):
    checkpoint = dino_training_checkpoint(dino_args(use_fp16=fp16_scaler is not None), fp16_scaler)
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    report = load_pretrained_backbone(tiny_backbone, path)
    assert_backbone_holds(tiny_backbone, checkpoint["teacher"], prefix="backbone.")
    assert report["ignored"] == sorted(f"head.{k}" for k in dino_head(seed=0))
    assert len(report["loaded"]) == 6 + 12 * DEPTH


def test_checkpoint_key_student_picks_the_student(make_config, tmp_path):
    checkpoint = dino_training_checkpoint(dino_args(), GRAD_SCALER_STATE)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    model = build_facegcd(make_config(), pretrained_weights=tmp_path / "checkpoint.pth", checkpoint_key="student")
    assert_backbone_holds(model.backbone, checkpoint["student"], prefix="module.backbone.")


def test_unknown_checkpoint_key_names_the_file_and_its_entries(tiny_backbone, tmp_path):
    torch.save(dino_training_checkpoint(dino_args()), tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth: .*'student', 'teacher'.*--checkpoint-key.*'teachr'"):
        load_pretrained_backbone(tiny_backbone, tmp_path / "checkpoint.pth", checkpoint_key="teachr")


def test_training_checkpoint_reads_with_weights_only(tmp_path):
    """The Namespace `args`, optimizer, GradScaler and DINO-loss states all pass `weights_only=True`."""
    checkpoint = dino_training_checkpoint(dino_args(), GRAD_SCALER_STATE)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    loaded = load_checkpoint(tmp_path / "checkpoint.pth", weights_only=True)
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"] == checkpoint["args"]
    assert loaded["fp16_scaler"] == checkpoint["fp16_scaler"] and loaded["epoch"] == 100
    assert loaded["optimizer"]["param_groups"] == checkpoint["optimizer"]["param_groups"]
    torch.testing.assert_close(loaded["dino_loss"]["center"], checkpoint["dino_loss"]["center"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "extra,refused",
    [
        ({"schedule": WarmupSchedule(10)}, [f"{__name__}.WarmupSchedule"]),
        (
            {"norm_layer": functools.partial(torch.nn.LayerNorm, eps=1e-6)},
            ["functools.partial", "torch.nn.modules.normalization.LayerNorm"],
        ),
    ],
    ids=["custom-class", "partial"],
)
def test_args_with_other_objects_name_them_and_load_with_unsafe_load(tiny_backbone, tmp_path, extra, refused):
    checkpoint = dino_training_checkpoint(dino_args(**extra), GRAD_SCALER_STATE)
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="--unsafe-load") as err:
        load_pretrained_backbone(tiny_backbone, path)
    assert str(path) in str(err.value) and all(name in str(err.value) for name in refused)
    load_pretrained_backbone(tiny_backbone, path, weights_only=False)
    assert_backbone_holds(tiny_backbone, checkpoint["teacher"], prefix="backbone.")


def test_extraction_pretrained_weights_honour_unsafe_load(tmp_path):
    checkpoint = dino_training_checkpoint(dino_args(schedule=WarmupSchedule(10)))
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    parser = extract_features.get_args_parser()
    argv = [*TINY_MODEL_ARGS, "--pretrained_weights", str(tmp_path / "checkpoint.pth")]
    with pytest.raises(CheckpointError, match="WarmupSchedule.*--unsafe-load"):
        extract_features.load_model(parser.parse_args(argv), torch.device("cpu"))
    model, _, _ = extract_features.load_model(parser.parse_args([*argv, "--unsafe-load"]), torch.device("cpu"))
    assert_backbone_holds(model.backbone, checkpoint["teacher"], prefix="backbone.")


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and buffer away from its initial value, as training would."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():  # not BatchNorm's num_batches_tracked
                value.add_(0.1 * torch.randn(value.shape, generator=gen))
    return model


def test_ssk_checkpoint_weights_honour_unsafe_load(make_config, tiny_faces, tmp_path, caplog):
    """A reference-style checkpoint whose Namespace args hold a custom object: SSK refuses it without the flag."""
    model = _perturbed(build_facegcd(make_config(prefix_length=2)))
    args = argparse.Namespace(arch="vit_tiny", schedule=WarmupSchedule(10))
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "model_config": model.cfg.to_dict(), "args": args}, path)
    argv = ["--device", "cpu", "--save_dir", str(tmp_path), "--experiment_idx", "mem", "--checkpoint_weights"]
    argv += [str(path), "--dataset", "synthfaces_tiny", "--data-path", tiny_faces, "--workers", "0", "--no-plots"]
    argv += ["--k_means_init", "1", "--max_kmeans_iter", "5"]
    parser = SSK.get_args_parser()
    assert SSK.main(parser.parse_args(argv)) == 2  # one error message, no traceback
    refused = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(refused) == 1 and "WarmupSchedule" in refused[0] and "--unsafe-load" in refused[0]
    args = parser.parse_args([*argv, "--unsafe-load"])
    assert SSK.main(args) == 0
    assert (SSK.output_dir(args) / RESULTS_FILE).is_file()


@pytest.fixture
def dino_file(tmp_path):
    """A backbone-only DINO file at 224 px, patch 16."""
    path = tmp_path / "dino_vittiny16_pretrain.pth"
    torch.save(dino_backbone(16, 14, seed=0), path)
    return path


def _reference_checkpoint(model, path) -> dict[str, torch.Tensor]:
    """Save `model` as the reference release does (DDP `module.` keys, args as a Namespace, no `model_config`,
    no conditioner copies or evaluation prompt); returns the saved state dict without `module.`."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("conditioner.") and "eval_prompt" not in k}
    ckpt = {"epoch": 9, "arch": "vit_tiny", "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(dict(ckpt, args=argparse.Namespace(arch="vit_tiny", prefix_length=4), metric=0.5), path)
    return state


def test_reference_checkpoint_loads_the_same_into_a_built_model_and_for_extraction(
    make_config, dino_file, tmp_path, images
):
    """`--initial-checkpoint` (built model) and extraction (built from the file) share one loading path."""
    cfg = make_config()
    trained = _perturbed(build_facegcd(cfg, pretrained_weights=dino_file))
    saved = _reference_checkpoint(trained, tmp_path / "model_best.pth.tar")

    model = build_facegcd(cfg, pretrained_weights=dino_file)
    conditioner = {k: v.clone() for k, v in model.conditioner.state_dict().items()}
    prompt = model.backbone.prefix_generator.eval_prompt_key.clone()
    loaded, ckpt = load_facegcd_checkpoint(tmp_path / "model_best.pth.tar", model, pretrained_weights=dino_file)
    assert loaded is model and ckpt["epoch"] == 9
    state = model.state_dict()
    for name, value in saved.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    for name, value in conditioner.items():  # kept from the pretrained weights, not the (absent) checkpoint copies
        torch.testing.assert_close(model.conditioner.state_dict()[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.backbone.prefix_generator.eval_prompt_key, prompt, rtol=0, atol=0)

    flags = dataclasses.replace(cfg, arch="vit_small", head_out_dim=999)  # both are inferred from the shapes
    built, _ = load_facegcd_checkpoint(tmp_path / "model_best.pth.tar", flags, pretrained_weights=dino_file)
    assert built.cfg == cfg
    with torch.no_grad():
        expected = model.eval().extract_features(images)
        torch.testing.assert_close(built.eval().extract_features(images), expected, rtol=0, atol=0)


def test_reference_checkpoint_without_pretrained_weights_is_an_error(make_config, dino_file, tmp_path):
    cfg = make_config()
    _reference_checkpoint(build_facegcd(cfg, pretrained_weights=dino_file), tmp_path / "ref.pth.tar")
    with pytest.raises(CheckpointError, match=r"ref\.pth\.tar.*conditioner.*--pretrained-weights"):
        load_facegcd_checkpoint(tmp_path / "ref.pth.tar", build_facegcd(cfg))


def test_initial_checkpoint_of_another_architecture_is_an_error(make_config, dino_file, tmp_path):
    model = build_facegcd(make_config(), pretrained_weights=dino_file)
    other = build_facegcd(make_config(prefix_length=2, head_out_dim=64))
    torch.save({"state_dict": other.state_dict(), "model_config": other.cfg.to_dict()}, tmp_path / "ours.pth.tar")
    with pytest.raises(CheckpointError, match=r"ours\.pth\.tar.*prefix_length 2 \(model: 4\), head_out_dim 64"):
        load_facegcd_checkpoint(tmp_path / "ours.pth.tar", model, pretrained_weights=dino_file)
    _reference_checkpoint(other, tmp_path / "ref.pth.tar")
    with pytest.raises(CheckpointError, match=r"ref\.pth\.tar.*head_out_dim 64 \(model: 128\)"):
        load_facegcd_checkpoint(tmp_path / "ref.pth.tar", model, pretrained_weights=dino_file)


def test_dino_file_as_trained_checkpoint_points_to_pretrained_weights(make_config, tmp_path):
    torch.save(dino_training_checkpoint(dino_args()), tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth holds no FaceGCD state dict.*--pretrained-weights"):
        load_facegcd_checkpoint(tmp_path / "checkpoint.pth", make_config())


def test_a_pretraining_checkpoint_of_another_architecture_is_refused_with_both_named(tmp_path):
    from model.dino import DINOConfig, DINOMethod
    from model.vit import create_backbone

    cfg = DINOConfig(arch="vit_small", patch_size=16, img_size=32, out_dim=32, hidden_dim=64, bottleneck_dim=16)
    small = DINOMethod(cfg)
    path = tmp_path / "checkpoint.pth"
    torch.save(small.dino_checkpoint(3, {"arch": "vit_small", "patch_size": 16}), path)
    tiny = create_backbone("vit_tiny", patch_size=16, img_size=32)
    with pytest.raises(CheckpointError) as err:
        load_pretrained_backbone(tiny, path)
    message = str(err.value)
    assert str(path) in message and "--arch vit_small --patch-size 16" in message
    assert "width 192, depth 12 and 16 px patches" in message
    assert "cls_token: checkpoint (1, 1, 384) vs model (1, 1, 192)" in message
    every = len(tiny.state_dict())  # every tensor's width differs
    assert f"({every} of {every} tensors)" in message and f"... and {every - 5} more" in message
    assert message.count(" vs model ") == 5  # only the first 5 are listed

    # a file without args still says what the backbone expects
    torch.save({"teacher": small.dino_checkpoint(3)["teacher"]}, tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match=r"(?s)bare\.pth: .*width 192.*another --arch, --patch-size or --depth"):
        load_pretrained_backbone(tiny, tmp_path / "bare.pth")


def test_reference_checkpoint_trained_with_the_front_end_takes_its_cnn_from_landmark_weights(
    make_config, dino_file, tmp_path, images
):
    """The reference keeps the landmark CNN in its own file: its checkpoints have no front_end.* keys."""
    from model.landmark import save_landmark_weights

    cfg = make_config(landmark_cnn=True)
    trained = _perturbed(build_facegcd(cfg, pretrained_weights=dino_file))
    cnn_file = save_landmark_weights(trained.front_end, tmp_path / "pretrain_output" / "part_vit_B_34epoch.pth")
    full = {k: v for k, v in trained.state_dict().items() if not k.startswith("front_end.")}
    ref = _reference_checkpoint(trained, tmp_path / "ref.pth.tar")
    state = {k: v for k, v in ref.items() if not k.startswith("front_end.")}
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ref.pth.tar")

    built, _ = load_facegcd_checkpoint(
        tmp_path / "ref.pth.tar", cfg, pretrained_weights=dino_file, landmark_weights=cnn_file
    )
    assert built.front_end is not None
    for name, value in trained.front_end.state_dict().items():  # the CNN from the landmark file
        torch.testing.assert_close(built.front_end.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for name in state:
        torch.testing.assert_close(built.state_dict()[name], full[name], rtol=0, atol=0, msg=name)
    # what the reference computes: its checkpoint's weights, its landmark file's CNN, the rest as freshly built
    reference = build_facegcd(cfg, pretrained_weights=dino_file)
    front_end = {f"front_end.{k}": v for k, v in trained.front_end.state_dict().items()}
    reference.load_state_dict({**reference.state_dict(), **state, **front_end})
    with torch.no_grad():
        expected = reference.eval().extract_features(images)
        torch.testing.assert_close(built.eval().extract_features(images), expected, rtol=0, atol=0)

    with pytest.raises(
        CheckpointError,
        match=r"ref\.pth\.tar holds no landmark CNN.*--landmark-weights, and .*none\.pth does not exist",
    ):
        load_facegcd_checkpoint(
            tmp_path / "ref.pth.tar", cfg, pretrained_weights=dino_file, landmark_weights=tmp_path / "none.pth"
        )
