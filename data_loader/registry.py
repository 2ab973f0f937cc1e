"""Benchmark registry: one :class:`BenchmarkSpec` per dataset name, read by the single dataset implementation.

A spec states where the images live (the root layout), how many classes the benchmark has, how they split into
known and unknown classes, and, for benchmarks the framework selects itself (CASIA from RecordIO), the selection
rules of docs/method.md, section 2. Names are case-insensitive; ``casiafaces_*`` are aliases of ``casia_*``.
``identity_folders`` reads any identity-folder tree of your own faces: N comes from its folders and the number of
known identities from the caller.

References: timm ``timm/models/_registry.py`` (registry with a helpful error), DINOv2 ``dinov2/data/loaders.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from enum import Enum

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset name, layout or file is not what the benchmark expects; the message names the path or value."""


class Layout(str, Enum):
    """How a benchmark root is laid out on disk."""

    FACE_FOLDERS = "face_folders"  # <root>/train/<identity>/*.jpg and <root>/test/<identity>/*.jpg
    FACE_RECORDIO_OR_FOLDERS = "face_recordio_or_folders"  # <root>/train.rec + train.idx, else FACE_FOLDERS
    SYNTH_FACES = "synth_faces"  # FACE_FOLDERS written by data_loader.synthface for a preset
    GCD_FOLDER = "gcd_folder"  # ImageFolder trees <root>/train/<class>/* and <root>/{test,val,validation}/<class>/*


class KnownRule(str, Enum):
    """Which classes are known (may carry labels)."""

    FIRST = "first"  # classes 0..num_known-1 in sorted folder order
    PICKLE = "pickle"  # the 'Old'/'New' lists of a class-split pickle (herbarium_19)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything the dataset builder needs to know about one benchmark.

    Args:
        name: canonical registry name.
        layout: root layout (:class:`Layout`).
        num_classes: N, the number of classes; None = taken from the folders (identity_folders, SynthFaces without
            its generator).
        num_known: N_old, the number of known classes; None = N // 2.
        num_known_from_caller: N_old is chosen by the caller (``num_known``, ``--num-known``; default N // 2)
            instead of being fixed by the benchmark.
        test_dirs: accepted names of the test split folder, first existing one wins.
        known_rule: how the known classes are chosen (:class:`KnownRule`).
        split_file: class-split pickle for ``KnownRule.PICKLE`` (keys 'Old' and 'New'), looked up in ``osr_split_dir``.
        ssb_split_file: Semantic Shift Benchmark pickle used with ``use_ssb_splits`` (keys 'known_classes' and
            'unknown_classes' with 'Hard', 'Medium', 'Easy').
        class_subset_seed: draw ``num_classes`` of the classes found with ``np.random.RandomState(seed)`` when the
            root holds more (imagenet_100 over ImageNet-1k); None = the root must hold exactly N classes.
        class_list_file: file in the root listing the class folders to use, one per line (replaces the draw).
        synth_preset: SynthFaces preset name (``data_loader.synthface.SYNTH_PRESETS``).
        selection_seed: seed of the identity selection for benchmarks built from RecordIO (42).
        min_images: minimum images per identity for that selection.
        train_fraction: per identity, the first int(train_fraction * n) shuffled images go to train.
        reference_counts: (train images, test images) reported by the reference release, for information.
        description: one line shown in listings.
    """

    name: str
    layout: Layout
    num_classes: int | None
    num_known: int | None = None
    num_known_from_caller: bool = False
    test_dirs: tuple[str, ...] = ("test",)
    known_rule: KnownRule = KnownRule.FIRST
    split_file: str | None = None
    ssb_split_file: str | None = None
    class_subset_seed: int | None = None
    class_list_file: str | None = None
    synth_preset: str | None = None
    selection_seed: int = 42
    min_images: int | None = None
    train_fraction: float = 0.8
    reference_counts: tuple[int, int] | None = None
    description: str = ""

    @property
    def expected_layout(self) -> str:
        """Human-readable description of the folders this benchmark reads (used in error messages)."""
        test = "|".join(self.test_dirs)
        folders = f"<data-path>/train/<class>/<image> and <data-path>/{{{test}}}/<class>/<image>"
        if self.layout == Layout.FACE_RECORDIO_OR_FOLDERS:
            return f"<data-path>/train.rec + <data-path>/train.idx (insightface RecordIO), or {folders}"
        return folders


_FACE_COUNTS = {
    "youtubefaces": {500: (48_089, 11_779), 1000: (96_002, 23_523), 2000: (190_248, 46_615)},
    "casia": {500: (46_991, 11_999), 1000: (89_508, 22_867), 2000: (184_432, 47_114)},
}
_GENERIC_TEST_DIRS = ("test", "val", "validation")


def _face_specs() -> list[BenchmarkSpec]:
    specs = []
    for n, counts in _FACE_COUNTS["youtubefaces"].items():
        specs.append(
            BenchmarkSpec(
                name=f"youtubefaces_{n}",
                layout=Layout.FACE_FOLDERS,
                num_classes=n,
                num_known=n // 2,
                min_images=100,
                reference_counts=counts,
                description=f"YouTube Faces, {n} identities (build with python -m data_loader.build_gfd --source ytf)",
            )
        )
    for n, counts in _FACE_COUNTS["casia"].items():
        specs.append(
            BenchmarkSpec(
                name=f"casia_{n}",
                layout=Layout.FACE_RECORDIO_OR_FOLDERS,
                num_classes=n,
                num_known=n // 2,
                min_images=50,
                train_fraction=0.8,
                reference_counts=counts,
                description=f"CASIA-WebFace, {n} identities drawn from train.rec/train.idx or prepared folders",
            )
        )
    specs.append(
        BenchmarkSpec(
            name="identity_folders",
            layout=Layout.FACE_FOLDERS,
            num_classes=None,
            num_known_from_caller=True,
            description="your own faces: any <data-path>/train/<id>/ + test/<id>/ tree; N from the folders, "
            "known = the first --num-known identities in sorted order (default N // 2)",
        )
    )
    for preset in ("synthfaces_tiny", "synthfaces_quick"):
        specs.append(
            BenchmarkSpec(
                name=preset,
                layout=Layout.SYNTH_FACES,
                num_classes=None,
                synth_preset=preset,
                description=f"synthetic faces, preset {preset} of data_loader.synthface",
            )
        )
    return specs


def _generic_specs() -> list[BenchmarkSpec]:
    def generic(name: str, n: int, n_known: int | None, **kwargs) -> BenchmarkSpec:
        return BenchmarkSpec(
            name=name,
            layout=Layout.GCD_FOLDER,
            num_classes=n,
            num_known=n_known,
            test_dirs=_GENERIC_TEST_DIRS,
            description=f"generic GCD benchmark {name} from local ImageFolder trees (never downloaded)",
            **kwargs,
        )

    return [
        generic("cifar10", 10, 5),
        generic("cifar100", 100, 80),
        generic("imagenet_100", 100, 50, class_subset_seed=42, class_list_file="imagenet_100_classes.txt"),
        generic("cub", 200, 100, ssb_split_file="cub_osr_splits.pkl"),
        generic("scars", 196, 98, ssb_split_file="scars_osr_splits.pkl"),
        generic("aircraft", 100, 50, ssb_split_file="aircraft_osr_splits.pkl"),
        generic("herbarium_19", 683, 341, known_rule=KnownRule.PICKLE, split_file="herbarium_19_class_splits.pkl"),
    ]


DATASET_REGISTRY: dict[str, BenchmarkSpec] = {spec.name: spec for spec in _face_specs() + _generic_specs()}
DATASET_ALIASES: dict[str, str] = {f"casiafaces_{n}": f"casia_{n}" for n in _FACE_COUNTS["casia"]}


def list_datasets() -> list[str]:
    """Registered benchmark names (canonical spellings, sorted).

    Returns:
        The names ``get_spec`` accepts, aliases excluded.
    """
    return sorted(DATASET_REGISTRY)


def _resolve_synth(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Fill N from ``SYNTH_PRESETS``; without the generator module N is read from the folders."""
    try:
        from data_loader.synthface import SYNTH_PRESETS
    except ModuleNotFoundError as err:
        if err.name != "data_loader.synthface":
            raise
        logger.debug("data_loader.synthface is not available; %s takes N from its folders", spec.name)
        return spec
    num_ids = int(SYNTH_PRESETS[spec.synth_preset]["ids"])
    return dataclasses.replace(spec, num_classes=num_ids, num_known=num_ids // 2)


def get_spec(name: str) -> BenchmarkSpec:
    """Look a benchmark up by name.

    Args:
        name: dataset name, case-insensitive; ``casiafaces_N`` is accepted for ``casia_N``.

    Returns:
        The benchmark's spec (``num_known`` filled in where N is fixed).

    Raises:
        DatasetError: the name is not registered; the message lists the valid names.
    """
    key = str(name).strip().lower()
    key = DATASET_ALIASES.get(key, key)
    if key not in DATASET_REGISTRY:
        aliases = ", ".join(sorted(DATASET_ALIASES))
        raise DatasetError(
            f"unknown dataset {name!r}; valid names (case-insensitive): {', '.join(list_datasets())} "
            f"(aliases: {aliases})"
        )
    spec = DATASET_REGISTRY[key]
    if spec.synth_preset is not None:
        spec = _resolve_synth(spec)
    if spec.num_known is None and spec.num_classes is not None:
        spec = dataclasses.replace(spec, num_known=spec.num_classes // 2)
    return spec
