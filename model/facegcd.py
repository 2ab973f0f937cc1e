"""FaceGCD meta-architecture: prefixed ViT + frozen conditioning pass + HyperNetwork + DINO head + GCD losses.

References:
    - FaceGCD: Generalized Face Discovery via Dynamic Prefix Generation (Oh & Choi, BMVC 2025), arXiv 2507.22353.
    - GCD (Vaze et al., CVPR 2022): contrastive objective and DINO projection head.
    - DINOv2 `SSLMetaArch` (facebookresearch/dinov2): a model object that owns its parts and losses.
"""

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn as nn

from model.conditioner import FrozenConditioner
from model.head import DINOHead
from model.landmark import LANDMARK_ORIENTATIONS, LandmarkFrontEnd, load_landmark_weights
from model.losses import gcd_loss
from model.meta_arch import MetaArch, MethodConfig
from model.prefix_generator import EVAL_PROMPTS, INITIALIZERS, PrefixGenerator
from model.vit import BACKBONE_ARCHS, PrefixViT, create_backbone, load_pretrained_backbone
from utils.checkpoint import CheckpointError, load_checkpoint

logger = logging.getLogger(__name__)

_WIDTH_TO_ARCH = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}
_EVAL_PROMPT_BUFFERS = ("backbone.prefix_generator.eval_prompt_key", "backbone.prefix_generator.eval_prompt_value")
# ModelConfig fields that fix parameter shapes or names: a checkpoint fits a built model only if they agree.
_SHAPE_FIELDS = (
    "landmark_cnn",
    "arch",
    "patch_size",
    "img_size",
    "prefix_length",
    "layer_embed",
    "head_out_dim",
    "hypernet_hidden_dim",
)


@dataclass
class ModelConfig(MethodConfig):
    """Everything needed to rebuild a FaceGCD model (stored in checkpoints as `model_config`).

    Attributes:
        arch: Backbone name (`vit_tiny`, `vit_small`, `vit_base`).
        patch_size: ViT patch size (paper: 8).
        img_size: Square input size (112).
        depth: Number of ViT blocks (12, every registered arch's; fewer gives a shallower ViT of the arch's width).
        prefix_length: Prefix length P; 0 = plain GCD baseline (no generator, no conditioning pass).
        layer_embed: HyperNets with a concatenated layer embedding (`--layer-embed`).
        initializer: Training base prompt, "uniform" (U(-1, 1)) or "zero".
        head_out_dim: DINO head output width (65536).
        hypernet_hidden_dim: Hidden width of every HyperNet's weight and bias generators (1024).
        grad_from_block: First trained block; <= 0 trains all blocks.
        eval_prompt: "fixed" (seeded, saved prompt) or "resample" (reference behaviour).
        seed: Seed of the fixed evaluation prompt.
        freeze: Extra parameter-name prefixes to freeze (`--freeze`).
        sup_con_weight: Weight of SupCon in the loss (0.35).
        temperature: InfoNCE temperature (1.0).
        sup_con_temperature: SupCon temperature and base temperature (0.07).
        contrast_unlabel_only: InfoNCE on unlabelled samples only.
        landmark_cnn: the frozen landmark front end (`--landmark-cnn`): a landmark CNN predicts (S/p)^2 landmarks
            and their p x p tiles form the mosaic both ViT passes see (docs/method.md, "Landmark front end").
        landmark_tiles: tile orientation of the mosaic, "natural" or "reference" (transposed tiles).
    """

    method: ClassVar[str] = "facegcd"
    arch: str = "vit_base"
    patch_size: int = 8
    img_size: int = 112
    depth: int = 12
    prefix_length: int = 10
    layer_embed: bool = False
    initializer: str = "uniform"
    head_out_dim: int = 65536
    hypernet_hidden_dim: int = 1024
    grad_from_block: int = 11
    eval_prompt: str = "fixed"
    seed: int = 0
    freeze: tuple[str, ...] = field(default_factory=tuple)
    sup_con_weight: float = 0.35
    temperature: float = 1.0
    sup_con_temperature: float = 0.07
    contrast_unlabel_only: bool = False
    landmark_cnn: bool = False
    landmark_tiles: str = "natural"

    def __post_init__(self) -> None:
        self.freeze = tuple(self.freeze)
        checks = [
            (self.arch in BACKBONE_ARCHS, f"arch {self.arch!r} (expected one of {', '.join(BACKBONE_ARCHS)})"),
            (
                self.patch_size > 0 and self.img_size > 0 and self.img_size % self.patch_size == 0,
                f"img_size {self.img_size} / patch_size {self.patch_size} (img_size must be a multiple of patch_size)",
            ),
            (self.depth >= 1, f"depth {self.depth} (expected >= 1)"),
            (
                self.grad_from_block < self.depth,
                f"grad_from_block {self.grad_from_block} (expected below depth {self.depth}: no block would train)",
            ),
            (self.prefix_length >= 0, f"prefix_length {self.prefix_length} (expected >= 0)"),
            (self.initializer in INITIALIZERS, f"initializer {self.initializer!r} (expected one of {INITIALIZERS})"),
            (self.eval_prompt in EVAL_PROMPTS, f"eval_prompt {self.eval_prompt!r} (expected one of {EVAL_PROMPTS})"),
            (self.head_out_dim > 0, f"head_out_dim {self.head_out_dim} (expected > 0)"),
            (self.hypernet_hidden_dim > 0, f"hypernet_hidden_dim {self.hypernet_hidden_dim} (expected > 0)"),
            (0.0 <= self.sup_con_weight <= 1.0, f"sup_con_weight {self.sup_con_weight} (expected in [0, 1])"),
            (self.temperature > 0 and self.sup_con_temperature > 0, "temperatures must be > 0"),
            (
                self.landmark_tiles in LANDMARK_ORIENTATIONS,
                f"landmark_tiles {self.landmark_tiles!r} (expected one of {LANDMARK_ORIENTATIONS})",
            ),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("invalid ModelConfig: " + "; ".join(bad))

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (checkpoint- and YAML-safe).

        Returns:
            ``method`` and field name -> value (`freeze` as a list).
        """
        out = super().to_dict()
        out["freeze"] = list(self.freeze)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, strict: bool = True) -> "ModelConfig":
        """Build from `to_dict()` output.

        Args:
            values: Field values (and ``method``, which files before it was stored lack); missing fields take their
                defaults.
            strict: Raise on unknown keys (otherwise they are logged and ignored).

        Returns:
            The config.
        """
        if values.get("method", cls.method) != cls.method:
            raise ValueError(f"model_config of a --method {values['method']} run is not a FaceGCD ModelConfig")
        values = {k: v for k, v in values.items() if k != "method"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown and strict:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known: {sorted(names)}")
        if unknown:
            logger.warning("ignoring unknown ModelConfig keys %s", unknown)
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def first_trainable_block(self) -> int:
        """Index of the first trained block (grad_from_block <= 0 means all blocks)."""
        return max(self.grad_from_block, 0)


class FaceGCD(MetaArch):
    """FaceGCD model: `backbone` (PrefixViT with `backbone.prefix_generator`), `conditioner`, `projection_head`.

    Training: images (2B, 3, S, S) -> token embedding (once) -> frozen conditioning pass (no grad) -> prefixes ->
    prefixed backbone -> CLS -> DINO head -> GCD loss. Evaluation features are the L2-normalised CLS of the
    prefixed backbone (fixed evaluation prompt in eval mode). With `prefix_length` 0 there is no generator and no
    conditioning pass (the plain GCD baseline).
    """

    counted_scalars = ("batches_without_labels",)

    def __init__(self, cfg: ModelConfig, backbone: PrefixViT) -> None:
        """Assemble the model around a backbone that already holds its pretrained weights.

        Args:
            cfg: Model configuration.
            backbone: Backbone (from `create_backbone`, pretrained weights loaded); its trainable blocks are copied
                into the conditioner, so load weights before this call.
        """
        super().__init__()
        self.cfg = cfg
        self.front_end: Optional[LandmarkFrontEnd] = None
        if cfg.landmark_cnn:
            self.front_end = LandmarkFrontEnd(cfg.img_size, cfg.patch_size, orientation=cfg.landmark_tiles, frozen=True)
        self.backbone = backbone
        self.conditioner: Optional[FrozenConditioner] = None
        if cfg.prefix_length > 0:
            self.backbone.prefix_generator = PrefixGenerator(
                embed_dim=backbone.embed_dim,
                num_heads=backbone.blocks[0].attn.num_heads,
                depth=len(backbone.blocks),
                prefix_length=cfg.prefix_length,
                layer_embed=cfg.layer_embed,
                initializer=cfg.initializer,
                eval_prompt=cfg.eval_prompt,
                seed=cfg.seed,
                hidden_dim=cfg.hypernet_hidden_dim,
            )
            self.conditioner = FrozenConditioner(
                backbone, first_trainable_block=cfg.first_trainable_block, layer_embed=cfg.layer_embed
            )
        self.projection_head = DINOHead(backbone.embed_dim, cfg.head_out_dim)
        self._set_trainable()

    def _set_trainable(self) -> None:
        """Trainable: blocks >= grad_from_block, the prefix generator, the head except `last_layer.weight_g`."""
        self.requires_grad_(False)
        for block in self.backbone.blocks[self.cfg.first_trainable_block :]:
            block.requires_grad_(True)
        if self.backbone.prefix_generator is not None:
            self.backbone.prefix_generator.requires_grad_(True)
        self.projection_head.requires_grad_(True)
        self.projection_head.last_layer.weight_g.requires_grad_(False)
        names = [name for name, _ in self.named_parameters()]
        unmatched = [prefix for prefix in self.cfg.freeze if not any(n.startswith(prefix) for n in names)]
        if unmatched:
            raise ValueError(f"--freeze prefixes {unmatched} match no parameter (names look like {names[0]!r})")
        for name, param in self.named_parameters():
            if name.startswith(self.cfg.freeze):
                param.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Per-block activation checkpointing of the prefixed backbone.

        Args:
            enable: Turn checkpointing on or off.
        """
        self.backbone.set_grad_checkpointing(enable)

    def prefixes(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Conditioning pass and prefix generation.

        Args:
            tokens: Token embedding (B, T, D).

        Returns:
            Prefixes (depth, 2, B, H, P, e), or None without a generator.
        """
        if self.conditioner is None:
            return None
        return self.backbone.prefix_generator(self.conditioner(tokens, self.backbone))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """CLS feature of the prefixed backbone (not normalised).

        Args:
            images: (N, 3, S, S).

        Returns:
            (N, D).
        """
        if self.front_end is not None:
            images = self.front_end(images)
        tokens = self.backbone.embed_tokens(images)
        return self.backbone.forward_head(self.backbone.forward_tokens(tokens, self.prefixes(tokens)))

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """Training projections.

        Args:
            images: (N, 3, S, S).

        Returns:
            L2-normalised head outputs (N, head_out_dim).
        """
        return self.projection_head(self.forward_features(images))

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, labelled_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Training step forward: projections of both views and the GCD loss.

        Args:
            images: (2B, 3, S, S), [all view 1; all view 2].
            labels: (B,) labels (read for labelled samples only).
            labelled_mask: (B,) bool, True for labelled samples.

        Returns:
            {"loss", "loss_unsup", "loss_sup", "labelled_fraction", "batches_without_labels"} (the last is 1 when
            no sample of the batch is labelled, so the SupCon term was skipped).
        """
        if images.shape[0] != 2 * labels.shape[0]:
            raise ValueError(f"expected 2B images for B = {labels.shape[0]} labels, got {images.shape[0]}")
        cfg = self.cfg
        losses = gcd_loss(
            self.project(images),
            labels,
            labelled_mask,
            sup_con_weight=cfg.sup_con_weight,
            temperature=cfg.temperature,
            sup_con_temperature=cfg.sup_con_temperature,
            contrast_unlabel_only=cfg.contrast_unlabel_only,
        )
        losses["labelled_fraction"] = labelled_mask.float().mean()
        losses["batches_without_labels"] = (~losses.pop("has_labelled")).float()
        return losses

    @property
    def views_per_sample(self) -> int:
        """Two augmented views of every image."""
        return 2

    def end_epoch(self, epoch: int, stats: dict[str, float]) -> None:
        """Log the batches whose SupCon term was skipped (no labelled sample)."""
        if stats.get("batches_without_labels"):
            logger.info(
                "epoch %d: %d batches had no labelled sample (SupCon term skipped)",
                epoch,
                int(stats["batches_without_labels"]),
            )

    def batch_inputs(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(views, label, uq_idx, is_labelled)`` -> ``(images (2B, ...), labels, labelled_mask)`` on ``device``.

        Each view is copied as the loader gave it (pinned on CUDA, so the copies overlap with compute) and the two are
        concatenated on the device: a host-side concatenation would make a new, unpinned batch and a synchronous copy.
        """
        views, labels, _, is_labelled = batch
        images = torch.cat([view.to(device, non_blocking=True) for view in views], dim=0)
        return images, labels.to(device, non_blocking=True), is_labelled.to(device, non_blocking=True).bool()

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters that require gradients.

        Returns:
            List of (name, parameter).
        """
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require gradients (what the optimiser updates).

        Returns:
            List of parameters.
        """
        return [p for _, p in self.named_trainable_parameters()]

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay: 1-D parameters plus timm's ViT set (pos_embed, cls_token).

        Returns:
            Set of full parameter names.
        """
        names = {n for n, p in self.named_parameters() if p.ndim <= 1}
        return names | {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def get_params_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups over trainable parameters: decay on >= 2-D weights, none on 1-D ones.

        Args:
            weight_decay: Decay for the decayed group.

        Returns:
            Non-empty groups as dicts with `params`, `weight_decay` and `name`.
        """
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, param in self.named_trainable_parameters():
            (no_decay if name in skip else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return [g for g in groups if g["params"]]

    def load_model_state(
        self,
        state_dict: dict[str, torch.Tensor],
        *,
        allow_missing_conditioner: bool,
        allow_missing_front_end: bool = False,
    ) -> None:
        """Load a FaceGCD or reference state dict (`module.` stripped), strictly except for documented gaps.

        Reference checkpoints lack the evaluation prompt (kept as drawn from `seed`), the conditioner copies
        (kept from the pretrained weights, allowed only with `allow_missing_conditioner`) and, when trained with
        `--landmark-cnn`, the landmark CNN (kept from `--landmark-weights`, allowed only with
        `allow_missing_front_end`).

        Args:
            state_dict: Model state dict (the checkpoint's `state_dict`).
            allow_missing_conditioner: Whether missing `conditioner.*` keys are acceptable (True when the model
                was built from `--pretrained-weights`).
            allow_missing_front_end: Whether missing `front_end.*` keys are acceptable (True when the model's
                landmark CNN was loaded from `--landmark-weights`).
        """
        result = self.load_state_dict(_strip_module(state_dict), strict=False)
        missing_prompt = [k for k in result.missing_keys if k in _EVAL_PROMPT_BUFFERS]
        missing_cond = [k for k in result.missing_keys if k.startswith("conditioner.")]
        missing_front = (
            [k for k in result.missing_keys if k.startswith("front_end.")] if allow_missing_front_end else []
        )
        skipped = set(missing_prompt) | set(missing_cond) | set(missing_front)
        other = [k for k in result.missing_keys if k not in skipped]
        problems = [f"missing: {other}"] if other else []
        if result.unexpected_keys:
            problems.append(f"unexpected: {list(result.unexpected_keys)}")
        if missing_cond and not allow_missing_conditioner:
            problems.append(f"missing conditioner copies {missing_cond[:4]}... (pass --pretrained-weights)")
        if problems:
            raise RuntimeError("checkpoint does not fit the model: " + "; ".join(problems))
        if missing_prompt:
            logger.warning("checkpoint has no evaluation prompt; using the one drawn from seed %d", self.cfg.seed)
            self.backbone.prefix_generator.reset_eval_prompts()
        if missing_cond:
            logger.warning("checkpoint has no conditioner copies; keeping the pretrained weights for them")
        if missing_front:
            logger.warning("checkpoint has no landmark CNN; keeping the one loaded from --landmark-weights")


def build_facegcd(
    cfg: ModelConfig,
    pretrained_weights: Optional[Union[str, Path]] = None,
    checkpoint_key: str = "teacher",
    *,
    weights_only: bool = True,
    landmark_weights: Optional[Union[str, Path]] = None,
    checkpoint_follows: bool = False,
) -> FaceGCD:
    """Build the backbone, load pretrained weights (if given) and assemble the FaceGCD model.

    Args:
        cfg: Model configuration.
        pretrained_weights: DINO/timm/FaceGCD checkpoint for the backbone; None = random init (with a warning, unless
            ``checkpoint_follows``).
        checkpoint_key: Entry of a full DINO checkpoint (`teacher` or `student`).
        weights_only: Safe loading of `pretrained_weights`; False for `--unsafe-load`.
        landmark_weights: landmark CNN weights in the reference format (`--landmark-weights`) for a model with the
            front end; None keeps its random initialisation (a checkpoint's own copy is loaded afterwards).
        checkpoint_follows: the caller loads a checkpoint's weights into the model next.

    Returns:
        The model (on CPU).
    """
    backbone = create_backbone(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.img_size, depth=cfg.depth)
    if pretrained_weights is None:
        if not checkpoint_follows:
            logger.warning("no --pretrained-weights given: the backbone is randomly initialised")
    else:
        load_pretrained_backbone(
            backbone, pretrained_weights, checkpoint_key, weights_only=weights_only, reads_mosaics=cfg.landmark_cnn
        )
    model = FaceGCD(cfg, backbone)
    if landmark_weights is not None and model.front_end is not None:
        load_landmark_weights(landmark_weights, model.front_end, weights_only=weights_only)
    n_train = sum(p.numel() for p in model.trainable_parameters())
    n_total = sum(p.numel() for p in model.parameters())
    logger.info(
        "FaceGCD %s/%d@%d P=%d: %d parameters, %d trainable",
        cfg.arch,
        cfg.patch_size,
        cfg.img_size,
        cfg.prefix_length,
        n_total,
        n_train,
    )
    return model


def infer_model_config(state_dict: dict[str, torch.Tensor], defaults: ModelConfig) -> ModelConfig:
    """Infer architecture fields of a FaceGCD/reference checkpoint from its parameter shapes.

    Width -> arch, patch size (patch-embedding kernel), image size (position embedding), depth (blocks), layer-embed (a
    `layer_embedding` key), head width, and P = 0 when there is no prefix generator. Other fields (P otherwise,
    initializer, seed, ...) come from `defaults`. A field that disagrees with `defaults` is logged as a warning;
    the checkpoint wins.

    Args:
        state_dict: Model state dict (`module.` prefixes allowed).
        defaults: Config supplying the non-inferable fields (usually from the command line).

    Returns:
        The inferred config.
    """
    inferred = _infer_fields(state_dict, defaults)
    for name, value in inferred.items():
        if getattr(defaults, name) != value:
            logger.warning(
                "checkpoint has %s=%r, the flags say %r: using the checkpoint's", name, value, getattr(defaults, name)
            )
    return dataclasses.replace(defaults, **inferred)


def _infer_fields(state_dict: dict[str, torch.Tensor], defaults: ModelConfig) -> dict[str, Any]:
    """The ModelConfig fields that a state dict's parameter shapes determine (see `infer_model_config`)."""
    sd = _strip_module(state_dict)
    required = ("backbone.patch_embed.proj.weight", "backbone.pos_embed")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"cannot infer the model from a state dict without {missing}")
    width, _, patch, _ = sd["backbone.patch_embed.proj.weight"].shape
    if width not in _WIDTH_TO_ARCH:
        raise ValueError(f"unsupported ViT width {width}; known widths {sorted(_WIDTH_TO_ARCH)}")
    grid = round((sd["backbone.pos_embed"].shape[1] - 1) ** 0.5)
    inferred: dict[str, Any] = {
        "arch": _WIDTH_TO_ARCH[width],
        "patch_size": patch,
        "img_size": grid * patch,
        "depth": len({k.split(".")[2] for k in sd if k.startswith("backbone.blocks.")}),
        "layer_embed": any("layer_embedding" in k for k in sd),
    }
    hypernet = "backbone.prefix_generator.key_down_prefix_hypernet.weight_generator.0.weight"
    if hypernet in sd:
        inferred["hypernet_hidden_dim"] = sd[hypernet].shape[0]
    if "projection_head.last_layer.weight_v" in sd:
        inferred["head_out_dim"] = sd["projection_head.last_layer.weight_v"].shape[0]
    has_generator = any(k.startswith("backbone.prefix_generator.") for k in sd)
    if not has_generator:
        inferred["prefix_length"] = 0
    elif defaults.prefix_length == 0:
        raise ValueError("the checkpoint has a prefix generator but prefix_length is 0; pass --prefix-length")
    elif "backbone.prefix_generator.eval_prompt_key" in sd:
        inferred["prefix_length"] = sd["backbone.prefix_generator.eval_prompt_key"].shape[0]
    return inferred


def _strip_module(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the leading `module.` that DDP-wrapped (reference) checkpoints carry."""
    return {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}


def load_facegcd_checkpoint(
    path: Union[str, Path],
    target: Union[ModelConfig, FaceGCD],
    *,
    pretrained_weights: Optional[Union[str, Path]] = None,
    checkpoint_key: str = "teacher",
    weights_only: bool = True,
    landmark_weights: Optional[Union[str, Path]] = None,
) -> tuple[FaceGCD, dict[str, Any]]:
    """Load a trained FaceGCD or reference checkpoint (`--checkpoint-weights`, `--initial-checkpoint`).

    The state dict is the file's `state_dict` entry (or the file itself), `module.` prefixes stripped. Reference
    checkpoints may lack the evaluation prompt (drawn from the seed), the conditioner copies (kept from the
    pretrained backbone, so `pretrained_weights` is then required) and the landmark CNN of a `--landmark-cnn` run
    (read from `landmark_weights`, which is then required); see `FaceGCD.load_model_state`. Our checkpoints carry
    their CNN.

    Args:
        path: Checkpoint file.
        target: A config to build the model from (the checkpoint's `model_config`, or the fields inferred from
            its shapes, win over it; extraction), or an already built model to load into (`--initial-checkpoint`);
            a checkpoint whose architecture differs from that model is an error.
        pretrained_weights: DINO backbone weights (`--pretrained-weights`). When building, they are read only for
            a checkpoint without conditioner copies; a built model must have been built from them (they are not
            read again), which is what allows the copies to be missing.
        checkpoint_key: Entry of a full DINO checkpoint in `pretrained_weights`.
        weights_only: Safe loading; False for `--unsafe-load`.
        landmark_weights: Landmark CNN (`--landmark-weights`) for a reference checkpoint built with
            `--landmark-cnn` that does not hold its CNN; ignored for checkpoints that do.

    Returns:
        The model (on the device it was on; CPU if built) and the checkpoint dict (`epoch`, ...).
    """
    ckpt = load_checkpoint(path, weights_only=weights_only)
    state_dict = ckpt.get("state_dict", ckpt)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(
            f"{path} holds no FaceGCD state dict (entries: {sorted(ckpt)[:10]}); expected a train.py checkpoint "
            "such as model_best.pth.tar (DINO backbone weights go to --pretrained-weights)"
        )
    state_dict = _strip_module(state_dict)
    if isinstance(target, FaceGCD):
        model = target
        stored = ckpt.get("model_config") or _infer_fields(state_dict, model.cfg)
        mismatched = [
            f"{name} {stored[name]!r} (model: {getattr(model.cfg, name)!r})"
            for name in _SHAPE_FIELDS
            if name in stored and stored[name] != getattr(model.cfg, name)
        ]
        if mismatched:
            raise CheckpointError(
                f"{path} does not fit the model built from the flags: the checkpoint has {', '.join(mismatched)}; "
                "pass matching model flags"
            )
        allow_missing_conditioner = pretrained_weights is not None
        allow_missing_front_end = False
    else:
        if "model_config" in ckpt:
            config = ModelConfig.from_dict(ckpt["model_config"])
        else:
            config = infer_model_config(state_dict, target)
        has_conditioner = any(k.startswith("conditioner.") for k in state_dict)
        pretrained = None if has_conditioner or config.prefix_length == 0 else pretrained_weights
        cnn_weights = None
        if config.landmark_cnn and not any(k.startswith("front_end.") for k in state_dict):
            if landmark_weights is None or not Path(landmark_weights).is_file():
                raise CheckpointError(
                    f"{path} holds no landmark CNN (a reference checkpoint trained with --landmark-cnn?): its CNN "
                    f"comes from --landmark-weights, and {landmark_weights} does not exist"
                )
            cnn_weights = landmark_weights
        model = build_facegcd(
            config,
            pretrained,
            checkpoint_key,
            weights_only=weights_only,
            landmark_weights=cnn_weights,
            checkpoint_follows=True,
        )
        allow_missing_conditioner = pretrained is not None
        allow_missing_front_end = cnn_weights is not None
    try:
        model.load_model_state(
            state_dict,
            allow_missing_conditioner=allow_missing_conditioner,
            allow_missing_front_end=allow_missing_front_end,
        )
    except RuntimeError as err:
        raise CheckpointError(f"{path}: {err}") from err
    logger.info("loaded model weights from %s (epoch %s)", path, ckpt.get("epoch", "not stored"))
    return model, ckpt
