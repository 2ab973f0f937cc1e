"""GFD builder: YTF and CASIA selection rules, statistics table, CLI, and agreement with the RecordIO reader."""

import random

import pytest
import torch
from PIL import Image

from data_loader import build_gcd_datasets
from data_loader.build_gfd import build_gfd, format_stats_table, get_args_parser, main
from data_loader.recordio import write_recordio
from data_loader.registry import DATASET_REGISTRY, BenchmarkSpec, DatasetError, Layout

YTF_COUNTS = {"alice": 12, "bob": 9, "carol": 10, "dave": 15, "erin": 11, "frank": 3}


def _image(path, key):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (key % 256, (7 * key) % 256, 90)).save(path, quality=95)


@pytest.fixture
def ytf_src(tmp_path):
    """Per-identity folders; 'dave' keeps his frames in per-video sub-folders as YouTube Faces does."""
    src = tmp_path / "ytf_raw"
    key = 0
    for name, count in YTF_COUNTS.items():
        for i in range(count):
            rel = f"{i % 2}/frame_{i:03d}.jpg" if name == "dave" else f"{i:03d}.jpg"
            _image(src / name / rel, key)
            key += 1
    return src


def _listing(root, split):
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted((root / split).iterdir())}


def test_ytf_selection_split_and_statistics(ytf_src, tmp_path):
    out = tmp_path / "ytf_4"
    stats = build_gfd("ytf", ytf_src, out, 4, min_images=10, workers=2, progress=False)
    eligible = ["alice", "carol", "dave", "erin"]  # bob (9) and frank (3) have fewer than 10 images
    assert sorted(random.Random(42).sample(eligible, 4)) == eligible
    train, test = _listing(out, "train"), _listing(out, "test")
    assert sorted(train) == sorted(test) == eligible
    for name in eligible:
        n = YTF_COUNTS[name]
        assert len(test[name]) == int(0.2 * n)
        assert len(train[name]) + len(test[name]) == n
        assert not set(train[name]) & set(test[name])
    assert "0_frame_000.jpg" in train["dave"] + test["dave"]  # video sub-folders are flattened
    some = train["alice"][0]
    assert (out / "train" / "alice" / some).read_bytes() == (ytf_src / "alice" / some).read_bytes()
    assert stats == {"dataset": "YTF-4", "known_ids": 2, "unknown_ids": 2, "train_images": 39, "test_images": 9}
    table = format_stats_table([stats]).splitlines()
    assert table[0] == "| Dataset | Known IDs | Unknown IDs | Train images | Test images |"
    assert table[2] == "| YTF-4 | 2 | 2 | 39 | 9 |"
    again = build_gfd("ytf", ytf_src, tmp_path / "again", 4, min_images=10, progress=False)
    assert again == stats and _listing(tmp_path / "again", "test") == test


def test_cli_prints_the_table_and_rejects_too_few_identities(ytf_src, tmp_path, capsys):
    args = ["--source", "ytf", "--src", str(ytf_src), "--out", str(tmp_path / "o"), "--ids", "2", "--min-images", "10"]
    assert main(get_args_parser().parse_args(args)) == 0
    assert "| YTF-2 | 1 | 1 |" in capsys.readouterr().out
    with pytest.raises(DatasetError, match="already exists"):
        build_gfd("ytf", ytf_src, tmp_path / "o", 2, min_images=10, progress=False)
    assert (
        build_gfd("ytf", ytf_src, tmp_path / "o", 2, min_images=10, overwrite=True, progress=False)["test_images"] > 0
    )
    with pytest.raises(DatasetError, match="only 1 of 6 identities have >= 13 images"):
        build_gfd("ytf", ytf_src, tmp_path / "x", 2, min_images=13, progress=False)
    bad = ["--source", "ytf", "--src", str(ytf_src), "--out", str(tmp_path / "y"), "--ids", "5", "--min-images", "10"]
    assert main(get_args_parser().parse_args(bad)) == 2
    assert not (tmp_path / "y" / "train").exists()


def _casia_rec(root, counts):
    """insightface RecordIO: identity label -> number of images; keys follow label order."""
    labels = [label for label, n in sorted(counts.items()) for _ in range(n)]
    items = [(0, [len(labels) + 1, float(len(counts))], b"")]
    for key, label in enumerate(labels, start=1):
        path = root / "tmp.jpg"
        _image(path, key)
        items.append((key, float(label), path.read_bytes()))
    root.mkdir(parents=True, exist_ok=True)
    write_recordio(root / "train.rec", root / "train.idx", items)


def test_casia_from_recordio_matches_reading_the_rec_directly(tmp_path, monkeypatch):
    counts = {0: 6, 1: 4, 2: 5, 3: 8, 4: 7}
    src = tmp_path / "faces_webface"
    _casia_rec(src, counts)
    stats = build_gfd("casia", src, tmp_path / "casia_4", 4, min_images=5, progress=False)
    drawn = random.Random(42).sample([0, 2, 3, 4], 4)  # identity 1 has 4 < 5 images
    assert sorted((tmp_path / "casia_4" / "train").iterdir())[0].name == f"00000_{drawn[0]}"
    n_train = sum(int(0.8 * counts[i]) for i in drawn)
    assert stats == {
        "dataset": "CASIA-4",
        "known_ids": 2,
        "unknown_ids": 2,
        "train_images": n_train,
        "test_images": sum(counts[i] for i in drawn) - n_train,
    }
    spec = BenchmarkSpec(
        name="casia_4t", layout=Layout.FACE_RECORDIO_OR_FOLDERS, num_classes=4, num_known=2, min_images=5
    )
    monkeypatch.setitem(DATASET_REGISTRY, spec.name, spec)
    from_rec = build_gcd_datasets("casia_4t", src, image_size=16)
    from_folders = build_gcd_datasets("casia_4t", tmp_path / "casia_4", image_size=16)
    assert from_rec.class_names == from_folders.class_names == [f"{i:05d}_{k}" for i, k in enumerate(drawn)]
    assert torch.equal(from_rec.train_labels, from_folders.train_labels)
    assert torch.equal(from_rec.labelled_mask, from_folders.labelled_mask)
    for uq in (0, len(from_rec.test_eval) - 1):
        assert torch.equal(from_rec.test_eval[uq][0], from_folders.test_eval[uq][0])


def test_casia_from_identity_folders(tmp_path):
    src = tmp_path / "casia_raw"
    for k, (name, n) in enumerate({"id_a": 10, "id_b": 2, "id_c": 5}.items()):
        for i in range(n):
            _image(src / name / f"{i:02d}.jpg", 10 * k + i)
    stats = build_gfd("casia", src, tmp_path / "out", 2, min_images=5, test_fraction=0.2, progress=False)
    assert (stats["train_images"], stats["test_images"]) == (8 + 4, 2 + 1)
    folders = sorted(d.name for d in (tmp_path / "out" / "test").iterdir())
    assert [f.split("_", 1)[1] for f in folders] == random.Random(42).sample(["id_a", "id_c"], 2)
