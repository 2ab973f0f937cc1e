"""DINO and LAFS as released: stochastic depth in the student only, LAFS's crops and normalisation, the
recipes' linear learning-rate scaling, and the collapse diagnostics in the logged scalars."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.layers import DropPath

from model.dino import DINOConfig, DINOMethod, mean_pairwise_cosine
from trainer.cli import parse_train_args
from trainer.methods import get_method
from trainer.optim import resolve_lr

DATA = ["--dataset", "synthfaces_tiny", "--data-path", "unused"]


def _tiny(**overrides) -> DINOMethod:
    values = dict(arch="vit_tiny", patch_size=16, img_size=32, out_dim=64, hidden_dim=64, bottleneck_dim=16, n_local=0)
    torch.manual_seed(0)
    return DINOMethod(DINOConfig(**(values | overrides)))


def test_student_has_dinos_stochastic_depth_and_the_teacher_none():
    method = _tiny().train()
    # DINO's rule: block i drops with probability 0.1 * i / 11 (torch.linspace(0, 0.1, 12))
    for i, block in enumerate(method.student.backbone.blocks):
        for branch in (block.drop_path1, block.drop_path2):
            if i == 0:
                assert isinstance(branch, torch.nn.Identity)
            else:
                assert isinstance(branch, DropPath) and branch.drop_prob == pytest.approx(0.1 * i / 11)
    for block in method.teacher.backbone.blocks:
        assert isinstance(block.drop_path1, torch.nn.Identity) and isinstance(block.drop_path2, torch.nn.Identity)

    # active in training: the last block's branch is dropped for about 10 % of the samples, the rest scaled by 1/0.9
    torch.manual_seed(1)
    out = method.student.backbone.blocks[11].drop_path1(torch.ones(20000, 1, 1))
    dropped = (out == 0).float().mean().item()
    assert 0.09 < dropped < 0.11
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.9))
    # so two training forwards of the student differ, the teacher's do not; in eval mode neither does
    images = torch.randn(64, 3, 32, 32)
    assert not torch.equal(method.student.backbone(images), method.student.backbone(images))
    assert torch.equal(method.teacher.backbone(images), method.teacher.backbone(images))
    method.eval()
    assert torch.equal(method.student.backbone(images), method.student.backbone(images))


def test_stochastic_depth_zero_is_the_plain_vit():
    method = _tiny(drop_path_rate=0.0).train()
    assert not any(isinstance(m, DropPath) for m in method.student.modules())
    with pytest.raises(ValueError, match="drop_path_rate"):
        _tiny(drop_path_rate=1.0)


@pytest.mark.parametrize("name, rate", [("dino", 0.1), ("lafs", 0.1)])
def test_recipes_default_to_the_releases_stochastic_depth(name, rate):
    args, _ = parse_train_args(["--method", name, *DATA])
    assert args.drop_path_rate == rate
    args, _ = parse_train_args(["--method", name, *DATA, "--drop_path_rate", "0"])  # DINO's spelling
    assert args.drop_path_rate == 0.0


def _white_views(method: str, *flags: str) -> tuple:
    """The method's multi-crop transform from its parsed flags, and its views of a white 40 px image."""
    args, spec = parse_train_args(["--method", method, *DATA, "--input-size", "3", "32", "32", *flags])
    transform = spec.multicrop_transform(args, 32)
    torch.manual_seed(0)
    return transform, transform(Image.fromarray(np.full((40, 40, 3), 255, dtype=np.uint8)))


def test_lafs_crops_follow_its_release_by_default():
    transform, views = _white_views("lafs")
    # local crops at the global size and with the global crops' area range (0.4 - 1)
    assert transform.local_size == 32 and transform.local_scale == (0.4, 1.0) == transform.global_scale
    assert all(geometric.transforms[0].scale == (0.4, 1.0) for geometric, _ in transform.views[2:])
    # mean and std 0.5: a white clean crop is (1 - 0.5) / 0.5 = 1 in every channel
    for view in views:
        torch.testing.assert_close(view.clean, torch.ones(3, 32, 32))

    # ours as options: DINO's local range and ImageNet statistics, (1 - 0.485) / 0.229 = 2.2489 in the red channel
    transform, views = _white_views("lafs", "--local-crops-scale", "0.05", "0.4", "--input-preset", "gcd")
    assert transform.views[2][0].transforms[0].scale == (0.05, 0.4)
    torch.testing.assert_close(views[0].clean[0], torch.full((32, 32), (1 - 0.485) / 0.229))


def test_dino_keeps_its_own_local_crops_and_imagenet_statistics():
    transform, views = _white_views("dino")
    assert transform.local_size == 48 and transform.local_scale == (0.05, 0.4)
    assert transform.normalize.transforms[1].mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name, batch, expected", [("dino", 64, 5e-4 * 64 / 256), ("lafs", 82, 5e-4 * 82 / 256)])
def test_lr_base_with_adamw_scales_linearly_as_dino(name, batch, expected):
    # DINO's main_dino.py: lr = args.lr * batch_size_per_gpu * world_size / 256, whatever the optimiser
    args, spec = parse_train_args(["--method", name, *DATA])
    assert spec is get_method(name) and spec.lr_scaling == "linear"
    assert args.opt == "adamw" and args.lr is None and args.batch_size == batch and args.lr_base == 5e-4
    lr = resolve_lr(args.lr, args.lr_base, args.batch_size * 2, args.opt, lr_base_scale=spec.lr_scaling)
    assert lr == pytest.approx(2 * expected, rel=1e-12)  # two processes: twice the global batch, twice the lr


def test_mean_pairwise_cosine_by_hand():
    # rows e1, e1, e2 (after normalisation): pair cosines 1 (twice, ordered) and 0 (four times) -> 2 / 6
    features = torch.tensor([[2.0, 0.0], [5.0, 0.0], [0.0, 3.0]])
    assert mean_pairwise_cosine(features).item() == pytest.approx(1 / 3)
    # opposite rows: -1; identical rows: 1
    assert mean_pairwise_cosine(torch.tensor([[1.0, 1.0], [-2.0, -2.0]])).item() == pytest.approx(-1.0)
    assert mean_pairwise_cosine(torch.ones(4, 3)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_cosine(torch.ones(1, 3))


def test_forward_logs_the_teacher_feature_cosine_of_the_first_global_view():
    method = _tiny().train()
    views = [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)]
    out = method(views, [])
    assert "teacher_feature_cosine" in method.summary_scalars and "teacher_entropy" in method.summary_scalars
    with torch.no_grad():
        expected = mean_pairwise_cosine(method.teacher.backbone(views[0]))
    torch.testing.assert_close(out["teacher_feature_cosine"], expected)
