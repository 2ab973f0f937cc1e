"""FaceGCD model package: prefix-aware timm ViT, conditioning pass, HyperNetwork prefix generator, DINO head, losses.

Importing the package registers the `vit_tiny`, `vit_small` and `vit_base` entrypoints with timm.
"""

from model.conditioner import FrozenConditioner
from model.facegcd import FaceGCD, ModelConfig, build_facegcd, infer_model_config
from model.head import DINOHead, WeightNormLinear
from model.losses import gcd_loss, info_nce_loss, supcon_loss
from model.prefix_attention import PrefixAttention, PrefixBlock
from model.prefix_generator import PrefixGenerator, PrefixHyperNet
from model.vit import (
    CheckpointError,
    PrefixViT,
    create_backbone,
    list_backbones,
    load_pretrained_backbone,
    read_checkpoint,
)

__all__ = [
    "CheckpointError",
    "DINOHead",
    "FaceGCD",
    "FrozenConditioner",
    "ModelConfig",
    "PrefixAttention",
    "PrefixBlock",
    "PrefixGenerator",
    "PrefixHyperNet",
    "PrefixViT",
    "WeightNormLinear",
    "build_facegcd",
    "create_backbone",
    "gcd_loss",
    "info_nce_loss",
    "infer_model_config",
    "list_backbones",
    "load_pretrained_backbone",
    "read_checkpoint",
    "supcon_loss",
]
