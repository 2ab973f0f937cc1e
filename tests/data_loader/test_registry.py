"""Benchmark registry: names, aliases, class counts and the unknown-name error."""

import pytest

from data_loader import DatasetError, get_spec, list_datasets, synthface
from data_loader.registry import KnownRule, Layout

FACE_NAMES = [f"{kind}_{n}" for kind in ("youtubefaces", "casia") for n in (500, 1000, 2000)]
GENERIC = {
    "cifar10": (10, 5),
    "cifar100": (100, 80),
    "imagenet_100": (100, 50),
    "cub": (200, 100),
    "scars": (196, 98),
    "aircraft": (100, 50),
    "herbarium_19": (683, 341),
}


def test_every_benchmark_is_listed():
    names = list_datasets()
    assert names == sorted(names)
    for name in FACE_NAMES + list(GENERIC) + ["synthfaces_tiny", "synthfaces_quick", "identity_folders"]:
        assert name in names


def test_identity_folders_take_n_from_the_folders_and_n_old_from_the_caller():
    spec = get_spec("IDENTITY_FOLDERS")
    assert spec.layout == Layout.FACE_FOLDERS and spec.known_rule == KnownRule.FIRST
    assert (spec.num_classes, spec.num_known, spec.num_known_from_caller) == (None, None, True)
    assert not any(get_spec(name).num_known_from_caller for name in list_datasets() if name != "identity_folders")


@pytest.mark.parametrize("name", FACE_NAMES)
def test_face_benchmarks_split_identities_in_half(name):
    spec = get_spec(name)
    n = int(name.rsplit("_", 1)[1])
    assert (spec.num_classes, spec.num_known) == (n, n // 2)
    assert spec.known_rule == KnownRule.FIRST
    expected_layout = Layout.FACE_FOLDERS if name.startswith("youtube") else Layout.FACE_RECORDIO_OR_FOLDERS
    assert spec.layout == expected_layout


def test_names_are_case_insensitive_and_casiafaces_is_an_alias():
    assert get_spec("YouTubeFaces_1000").name == "youtubefaces_1000"
    for n in (500, 1000, 2000):
        assert get_spec(f"CASIAfaces_{n}") == get_spec(f"casia_{n}")
    assert "train.rec" in get_spec("casia_500").expected_layout
    assert get_spec("casia_500").min_images == 50
    assert get_spec("youtubefaces_500").min_images == 100


@pytest.mark.parametrize("name", sorted(GENERIC))
def test_generic_sets_read_local_folders(name):
    spec = get_spec(name)
    assert spec.layout == Layout.GCD_FOLDER
    assert (spec.num_classes, spec.num_known) == GENERIC[name]
    assert "val" in spec.test_dirs


def test_synthface_presets_take_n_from_the_generator():
    for preset in ("synthfaces_tiny", "synthfaces_quick"):
        spec = get_spec(preset)
        ids = synthface.SYNTH_PRESETS[preset]["ids"]
        assert (spec.num_classes, spec.num_known) == (ids, ids // 2)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_spec("youtubefaces_123")
    assert isinstance(info.value, DatasetError)
    message = str(info.value)
    assert "youtubefaces_123" in message
    for name in ("youtubefaces_500", "casia_2000", "cifar100", "casiafaces_1000", "identity_folders"):
        assert name in message
