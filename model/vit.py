"""Prefix-aware ViT backbone built on timm's VisionTransformer, and DINO-checkpoint loading.

References:
    - timm `VisionTransformer` (huggingface/pytorch-image-models, timm/models/vision_transformer.py): the model,
      registered entrypoints and `resample_abs_pos_embed` are used, not copied.
    - DINO (Caron et al., ICCV 2021, facebookresearch/dino): parameter names and checkpoint layout
      (`teacher`/`student` keys, `module.`/`backbone.` prefixes).
    - FaceGCD (Oh & Choi, BMVC 2025, arXiv 2507.22353): per-layer key/value prefixes.
"""

import argparse
import logging
import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import checkpoint, model_entrypoint, register_model
from timm.models.vision_transformer import VisionTransformer

from model.prefix_attention import PrefixAttention, PrefixBlock
from utils.checkpoint import CheckpointError, load_checkpoint

logger = logging.getLogger(__name__)

BACKBONE_ARCHS = ("vit_tiny", "vit_small", "vit_base")
# Keys tried, in order, after `checkpoint_key` when a checkpoint file holds a wrapped state dict.
_STATE_DICT_KEYS = ("state_dict", "model")
_STRIPPED_PREFIXES = ("module.", "backbone.")
# Parts of a PrefixViT that are not pretrained ViT weights (owned by the FaceGCD model).
_NON_BACKBONE_PREFIXES = ("prefix_generator.",)
_MAX_LISTED = 5  # mismatched tensors named in an error message


class PrefixViT(VisionTransformer):
    """timm VisionTransformer whose blocks accept per-layer key/value prefixes.

    Built with `attn_layer=PrefixAttention` and `block_fn=PrefixBlock`; the forward loops over the blocks itself
    (as timm does for masks) to hand each block its prefix. `prefix_generator` is attached by the FaceGCD model
    (None for a plain backbone), so its parameters live under `backbone.prefix_generator.*` as in the reference.
    Output of `forward` is the CLS token after the final norm, (B, D).
    """

    def __init__(self, **kwargs: Any) -> None:
        """Create the backbone.

        Args:
            **kwargs: timm VisionTransformer arguments (img_size, patch_size, embed_dim, depth, num_heads, ...).
        """
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("global_pool", "token")
        kwargs.setdefault("qkv_bias", True)
        super().__init__(attn_layer=PrefixAttention, block_fn=PrefixBlock, **kwargs)
        self.prefix_generator: Optional[nn.Module] = None

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's init (trunc-normal 0.02 Linear weights and `pos_embed`, zero biases), `cls_token` as in DINO.

        Args:
            mode: timm init mode.
            needs_reset: Whether modules must reset their own parameters first.
        """
        super().init_weights(mode=mode, needs_reset=needs_reset)
        trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_tokens(self) -> int:
        """Tokens per image, T = patches + CLS."""
        return self.patch_embed.num_patches + self.num_prefix_tokens

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + position embedding, shared by the conditioning and the prefixed pass.

        Args:
            x: Images (B, 3, S, S).

        Returns:
            Tokens (B, T, D).
        """
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward_tokens(self, x: torch.Tensor, prefixes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the blocks (with per-layer prefixes) and the final norm.

        Args:
            x: Tokens (B, T, D) from `embed_tokens`.
            prefixes: Optional (depth, 2, B, H, P, e) key/value prefixes.

        Returns:
            Normalised tokens (B, T, D).
        """
        if prefixes is not None and prefixes.shape[0] != len(self.blocks):
            raise ValueError(f"prefixes cover {prefixes.shape[0]} layers, the backbone has {len(self.blocks)} blocks")
        use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        # unbind, not prefixes[i]: one backward node for all layers instead of a full-size zero gradient per layer
        layer_prefixes = [None] * len(self.blocks) if prefixes is None else prefixes.unbind(0)
        for blk, prefix in zip(self.blocks, layer_prefixes):
            x = checkpoint(blk, x, prefix, use_reentrant=False) if use_checkpoint else blk(x, prefix)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor, prefixes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalised tokens of the (optionally prefixed) backbone.

        Args:
            x: Images (B, 3, S, S).
            prefixes: Optional (depth, 2, B, H, P, e) key/value prefixes.

        Returns:
            Tokens (B, T, D).
        """
        return self.forward_tokens(self.embed_tokens(x), prefixes)

    def forward(self, x: torch.Tensor, prefixes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """CLS feature of the (optionally prefixed) backbone.

        Args:
            x: Images (B, 3, S, S).
            prefixes: Optional (depth, 2, B, H, P, e) key/value prefixes.

        Returns:
            CLS token after the final norm, (B, D).
        """
        return self.forward_head(self.forward_features(x, prefixes))


def _create_prefix_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> PrefixViT:
    """Build a PrefixViT from registered dimensions; pretrained weights are never downloaded."""
    if pretrained:
        raise ValueError(
            f"{variant}: pretrained=True would download weights; pass a local file to load_pretrained_backbone "
            "(--pretrained-weights) instead"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    kwargs.setdefault("patch_size", 8)
    kwargs.setdefault("img_size", 112)
    return PrefixViT(**kwargs)


@register_model
def vit_tiny(pretrained: bool = False, **kwargs: Any) -> PrefixViT:
    """ViT-Tiny (D 192, 3 heads, depth 12); `patch_size` (default 8) and `img_size` (default 112) selectable."""
    model_args = dict(embed_dim=192, depth=12, num_heads=3)
    return _create_prefix_vit("vit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_small(pretrained: bool = False, **kwargs: Any) -> PrefixViT:
    """ViT-Small (D 384, 6 heads, depth 12); `patch_size` (default 8) and `img_size` (default 112) selectable."""
    model_args = dict(embed_dim=384, depth=12, num_heads=6)
    return _create_prefix_vit("vit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_base(pretrained: bool = False, **kwargs: Any) -> PrefixViT:
    """ViT-Base (D 768, 12 heads, depth 12); `patch_size` (default 8) and `img_size` (default 112) selectable."""
    model_args = dict(embed_dim=768, depth=12, num_heads=12)
    return _create_prefix_vit("vit_base", pretrained=pretrained, **dict(model_args, **kwargs))


def list_backbones() -> list[str]:
    """Names of the registered FaceGCD backbones.

    Returns:
        Architecture names accepted by `create_backbone`.
    """
    return list(BACKBONE_ARCHS)


def create_backbone(
    arch: str,
    *,
    patch_size: int = 8,
    img_size: int = 112,
    dynamic_img_size: bool = False,
    depth: Optional[int] = None,
) -> PrefixViT:
    """Create a randomly initialised prefix-aware ViT by registered name.

    Args:
        arch: One of `list_backbones()`.
        patch_size: Patch size (8 or 16 in practice); must divide `img_size`.
        img_size: Square input size in pixels.
        dynamic_img_size: accept other input sizes too, resampling the position embedding per size (timm's option;
            DINO's local crops).
        depth: number of blocks; None keeps the arch's (12). The arch then names the width and the heads only.

    Returns:
        The backbone.
    """
    if arch not in BACKBONE_ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; expected one of {', '.join(BACKBONE_ARCHS)}")
    if patch_size <= 0 or img_size <= 0 or img_size % patch_size:
        raise ValueError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
    if depth is not None and depth < 1:
        raise ValueError(f"depth {depth} must be at least 1")
    kwargs = {} if depth is None else {"depth": depth}
    return model_entrypoint(arch)(patch_size=patch_size, img_size=img_size, dynamic_img_size=dynamic_img_size, **kwargs)


def _strip_prefixes(key: str) -> str:
    """Remove leading `module.` / `backbone.` wrappers (DDP, DINO's MultiCropWrapper, our FaceGCD layout)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def select_state_dict(obj: Any, checkpoint_key: str = "teacher") -> dict[str, torch.Tensor]:
    """Pick the state dict from a loaded checkpoint: `obj[checkpoint_key]`, else `state_dict`/`model`, else `obj`.

    Args:
        obj: Object returned by `utils.checkpoint.load_checkpoint`.
        checkpoint_key: Preferred entry (DINO: `teacher` or `student`).

    Returns:
        Mapping of parameter name to tensor.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    for key in (checkpoint_key, *_STATE_DICT_KEYS):
        if isinstance(obj.get(key), dict):
            logger.info("using checkpoint entry %r", key)
            obj = obj[key]
            break
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(
            f"checkpoint state dict has non-tensor entries {bad[:10]}; pass the right --checkpoint-key "
            f"(tried {checkpoint_key!r}, {', '.join(map(repr, _STATE_DICT_KEYS))})"
        )
    return obj


def filter_backbone_state_dict(state_dict: dict[str, torch.Tensor], model: PrefixViT) -> dict[str, torch.Tensor]:
    """Map a DINO/timm/FaceGCD state dict onto the backbone's ViT parameters.

    Strips `module.`/`backbone.` prefixes, resamples `pos_embed` bicubically (align_corners False, no antialias, as
    DINO's `interpolate_pos_encoding`) when the patch grid differs, ignores (and logs) keys the ViT lacks (DINO's
    `head.*`, our `projection_head.*`, ...) and checks every required key and every shape.

    Args:
        state_dict: Source state dict.
        model: Target backbone.

    Returns:
        State dict holding exactly the backbone's ViT keys.
    """
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(_NON_BACKBONE_PREFIXES)}
    source = {_strip_prefixes(k): v for k, v in state_dict.items()}
    unexpected = sorted(k for k in source if k not in target)
    missing = sorted(k for k in target if k not in source)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} backbone keys: {', '.join(missing)}")
    deeper = sorted({int(k.split(".")[1]) for k in unexpected if k.startswith("blocks.")})
    if deeper:
        raise CheckpointError(
            f"checkpoint has {deeper[-1] + 1} blocks, the backbone {len(model.blocks)}: its blocks "
            f"{deeper[0]}-{deeper[-1]} would be dropped"
        )
    if unexpected:
        logger.info("ignoring %d checkpoint keys the backbone lacks: %s", len(unexpected), ", ".join(unexpected))

    out = {k: source[k] for k in target}
    pos_src, pos_dst = out["pos_embed"], target["pos_embed"]
    if pos_src.shape != pos_dst.shape and pos_src.ndim == 3 and pos_src.shape[-1] == pos_dst.shape[-1]:
        out["pos_embed"] = _resample_pos_embed(pos_src, model)
    mismatched = [
        f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(v.shape)}"
        for k, v in target.items()
        if out[k].shape != v.shape
    ]
    if mismatched:
        shown = mismatched[:_MAX_LISTED] + (
            [f"... and {len(mismatched) - _MAX_LISTED} more"] if len(mismatched) > _MAX_LISTED else []
        )
        raise CheckpointError(
            f"checkpoint shapes do not fit the backbone ({len(mismatched)} of {len(target)} tensors):\n  "
            + "\n  ".join(shown)
        )
    return out


def _architecture_hint(obj: Any, model: PrefixViT) -> str:
    """What a checkpoint says about its architecture (DINO and our runs store their ``args``) beside the model's."""
    here = (
        f"this run's backbone has width {model.embed_dim}, depth {len(model.blocks)} and "
        f"{model.patch_embed.patch_size[0]} px patches"
    )
    args = obj.get("args") if isinstance(obj, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(args, dict) or "arch" not in args:
        return f"\n({here}; is the checkpoint from another --arch, --patch-size or --depth?)"
    stored = f"--arch {args['arch']}" + "".join(
        f" --{name.replace('_', '-')} {args[name]}" for name in ("patch_size", "depth") if name in args
    )
    return f"\n(the checkpoint was trained with {stored}; {here}: pass the same flags)"


def _resample_pos_embed(pos_embed: torch.Tensor, model: PrefixViT) -> torch.Tensor:
    """Resample a (1, 1 + g*g, D) position embedding to the model's patch grid."""
    num_prefix = model.num_prefix_tokens
    old_grid = math.isqrt(pos_embed.shape[1] - num_prefix)
    if old_grid * old_grid != pos_embed.shape[1] - num_prefix:
        raise CheckpointError(
            f"pos_embed {tuple(pos_embed.shape)} is not {num_prefix} CLS token + a square patch grid; cannot resample"
        )
    new_grid = list(model.patch_embed.grid_size)
    logger.info("resampling pos_embed from a %dx%d to a %dx%d grid", old_grid, old_grid, *new_grid)
    return resample_abs_pos_embed(
        pos_embed,
        new_size=new_grid,
        old_size=[old_grid, old_grid],
        num_prefix_tokens=num_prefix,
        interpolation="bicubic",
        antialias=False,
    )


def _recognition_state_dict(
    obj: Any, model: PrefixViT, path: Union[str, Path], reads_mosaics: bool
) -> Optional[dict[str, torch.Tensor]]:
    """The ViT weights of a ``--method recognition`` checkpoint (its ``backbone.vit.*``), or None for other files.

    The embedding neck, the class centres and a Part fViT landmark CNN are not part of the backbone. The checkpoint's
    ``model_config`` must describe a registered ViT of this backbone's width, patch size and image size.

    Raises:
        CheckpointError: an IResNet checkpoint, or a ViT of another width, patch size or image size (``path`` named).
    """
    stored = obj.get("model_config") if isinstance(obj, dict) else None
    if not isinstance(stored, dict) or stored.get("method") != "recognition":
        return None
    arch, patch, size = stored.get("arch"), stored.get("patch_size"), stored.get("img_size")
    here = (
        f"this backbone has width {model.embed_dim}, {model.patch_embed.patch_size[0]} px patches and "
        f"{model.patch_embed.img_size[0]} px inputs"
    )
    if arch not in BACKBONE_ARCHS:
        raise CheckpointError(
            f"{path} is a recognition checkpoint of --arch {arch}: a pretrained start of FaceGCD's backbone and "
            f"conditioner must be one of its ViTs, {', '.join(BACKBONE_ARCHS)} ({here})"
        )
    state_dict = obj.get("state_dict")
    vit = {k[len("backbone.vit.") :]: v for k, v in (state_dict or {}).items() if k.startswith("backbone.vit.")}
    width = vit["cls_token"].shape[-1] if "cls_token" in vit else None
    if (width, patch, size) != (model.embed_dim, model.patch_embed.patch_size[0], model.patch_embed.img_size[0]):
        raise CheckpointError(
            f"{path} is a recognition checkpoint of --arch {arch} (width {width}) with --patch-size {patch} at "
            f"{size} px; {here}: pass the same --arch, --patch-size and --input-size"
        )
    if stored.get("landmark_cnn") and not reads_mosaics:
        logger.warning(
            "%s was trained on landmark mosaics (Part fViT): its ViT expects them, so use --landmark-cnn with its "
            "landmark_cnn.pth",
            path,
        )
    elif reads_mosaics and not stored.get("landmark_cnn"):
        logger.warning(
            "%s was trained on whole images, and this --landmark-cnn model feeds its ViT landmark mosaics", path
        )
    logger.info("using the ViT of recognition checkpoint %s (--arch %s, epoch %s)", path, arch, obj.get("epoch"))
    return vit


def load_pretrained_backbone(
    model: PrefixViT,
    path: Union[str, Path],
    checkpoint_key: str = "teacher",
    *,
    weights_only: bool = True,
    reads_mosaics: bool = False,
) -> dict[str, list[str]]:
    """Load pretrained ViT weights into the backbone (`--pretrained-weights`).

    Accepts a DINO training checkpoint (`checkpoint.pth`: `student`/`teacher` with `module.`/`backbone.` prefixes,
    `head.*` ignored), a backbone-only state dict (`dino_vitbase8_pretrain.pth`, timm), a FaceGCD checkpoint or a
    `--method recognition` checkpoint of a registered ViT (its `backbone.vit.*`; neck and class centres ignored).

    Args:
        model: Target backbone; its `prefix_generator` (if any) is left untouched.
        path: Checkpoint file; nothing is ever downloaded.
        checkpoint_key: Entry holding the weights in a full DINO checkpoint (`teacher` or `student`).
        weights_only: Safe loading; False (`--unsafe-load`) for trusted files holding other pickled objects.
        reads_mosaics: the model feeds the backbone landmark mosaics (`--landmark-cnn`); a recognition checkpoint
            trained the other way gets a warning.

    Returns:
        {"loaded": keys loaded, "ignored": checkpoint keys the backbone lacks}.
    """
    obj = load_checkpoint(path, weights_only=weights_only)
    state_dict = _recognition_state_dict(obj, model, path, reads_mosaics)
    try:
        if state_dict is None:
            state_dict = select_state_dict(obj, checkpoint_key)
        filtered = filter_backbone_state_dict(state_dict, model)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}{_architecture_hint(obj, model)}") from err
    result = model.load_state_dict(filtered, strict=False)
    leftover = [k for k in result.missing_keys if not k.startswith(_NON_BACKBONE_PREFIXES)]
    if leftover or result.unexpected_keys:
        raise CheckpointError(f"internal key mismatch loading {path}: {leftover + list(result.unexpected_keys)}")
    ignored = sorted({_strip_prefixes(k) for k in state_dict} - set(filtered))
    logger.info("loaded %d backbone tensors from %s (key %r)", len(filtered), path, checkpoint_key)
    return {"loaded": sorted(filtered), "ignored": ignored}
