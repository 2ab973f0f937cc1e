"""Tests for data_loader/synthface.py and synthface_render.py: determinism, layout, landmarks, presets (generated
into an empty folder, reused, never written over a user's files), CLI, and the difficulty measured by
benchmarks/pixel_nearest_neighbour.py."""

import csv
import io
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.pixel_nearest_neighbour import pixel_nearest_neighbour_accuracy
from data_loader import DatasetError, build_gcd_datasets
from data_loader.synthface import (
    GENERATOR_VERSION,
    LANDMARK_COLUMNS,
    SYNTH_PRESETS,
    ensure_synthfaces,
    generate_synthfaces,
    get_args_parser,
    main,
)
from data_loader.synthface_render import make_identity, render_face
from utils.run_lock import RunLock

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(ids=3, train_per_id=3, test_per_id=2, size=112)
TINY = SYNTH_PRESETS["synthfaces_tiny"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` (the verification record too) with its bytes and mtime."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _landmarks(root: Path) -> list[dict[str, str]]:
    with open(root / "landmarks.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path):
    generate_synthfaces(tmp_path / "a", seed=5, workers=1, progress=False, **SMALL)
    generate_synthfaces(tmp_path / "b", seed=5, workers=2, progress=False, **SMALL)
    generate_synthfaces(tmp_path / "c", seed=6, workers=1, progress=False, **SMALL)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert set(a) == set(c)
    jpgs = [name for name in a if name.endswith(".jpg")]
    assert len(jpgs) == 15
    assert all(a[name] != c[name] for name in jpgs)


def test_a_render_depends_only_on_the_identity_and_the_generator():
    first = render_face(make_identity(4, 9), np.random.default_rng(1), 64)
    again = render_face(make_identity(4, 9), np.random.default_rng(1), 64)
    other = render_face(make_identity(4, 9), np.random.default_rng(2), 64)
    assert first[0] == again[0] and np.array_equal(first[1], again[1])
    assert first[0] != other[0] and first[1].shape == (5, 2)
    with Image.open(io.BytesIO(first[0])) as img:
        assert img.format == "JPEG" and img.size == (64, 64)


def test_identity_images_do_not_depend_on_the_number_of_identities(tmp_path):
    generate_synthfaces(tmp_path / "few", ids=2, train_per_id=2, test_per_id=1, seed=3, progress=False)
    generate_synthfaces(tmp_path / "more", ids=5, train_per_id=2, test_per_id=1, seed=3, progress=False)
    few, more = _files(tmp_path / "few"), _files(tmp_path / "more")
    for name, data in few.items():
        if name.endswith(".jpg"):
            assert more[name] == data


def test_layout_landmarks_and_meta(tmp_path):
    root = tmp_path / "tiny"
    params = SYNTH_PRESETS["synthfaces_tiny"]
    meta = generate_synthfaces(root, progress=False, **params)
    ids, n_train, n_test, size = params["ids"], params["train_per_id"], params["test_per_id"], params["size"]
    names = [f"id_{i:04d}" for i in range(ids)]
    for split, count in (("train", n_train), ("test", n_test)):
        assert sorted(p.name for p in (root / split).iterdir()) == names
        for name in names:
            files = sorted(p.name for p in (root / split / name).iterdir())
            assert files == [f"{i:03d}.jpg" for i in range(count)]
    with Image.open(root / "test" / names[-1] / "001.jpg") as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (size, size)

    rows = _landmarks(root)
    assert list(rows[0]) == ["split", "identity", "file", *LANDMARK_COLUMNS]
    assert len(rows) == ids * (n_train + n_test)
    assert {(r["split"], r["identity"], r["file"]) for r in rows} == {
        (p.parts[-3], p.parts[-2], p.parts[-1]) for p in root.glob("*/*/*.jpg")
    }
    points = np.array([[float(r[c]) for c in LANDMARK_COLUMNS] for r in rows]).reshape(-1, 5, 2)
    assert (points >= 0).all() and (points <= size - 1).all()
    eye_l, eye_r, nose, mouth_l, mouth_r = points.transpose(1, 0, 2)
    assert (eye_l[:, 0] < eye_r[:, 0]).all() and (mouth_l[:, 0] < mouth_r[:, 0]).all()
    assert (np.maximum(eye_l[:, 1], eye_r[:, 1]) < nose[:, 1]).all()
    assert (nose[:, 1] < np.minimum(mouth_l[:, 1], mouth_r[:, 1])).all()
    assert len({tuple(p.ravel()) for p in points}) == len(points)

    on_disk = json.loads((root / "meta.json").read_text())
    assert on_disk == meta
    assert on_disk["generator"] == "synthfaces" and on_disk["version"] == GENERATOR_VERSION
    assert on_disk["seed"] == params["seed"]
    assert on_disk["parameters"] == dict(params, nuisance=1.0)
    assert on_disk["counts"] == dict(identities=ids, train=ids * n_train, test=ids * n_test, images=len(rows))
    assert on_disk["identities"] == names
    assert not [p for p in tmp_path.iterdir() if p.name != "tiny"], "temporary folder left behind"


def test_eye_landmarks_hit_the_pupils_without_nuisance(tmp_path):
    root = tmp_path / "clean"
    generate_synthfaces(root, ids=6, train_per_id=2, test_per_id=1, size=112, nuisance=0.0, progress=False)
    for row in _landmarks(root):
        with Image.open(root / row["split"] / row["identity"] / row["file"]) as img:
            grey = np.asarray(img.convert("L"), dtype=np.float32)
        for i in (0, 1):
            x, y = round(float(row[f"x{i}"])), round(float(row[f"y{i}"]))
            assert grey[y, x] < 70, f"{row['identity']}/{row['file']}: eye landmark {i} not on a pupil"
            assert grey[y, x] < grey[y - 6 : y + 7, x - 6 : x + 7].mean() - 30


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(ids=0), "--ids"),
        (dict(train_per_id=0), "--train-per-id"),
        (dict(test_per_id=-1), "--test-per-id"),
        (dict(size=8), "--size"),
        (dict(seed=-2), "--seed"),
        (dict(workers=0), "--workers"),
        (dict(nuisance=-1.0), "--nuisance"),
    ],
)
def test_bad_parameters_name_the_flag(tmp_path, kwargs, flag):
    args = dict(ids=2, train_per_id=1, test_per_id=1, progress=False) | kwargs
    with pytest.raises(ValueError, match=flag):
        generate_synthfaces(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_folder_and_an_earlier_set_and_touches_neither(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_synthfaces(tmp_path / "out", ids=1, train_per_id=1, test_per_id=1, progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    generate_synthfaces(tmp_path / "set", progress=False, **SMALL)
    before = _snapshot(tmp_path / "set")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_synthfaces(tmp_path / "set", progress=False, **SMALL)
    assert _snapshot(tmp_path / "set") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "set"]


def test_cli_generates_and_rejects_bad_flags(tmp_path):
    argv = ["--train-per-id", "1", "--test-per-id", "1", "--size", "64", "--no-progress"]
    assert main(get_args_parser().parse_args(argv + ["--out", str(tmp_path / "cli"), "--ids", "2"])) == 0
    assert len(list((tmp_path / "cli").glob("*/*/*.jpg"))) == 4
    with pytest.raises(FileExistsError, match="not empty"):  # a second run never replaces the first one's set
        main(get_args_parser().parse_args(argv + ["--out", str(tmp_path / "cli"), "--ids", "3"]))
    assert len(list((tmp_path / "cli").glob("*/*/*.jpg"))) == 4
    assert "--overwrite" not in get_args_parser()._option_string_actions
    cmd = [sys.executable, "-m", "data_loader.synthface", *argv, "--out", str(tmp_path / "bad"), "--ids", "0"]
    bad = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--ids" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_ensure_synthfaces_generates_into_an_empty_folder_and_reuses_it_untouched(tmp_path):
    root = tmp_path / "synth"
    root.mkdir()
    assert ensure_synthfaces(root, "synthfaces_tiny", progress=False) == root
    # synthfaces_tiny: 8 identities x (6 train + 2 test) images
    assert len(list(root.glob("train/*/*.jpg"))) == 48 and len(list(root.glob("test/*/*.jpg"))) == 16
    assert json.loads((root / "meta.json").read_text())["parameters"] == dict(TINY, nuisance=1.0)
    build_gcd_datasets("synthfaces_tiny", root, image_size=32)  # keeps its verification record beside the data
    before = _snapshot(root)
    assert ".facegcd_verified.json" in before
    assert ensure_synthfaces(root, "synthfaces_tiny", progress=False) == root
    assert _snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_a_preset_on_a_set_made_with_other_parameters_is_refused_and_every_file_stays(tmp_path):
    root = tmp_path / "synth"
    # what `python -m data_loader.synthface --out DIR --ids 3 --train-per-id 2 --test-per-id 1 --size 48` writes
    generate_synthfaces(root, ids=3, train_per_id=2, test_per_id=1, size=48, progress=False)
    (root / "notes.txt").write_text("my notes")
    before = _snapshot(root)
    with pytest.raises(DatasetError) as info:
        ensure_synthfaces(root, "synthfaces_tiny", progress=False)
    message = str(info.value)
    # meta.json's parameters against SYNTH_PRESETS["synthfaces_tiny"] (ids 8, 6 + 2 per id, 112 px, seed 0)
    assert str(root) in message and "nothing in it is replaced or deleted" in message
    differing = "ids 3 (preset: 8), train_per_id 2 (preset: 6), test_per_id 1 (preset: 2), size 48 (preset: 112)"
    assert f"made with other parameters: {differing};" in message  # seed and nuisance agree: not named
    assert "1 file(s) or folder(s) that are not part of a SynthFaces set: notes.txt" in message
    assert "another --data-path" in message and "--dataset identity_folders" in message
    assert _snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_a_set_of_another_preset_is_named_by_that_preset(tmp_path, monkeypatch):
    monkeypatch.setitem(SYNTH_PRESETS, "synthfaces_mini", dict(ids=2, train_per_id=1, test_per_id=1, size=32, seed=0))
    root = ensure_synthfaces(tmp_path / "mini", "synthfaces_mini", progress=False)
    with pytest.raises(DatasetError, match="use the set that is there with --dataset synthfaces_mini"):
        ensure_synthfaces(root, "synthfaces_tiny", progress=False)


def test_a_preset_folder_with_a_file_added_or_of_another_version_is_refused_and_missing_files_are_named(
    tmp_path, caplog
):
    root = ensure_synthfaces(tmp_path / "synth", "synthfaces_tiny", progress=False)
    for name in ("missing", "version"):
        shutil.copytree(root, tmp_path / name)
    (root / "train" / "id_0003" / "extra.jpg").write_bytes(b"not from the generator")
    before = _snapshot(root)
    with pytest.raises(DatasetError) as info:
        ensure_synthfaces(root, "synthfaces_tiny", progress=False)
    assert "not part of a SynthFaces set: train/id_0003/extra.jpg" in str(info.value)
    assert f"move the files listed out of {root}" in str(info.value)
    assert _snapshot(root) == before

    (tmp_path / "missing" / "test" / "id_0007" / "001.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="data_loader.synthface"):
        ensure_synthfaces(tmp_path / "missing", "synthfaces_tiny", progress=False)
    assert "1 file(s) of preset synthfaces_tiny are missing" in caplog.text and "test/id_0007/001.jpg" in caplog.text
    assert not (tmp_path / "missing" / "test" / "id_0007" / "001.jpg").exists()  # used as it is, not regenerated

    meta = json.loads((tmp_path / "version" / "meta.json").read_text())
    (tmp_path / "version" / "meta.json").write_text(json.dumps(dict(meta, version="0.9.0")))
    with pytest.raises(DatasetError, match=f"generator version 0.9.0, synthfaces_tiny by {GENERATOR_VERSION}"):
        ensure_synthfaces(tmp_path / "version", "synthfaces_tiny", progress=False)


def test_ensure_synthfaces_rejects_unknown_presets_files_and_foreign_folders(tmp_path):
    with pytest.raises(DatasetError, match="synthfaces_quick"):
        ensure_synthfaces(tmp_path / "x", "synthfaces_huge")
    (tmp_path / "other" / "photos").mkdir(parents=True)
    (tmp_path / "other" / "notes.txt").write_text("not a data set")
    with pytest.raises(DatasetError) as info:
        ensure_synthfaces(tmp_path / "other", "synthfaces_tiny", progress=False)
    message = str(info.value)
    assert "holds no SynthFaces meta.json" in message and "2 file(s) or folder(s)" in message
    assert "notes.txt, photos" in message and "--dataset identity_folders if it holds your own" in message
    assert (tmp_path / "other" / "notes.txt").read_text() == "not a data set"
    (tmp_path / "file").write_text("a file")
    with pytest.raises(DatasetError, match="is not a folder"):
        ensure_synthfaces(tmp_path / "file", "synthfaces_tiny", progress=False)
    assert (tmp_path / "file").read_text() == "a file"


def test_a_killed_generation_leaves_its_partial_folder_which_the_next_one_removes(tmp_path):
    out = tmp_path / "out"
    code = (
        "from data_loader.synthface import generate_synthfaces; "
        f"generate_synthfaces({str(out)!r}, ids=400, train_per_id=10, test_per_id=5, progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT)
    deadline = time.monotonic() + 120
    try:
        while not list(tmp_path.glob(".out.partial-*/set/train/*/*.jpg")):
            assert proc.poll() is None and time.monotonic() < deadline, "the generation ended before the kill"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no clean-up runs
        proc.wait()
    (stale,) = tmp_path.glob(".out.partial-*")
    assert not out.exists()
    lookalike = tmp_path / ".out.partial-mine"  # the generator's name pattern, but not its lock: not provably ours
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("mine")
    live = tmp_path / ".out.partial-live"
    with RunLock(live, "another generation"):  # a generation that is still running
        generate_synthfaces(out, progress=False, **SMALL)
        assert (live / ".lock").is_file()
    assert not stale.exists()
    assert (lookalike / "keep.txt").read_text() == "mine"
    assert len(list(out.glob("*/*/*.jpg"))) == 15


def test_pixel_nearest_neighbour_is_above_chance_but_weak(tmp_path):
    root = tmp_path / "nn"
    generate_synthfaces(root, ids=30, train_per_id=8, test_per_id=3, seed=0, workers=2, progress=False)
    accuracy = pixel_nearest_neighbour_accuracy(root)
    assert 2.0 / 30 < accuracy < 0.5


def test_pixel_nearest_neighbour_improves_without_nuisance(tmp_path):
    params = dict(ids=20, train_per_id=4, test_per_id=2, seed=0, progress=False)
    generate_synthfaces(tmp_path / "hard", **params)
    generate_synthfaces(tmp_path / "easy", nuisance=0.0, **params)
    assert pixel_nearest_neighbour_accuracy(tmp_path / "easy") > pixel_nearest_neighbour_accuracy(tmp_path / "hard")


@pytest.mark.slow
def test_default_benchmark_difficulty_on_100_identities(tmp_path):
    root = tmp_path / "bench"
    generate_synthfaces(root, ids=100, train_per_id=20, test_per_id=5, seed=0, workers=2, progress=False)
    accuracy = pixel_nearest_neighbour_accuracy(root, size=32)
    assert 0.05 < accuracy <= 0.40
