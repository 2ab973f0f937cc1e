"""The method registry: one entry per training method, found by name (detectron2's ``META_ARCH_REGISTRY`` pattern).

A method is a :class:`Method` subclass registered with :func:`register_method`. It names itself, its configuration
class (a ``model.meta_arch.MethodConfig``), its own argument group with its published recipe as defaults, the rule
that scales ``--lr-base`` with the batch, the builder of its run (:class:`MethodSetup`), and how a trained checkpoint
becomes a model that embeds images (extraction, SSK, verification). ``train.py``, ``extract_features.py``,
``SSK.py`` and ``verify.py`` ask this registry; no other shared code knows a method's name. docs/architecture.md walks
through adding one.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from model.meta_arch import MetaArch, MethodConfig
from utils.checkpoint import CheckpointError

# The ViT backbones every method can use; recognition adds the IResNets.
VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")
# Checkpoints that name no method are the FaceGCD reference release's (and this framework's first) files.
UNNAMED_CHECKPOINT_METHOD = "facegcd"


@dataclasses.dataclass
class MethodSetup:
    """What the shared loop needs from a method for one run.

    Attributes:
        model: the method (unwrapped ``MetaArch``).
        model_config: plain-type configuration stored in checkpoints (``method`` names the method).
        train_set: the training dataset.
        sampler: its sampler (``set_epoch``, ``state_dict``, ``load_state_dict``).
        data_config: the data settings and listing facts stored in checkpoints.
        eval_sets: name -> dataset for the clustering validation (empty when the data has no GCD split).
        num_classes: K of the validation clustering.
        num_known: labels below this are old (validation metrics).
        description: one log line about the data.
        prepare_schedules: called with (steps per epoch, lr) once the loader exists, for methods with per-step
            schedules (DINO), or None.
    """

    model: MetaArch
    model_config: dict[str, Any]
    train_set: Dataset
    sampler: Any
    data_config: dict[str, Any]
    eval_sets: dict[str, Dataset] = dataclasses.field(default_factory=dict)
    num_classes: int = 0
    num_known: int = 0
    description: str = ""
    prepare_schedules: Callable[[int, float], None] | None = None


class Method:
    """A training method as the scripts see it. Subclass it, set the class attributes, override the hooks.

    Attributes:
        name: the ``--method`` value.
        config_class: the ``MethodConfig`` dataclass its checkpoints store as ``model_config``.
        summary: one line for ``train.py --help``.
        archs: the ``--arch`` values it trains.
        lr_scaling: how ``--lr-base`` becomes the learning rate: ``linear`` (x global batch / 256), ``sqrt``
            (x its square root), ``timm`` (timm's rule: sqrt for Adam-type optimisers, linear otherwise) or ``none``
            (``--lr-base`` is the learning rate, whatever the batch).
        recipe: defaults of the shared flags (optimiser, schedule, batch) that make its published recipe.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    summary: ClassVar[str] = ""
    archs: ClassVar[tuple[str, ...]] = VIT_ARCHS
    lr_scaling: ClassVar[str] = "linear"
    recipe: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add the method's own argument group(s) to the training parser."""

    @classmethod
    def add_embedding_args(cls, parser: argparse.ArgumentParser) -> None:
        """Flags that extraction needs to rebuild this method's model from files that do not describe it (the
        reference release's checkpoints); none by default."""

    @classmethod
    def resolve_args(cls, args: argparse.Namespace, explicit: set[str]) -> None:
        """Fill defaults that depend on other flags and reject combinations that cannot work (``ValueError``
        naming the flag). ``explicit`` holds the destinations given on the command line or in a config file."""

    @classmethod
    def build(cls, args: argparse.Namespace, image_size: int) -> MethodSetup:
        """The method's model, data and sampler for a training run."""
        raise NotImplementedError

    @classmethod
    def load_for_embedding(
        cls, ckpt: dict[str, Any], path: str | Path, *, weights_only: bool, flags: argparse.Namespace | None = None
    ) -> MetaArch:
        """The trained model of checkpoint ``ckpt`` (read from ``path``) on the CPU, ready for ``extract_features``
        and ``forward_features``.

        Args:
            ckpt: the checkpoint dict.
            path: its file (for messages, and for loaders that read it themselves).
            weights_only: safe loading (False with ``--unsafe-load``).
            flags: extraction's flags (including :meth:`add_embedding_args`), None from ``verify.py``.

        Raises:
            CheckpointError: the method has no embedding of its own (say what to do instead), or the file does not
                fit.
        """
        raise CheckpointError(f"{path} is a --method {cls.name} run, which does not embed images for evaluation")

    @classmethod
    def untrained_model(cls, flags: argparse.Namespace) -> MetaArch:
        """The model the flags describe, untrained (extraction without a checkpoint: a baseline)."""
        raise ValueError(f"--method {cls.name} has no untrained baseline; pass --checkpoint-weights")


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to the registry under ``cls.name`` (a second method of that name is an error)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is registered already ({_REGISTRY[cls.name].__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a registered method (tests and notebooks that register one for a while)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The registered method ``name``; an unknown name is a ``ValueError`` listing the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"--method {name!r} is not registered; registered: {', '.join(_REGISTRY)}") from None


def checkpoint_method_name(ckpt: Mapping[str, Any]) -> str:
    """The method that wrote a checkpoint dict: its ``method`` entry (train.py writes one), its ``model_config``'s,
    or the FaceGCD reference's for files that name none."""
    if "method" in ckpt:
        return str(ckpt["method"])
    stored = ckpt.get("model_config")
    if isinstance(stored, Mapping) and "method" in stored:
        return str(stored["method"])
    return UNNAMED_CHECKPOINT_METHOD


def method_of_checkpoint(ckpt: Mapping[str, Any], path: str | Path) -> type[Method]:
    """The registered method of a checkpoint dict; a method this installation lacks is a ``CheckpointError``."""
    name = checkpoint_method_name(ckpt)
    if name not in _REGISTRY:
        raise CheckpointError(
            f"{path} was written by --method {name}, which is not registered here (registered: "
            f"{', '.join(_REGISTRY)}); import the module that registers it"
        )
    return _REGISTRY[name]
