"""Shared fixtures for the model tests: tiny CPU models (ViT patch 16 at 32 px -> 5 tokens)."""

import copy
from typing import Callable

import pytest
import torch

from model import ModelConfig, PrefixViT, create_backbone

IMG = 32


@pytest.fixture
def make_config() -> Callable[..., ModelConfig]:
    """Factory for a ViT-T/16 at 32 px FaceGCD config with a small head; keyword arguments override fields."""

    def factory(**overrides) -> ModelConfig:
        values = dict(arch="vit_tiny", patch_size=16, img_size=IMG, prefix_length=4, head_out_dim=128, seed=3)
        values.update(overrides)
        return ModelConfig(**values)

    return factory


@pytest.fixture
def images() -> torch.Tensor:
    """Six deterministic images (6, 3, 32, 32)."""
    return torch.randn(6, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def tiny_backbone_template() -> PrefixViT:
    """One randomly initialised ViT-T/16 at 32 px (timm's init is slow on a busy CPU); copy before mutating."""
    torch.manual_seed(0)
    return create_backbone("vit_tiny", patch_size=16, img_size=IMG)


@pytest.fixture
def tiny_backbone(tiny_backbone_template) -> PrefixViT:
    """A fresh copy of the session ViT-T/16 at 32 px."""
    return copy.deepcopy(tiny_backbone_template)
