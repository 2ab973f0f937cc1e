"""Bad benchmark input: each case fails before training with one clear error naming the path and what was expected."""

import logging
import pickle

import pytest
from PIL import Image

from data_loader import DatasetError, build_gcd_datasets
from data_loader.recordio import write_recordio
from data_loader.registry import DATASET_REGISTRY, BenchmarkSpec, KnownRule, Layout

S = 16


def _write_tree(root, classes=("a", "b", "c", "d"), n_train=3, n_test=1):
    for c, name in enumerate(classes):
        for split, count in (("train", n_train), ("test", n_test)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (20, 20), (60 * c, 30 * i, 0)).save(root / split / name / f"{i}.jpg")
    return root


@pytest.fixture(autouse=True)
def tiny_spec(monkeypatch):
    spec = BenchmarkSpec(name="tiny4", layout=Layout.FACE_FOLDERS, num_classes=4, num_known=2)
    monkeypatch.setitem(DATASET_REGISTRY, spec.name, spec)
    casia = BenchmarkSpec(
        name="casia4", layout=Layout.FACE_RECORDIO_OR_FOLDERS, num_classes=2, num_known=1, min_images=2
    )
    monkeypatch.setitem(DATASET_REGISTRY, casia.name, casia)


def _error(*args, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        build_gcd_datasets(*args, image_size=S, **kwargs)
    return str(info.value)


def test_unknown_dataset_name_lists_valid_ones(tmp_path):
    message = _error("ytf_500", tmp_path)
    assert "ytf_500" in message and "youtubefaces_500" in message and "casia_1000" in message
    assert "identity_folders" in message


def test_missing_root_train_or_test(tmp_path):
    message = _error("tiny4", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "<data-path>/train/" in message
    root = _write_tree(tmp_path / "data")
    (root / "test").rename(root / "elsewhere")
    message = _error("tiny4", root)
    assert str(root) in message and "test" in message
    (root / "train").rename(root / "gone")
    assert str(root / "train") in _error("tiny4", root)
    assert "train.rec" in _error("casia4", root)  # the expected layout names the RecordIO pair too


def test_identity_folders_differ_between_train_and_test(tmp_path):
    root = _write_tree(tmp_path)
    (root / "test" / "d").rename(root / "test" / "z")
    message = _error("tiny4", root)
    assert "only in" in message and str(root / "train") in message and "d" in message and "z" in message


def test_fewer_identities_than_the_benchmark_needs(tmp_path):
    root = _write_tree(tmp_path, classes=("a", "b", "c"))
    message = _error("tiny4", root)
    assert str(root / "train") in message and "3 class folders" in message and "exactly 4" in message
    assert "needs exactly 500" in _error("youtubefaces_500", root)


def test_empty_identity_folder(tmp_path):
    root = _write_tree(tmp_path)
    for f in (root / "test" / "c").iterdir():
        f.unlink()
    (root / "test" / "c" / "notes.txt").write_text("not an image")
    message = _error("tiny4", root)
    assert str(root / "test" / "c") in message and "no images" in message


def test_num_known_out_of_range_or_contradicting_the_benchmark(tmp_path):
    root = _write_tree(tmp_path)  # 4 identities
    for bad in (0, 4, -1):
        message = _error("identity_folders", root, num_known=bad)
        assert f"--num-known {bad}" in message and "1..3" in message and str(root) in message
    assert "--num-known must be an integer" in _error("identity_folders", root, num_known=1.5)
    message = _error("tiny4", root, num_known=3)
    assert "--num-known 3" in message and "tiny4" in message and "fixed at 2" in message
    assert build_gcd_datasets("tiny4", root, image_size=S, num_known=2).num_known == 2


def test_corrupt_image_is_named_or_skipped(tmp_path, caplog):
    root = _write_tree(tmp_path)
    bad = root / "train" / "b" / "1.jpg"
    bad.write_bytes(b"this is not a jpeg")
    message = _error("tiny4", root)
    assert str(bad) in message and "skip" in message
    with caplog.at_level(logging.WARNING, logger="data_loader.datasets"):
        ds = build_gcd_datasets("tiny4", root, image_size=S, skip_corrupt=True)
    assert str(bad) in caplog.text
    assert len(ds.train_eval) == 11 and ds.train_labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(str(bad) != ds.train_eval.source.describe(i) for i in range(11))
    # a class whose only images are corrupt cannot be skipped away
    for f in (root / "test" / "a").iterdir():
        f.write_bytes(b"garbage")
    assert "no (readable) image for class(es) a" in _error("tiny4", root, skip_corrupt=True)


def test_decoding_errors_at_load_time_name_the_file(tmp_path):
    root = _write_tree(tmp_path)
    bad = root / "test" / "a" / "0.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(bad)
    bad.write_bytes(bad.read_bytes()[:-1500])  # header intact, pixel data cut: passes verify, fails to decode
    ds = build_gcd_datasets("tiny4", root, image_size=S)
    with pytest.raises(DatasetError, match=str(bad)):
        ds.test_eval[0]
    bad.write_bytes(b"garbage")
    ds = build_gcd_datasets("tiny4", root, image_size=S, verify_images=False)
    with pytest.raises(DatasetError, match=str(bad)):
        ds.test_eval[0]


def test_truncated_recordio(tmp_path):
    items = [(0, [7.0, 0.0], b"")]
    for key in range(1, 7):
        path = tmp_path / "x.jpg"
        Image.new("RGB", (20, 20), (key, 0, 0)).save(path)
        items.append((key, float(key % 2), path.read_bytes()))
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    write_recordio(rec, idx, items)
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:-1]) + "\n")
    message = _error("casia4", tmp_path)
    assert str(idx) in message and "truncated" in message
    idx.write_text("\n".join(lines) + "\n")
    rec.write_bytes(rec.read_bytes()[:-30])
    message = _error("casia4", tmp_path)
    assert str(rec) in message and "key 6" in message and "truncated" in message
    (tmp_path / "train.idx").unlink()
    assert str(idx) in _error("casia4", tmp_path)


def test_bad_labelled_fraction_and_missing_class_split_file(tmp_path, monkeypatch):
    root = _write_tree(tmp_path / "data")
    assert "prop_train_labels" in _error("tiny4", root, prop_train_labels=0.0)
    spec = BenchmarkSpec(
        name="herb_t", layout=Layout.GCD_FOLDER, num_classes=4, known_rule=KnownRule.PICKLE, split_file="splits.pkl"
    )
    monkeypatch.setitem(DATASET_REGISTRY, spec.name, spec)
    message = _error("herb_t", root, osr_split_dir=tmp_path)
    assert str(tmp_path / "splits.pkl") in message
    with open(tmp_path / "splits.pkl", "wb") as f:
        pickle.dump({"Old": [0, 1], "New": [2]}, f)
    assert "partition classes 0..3" in _error("herb_t", root, osr_split_dir=tmp_path)


def test_a_labelled_fraction_that_leaves_fewer_labelled_images_than_known_classes_is_refused(tmp_path):
    root = _write_tree(tmp_path)  # 4 classes x 3 train images, known = the first 2: 6 known-class images
    # int(0.01 * 6) = 0 and int(0.3 * 6) = int(1.8) = 1 labelled images: fewer than the 2 known classes
    for prop, labelled in ((0.01, 0), (0.3, 1)):
        message = _error("tiny4", root, prop_train_labels=prop)
        assert f"--prop-train-labels {prop} labels {labelled} of the 6 known-class training images" in message
        assert "fewer than one per known class (2 classes); raise it" in message
    # int(0.34 * 6) = int(2.04) = 2: as many labelled images as known classes is accepted
    assert int(build_gcd_datasets("tiny4", root, image_size=S, prop_train_labels=0.34).labelled_mask.sum()) == 2
