"""FaceGCD model package: prefix-aware timm ViT, conditioning pass, HyperNetwork prefix generator, DINO head, losses.

Importing the package registers the `vit_tiny`, `vit_small` and `vit_base` entrypoints and the IResNets
(`iresnet18/34/50/100`) with timm.
"""

from model.timm_version import check_timm_version

check_timm_version()  # before any timm import: a clear message instead of an ImportError deep inside timm

from model.conditioner import FrozenConditioner  # noqa: E402
from model.facegcd import FaceGCD, ModelConfig, build_facegcd, infer_model_config  # noqa: E402
from model.head import DINOHead, WeightNormLinear  # noqa: E402
from model.iresnet import IResNet  # noqa: E402
from model.landmark import LandmarkCNN, LandmarkFrontEnd, landmark_mosaic  # noqa: E402
from model.losses import gcd_loss, info_nce_loss, supcon_loss  # noqa: E402
from model.prefix_attention import PrefixAttention, PrefixBlock  # noqa: E402
from model.prefix_generator import PrefixGenerator, PrefixHyperNet  # noqa: E402
from model.vit import (  # noqa: E402
    CheckpointError,
    PrefixViT,
    create_backbone,
    list_backbones,
    load_pretrained_backbone,
)

__all__ = [
    "CheckpointError",
    "DINOHead",
    "FaceGCD",
    "FrozenConditioner",
    "IResNet",
    "LandmarkCNN",
    "LandmarkFrontEnd",
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
    "landmark_mosaic",
    "list_backbones",
    "load_pretrained_backbone",
    "supcon_loss",
]
