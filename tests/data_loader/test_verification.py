"""Image verification once per tree: the record is reused while files are unchanged, and bad images stay bad."""

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_loader import DatasetError, build_gcd_datasets
from data_loader.recordio import write_recordio
from data_loader.registry import DATASET_REGISTRY, BenchmarkSpec, Layout
from data_loader.verification import RECORD_FILE, cache_dir

S = 16
CLASSES = ("a", "b", "c", "d")


def _write_tree(root, n_train=3, n_test=2):
    """4 classes x (3 train, 2 test) images: 20 in all, 3 or 2 per folder."""
    for c, name in enumerate(CLASSES):
        for split, count in (("train", n_train), ("test", n_test)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (20, 20), (60 * c, 30 * i, 90)).save(root / split / name / f"{i}.jpg")
    return root


@pytest.fixture(autouse=True)
def specs(monkeypatch, tmp_path):
    """'tiny4' (folders, N = 4) and 'casia2' (RecordIO, N = 2); the user cache is inside tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for spec in (
        BenchmarkSpec(name="tiny4", layout=Layout.FACE_FOLDERS, num_classes=4, num_known=2),
        BenchmarkSpec(name="casia2", layout=Layout.FACE_RECORDIO_OR_FOLDERS, num_classes=2, num_known=1, min_images=4),
    ):
        monkeypatch.setitem(DATASET_REGISTRY, spec.name, spec)


@pytest.fixture
def opened(monkeypatch):
    """Everything passed to PIL's ``Image.open`` (the real one still runs)."""
    calls = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        calls.append(fp)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return calls


def _build(root, **kwargs):
    return build_gcd_datasets(kwargs.pop("name", "tiny4"), root, image_size=S, **kwargs)


def _opened_paths(calls):
    """``<class>/<file>`` of each opened path, sorted."""
    return sorted("/".join(Path(p).parts[-2:]) for p in calls)


def _same_benchmark(a, b):
    assert torch.equal(a.labelled_mask, b.labelled_mask) and torch.equal(a.train_labels, b.train_labels)
    assert a.train.uq_idx.tolist() == b.train.uq_idx.tolist()
    assert [a.train_eval.source.describe(i) for i in range(len(a.train_eval))] == [
        b.train_eval.source.describe(i) for i in range(len(b.train_eval))
    ]
    assert [a.test_eval.source.describe(i) for i in range(len(a.test_eval))] == [
        b.test_eval.source.describe(i) for i in range(len(b.test_eval))
    ]


def test_second_build_of_an_unchanged_tree_opens_no_image(tmp_path, opened):
    root = _write_tree(tmp_path / "data")
    first = _build(root)
    assert len(opened) == 20 and len(set(map(str, opened))) == 20
    assert (root / RECORD_FILE).is_file()  # the root is writable: the record sits next to the data
    opened.clear()
    second = _build(root)
    assert opened == []
    _same_benchmark(first, second)


def test_touched_added_or_removed_files_reverify_their_folder_only(tmp_path, opened):
    root = _write_tree(tmp_path / "data")
    _build(root)
    touched = root / "train" / "b" / "1.jpg"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    opened.clear()
    _build(root)
    assert _opened_paths(opened) == ["b/0.jpg", "b/1.jpg", "b/2.jpg"]
    assert all(os.sep + "train" + os.sep in str(p) for p in opened)

    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "test" / "d" / "9.jpg")
    opened.clear()
    ds = _build(root)
    assert _opened_paths(opened) == ["d/0.jpg", "d/1.jpg", "d/9.jpg"] and len(ds.test_eval) == 9

    (root / "test" / "a" / "0.jpg").unlink()
    opened.clear()
    ds = _build(root)
    assert _opened_paths(opened) == ["a/1.jpg"] and len(ds.test_eval) == 8
    opened.clear()
    _build(root)
    assert opened == []


def test_corrupt_images_stay_an_error_and_skipping_them_repeats(tmp_path, opened):
    root = _write_tree(tmp_path / "data")
    _build(root)
    bad = root / "train" / "c" / "2.jpg"
    bad.write_bytes(b"not a jpeg at all")
    for attempt in range(2):  # the second error comes from the record: no image is opened
        opened.clear()
        with pytest.raises(DatasetError) as info:
            _build(root)
        assert str(bad) in str(info.value) and "--skip-corrupt" in str(info.value)
        assert len(opened) == (3 if attempt == 0 else 0)
    skipped = _build(root, skip_corrupt=True)
    opened.clear()
    again = _build(root, skip_corrupt=True)
    assert opened == []
    _same_benchmark(skipped, again)
    assert len(again.train_eval) == 11
    assert str(bad) not in [again.train_eval.source.describe(i) for i in range(11)]
    # replacing the bad file with a good one brings it back
    Image.new("RGB", (20, 20), (5, 5, 5)).save(bad)
    assert len(_build(root).train_eval) == 12


def test_an_image_changed_behind_the_record_still_fails_when_loaded(tmp_path, opened):
    root = _write_tree(tmp_path / "data")
    _build(root)
    victim = root / "test" / "b" / "1.jpg"
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)  # same size ...
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and mtime: the record cannot tell
    opened.clear()
    ds = _build(root)
    assert opened == []
    position = [ds.test_eval.source.describe(i) for i in range(len(ds.test_eval))].index(str(victim))
    with pytest.raises(DatasetError, match=str(victim)):
        ds.test_eval[position]
    with pytest.raises(DatasetError, match=str(victim)):
        ds.test_eval.source.load(position)


def _jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_recordio_verification_is_recorded_by_key(tmp_path, opened):
    labels = [0] * 5 + [1] * 2 + [2] * 5  # identity 1 is too small: keys 6 and 7 are never selected
    items = [(0, [len(labels) + 1, 0.0], b"")] + [(k, float(lab), _jpeg(k)) for k, lab in enumerate(labels, start=1)]
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    write_recordio(rec, idx, items)
    first = _build(tmp_path, name="casia2")
    assert len(opened) == 10  # the 10 selected images, each once
    opened.clear()
    second = _build(tmp_path, name="casia2")
    assert opened == []
    _same_benchmark(first, second)
    # overwrite one selected image inside the .rec without changing its size or mtime
    key = second.test_eval.source.keys[0]
    offset = int(dict(line.split("\t") for line in idx.read_text().splitlines())[str(key)])
    st, raw = rec.stat(), bytearray(rec.read_bytes())
    start = offset + 8 + 24  # magic and length words, payload header (flag 0: no label array), then the JPEG
    assert raw[start : start + len(_jpeg(key))] == _jpeg(key)
    raw[start : start + len(_jpeg(key))] = bytes(len(_jpeg(key)))
    rec.write_bytes(bytes(raw))
    os.utime(rec, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = _build(tmp_path, name="casia2")
    assert opened == []
    with pytest.raises(DatasetError, match=f"{rec} key {key}"):
        third.test_eval[0]
    # a touched .rec is verified again: now the damage is found at build time
    os.utime(rec, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    opened.clear()
    with pytest.raises(DatasetError, match=f"{rec} key {key}"):
        _build(tmp_path, name="casia2")
    assert len(opened) == 10


def test_unwritable_root_keeps_the_record_in_the_user_cache(tmp_path, opened):
    root = _write_tree(tmp_path / "data")
    (root / RECORD_FILE).mkdir()  # the record cannot be written next to the data (works as root, unlike chmod)
    _build(root)
    cached = list(cache_dir().glob("*.json"))
    assert cache_dir() == tmp_path / "cache" / "facegcd" / "verified" and len(cached) == 1
    assert json.loads(cached[0].read_text())["root"] == os.path.realpath(root)
    opened.clear()
    _build(root)
    assert opened == []
    # another tree gets its own record
    other = _write_tree(tmp_path / "other")
    (other / RECORD_FILE).mkdir()
    opened.clear()
    _build(other)
    assert len(opened) == 20 and len(list(cache_dir().glob("*.json"))) == 2


def test_unreadable_record_means_verifying_again(tmp_path, opened, caplog):
    root = _write_tree(tmp_path / "data")
    _build(root)
    (root / RECORD_FILE).write_text("{ not json")
    opened.clear()
    with caplog.at_level(logging.WARNING, logger="data_loader.verification"):
        _build(root)
    assert len(opened) == 20 and str(root / RECORD_FILE) in caplog.text
    opened.clear()
    _build(root)
    assert opened == []


def test_verify_images_false_neither_opens_nor_records(tmp_path, opened):
    root = _write_tree(tmp_path / "data")
    _build(root, verify_images=False)
    assert opened == [] and not (root / RECORD_FILE).exists()


def test_recordio_keys_of_a_wider_selection_are_verified_once(tmp_path, opened, monkeypatch):
    monkeypatch.setitem(
        DATASET_REGISTRY,
        "casia3",
        BenchmarkSpec(name="casia3", layout=Layout.FACE_RECORDIO_OR_FOLDERS, num_classes=3, num_known=1, min_images=4),
    )
    labels = [0] * 5 + [1] * 4 + [2] * 6
    items = [(0, [len(labels) + 1, 0.0], b"")] + [(k, float(lab), _jpeg(k)) for k, lab in enumerate(labels, start=1)]
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", items)
    two = _build(tmp_path, name="casia2")  # two of the three identities
    keys_two = set(two.train_eval.source.keys + two.test_eval.source.keys)
    assert len(opened) == len(keys_two) < len(labels)
    opened.clear()
    three = _build(tmp_path, name="casia3")  # all of them: only the third identity's keys are new
    keys_three = set(three.train_eval.source.keys + three.test_eval.source.keys)
    assert keys_three == set(range(1, len(labels) + 1))
    assert len(opened) == len(keys_three - keys_two)
    opened.clear()
    _build(tmp_path, name="casia2")
    _build(tmp_path, name="casia3")
    assert opened == []


def test_a_rank_without_a_readable_record_verifies_itself(tmp_path, opened, monkeypatch):
    """Node-local data: a non-primary rank finds no record covering its images, so it checks them (and finds the bad
    one) instead of trusting or failing."""
    import data_loader.verification as verification

    root = _write_tree(tmp_path / "tree")
    (root / "train" / "b" / "1.jpg").write_bytes(b"not a jpeg")
    monkeypatch.setattr(verification, "is_primary", lambda: False)
    with pytest.raises(DatasetError, match=r"train/b/1\.jpg"):
        _build(root)
    assert len(opened) == 20
    assert not (root / RECORD_FILE).exists()  # only the primary rank writes the record


def test_images_under_8_px_on_a_side_are_named_in_one_warning_at_every_build(tmp_path, opened, caplog):
    root = _write_tree(tmp_path / "data")
    small = {root / "train" / "b" / "1.jpg": (1, 1), root / "test" / "d" / "0.jpg": (7, 20)}
    for path, size in small.items():
        Image.new("RGB", size, (9, 9, 9)).save(path)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "train" / "c" / "0.jpg")  # 8 px on each side: not small
    for attempt in range(2):  # the second warning comes from the record: no image is opened
        opened.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data_loader.verification"):
            ds = _build(root)
        assert len(opened) == (20 if attempt == 0 else 0)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"2 image(s) of {root} are smaller than 8 px on a side" in warnings[0]
        assert f"{root / 'train' / 'b' / '1.jpg'} (1x1), {root / 'test' / 'd' / '0.jpg'} (7x20);" in warnings[0]
        assert "c/0.jpg" not in warnings[0]
        assert ds.train_eval.source.describe(4) == str(root / "train" / "b" / "1.jpg")
        assert ds.train_eval[4][0].shape == (3, S, S)  # the 1 x 1 image still loads (upscaled)
    # more than five are counted and the first five named
    for i in range(3):
        for c in "acd":
            Image.new("RGB", (3, 40), (9, 9, 9)).save(root / "train" / c / f"{i}.jpg")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_loader.verification"):
        _build(root)
    assert "11 image(s)" in caplog.text and ", ... (11 in all); they are upscaled" in caplog.text


def test_a_record_of_the_previous_version_is_verified_again(tmp_path, opened):
    root = _write_tree(tmp_path / "data")
    _build(root)
    record = json.loads((root / RECORD_FILE).read_text())
    assert record["version"] == 2 and all(entry["small"] == {} for entry in record["groups"].values())
    for entry in record["groups"].values():  # a version 1 record: no "small" entries
        del entry["small"]
    (root / RECORD_FILE).write_text(json.dumps(dict(record, version=1)))
    opened.clear()
    _build(root)
    assert len(opened) == 20
