"""``python -m photos align``: raw photo folders to aligned identity folders that the training sets read."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from data_loader.recognition import identity_training_set
from photos.__main__ import cli
from utils.face_align import ARCFACE_TEMPLATE_112


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_align_tree(tmp_path, astronaut, lfw_faces, non_face, caplog):
    src, out = tmp_path / "raw", tmp_path / "aligned"
    (src / "eileen").mkdir(parents=True)
    (src / "lfw").mkdir()
    astronaut.save(src / "eileen" / "a.png")
    astronaut.resize((64, 64)).save(src / "eileen" / "small.png")  # her face is ~15 px: under --min-face 20
    for i, face in enumerate(lfw_faces[:3]):
        face.save(src / "lfw" / f"f{i}.jpg")
    non_face.save(src / "lfw" / "coffee.png")
    (src / "lfw" / "notes.jpg").write_text("not an image")
    assert cli(["align", "--src", str(src), "--out", str(out), "--no-progress"]) == 0

    faces = _rows(out / "faces.csv")
    assert [(r["identity"], r["aligned"]) for r in faces] == [
        ("eileen", "eileen/a_0.png"),
        ("lfw", "lfw/f0_0.png"),
        ("lfw", "lfw/f1_0.png"),
        ("lfw", "lfw/f2_0.png"),
    ]
    problems = {r["source"].split("/")[-1]: r["problem"] for r in _rows(out / "no_faces.csv")}
    assert set(problems) == {"small.png", "coffee.png", "notes.jpg"}
    assert "not a readable image" in problems["notes.jpg"] and "no face" in problems["coffee.png"]
    # The aligned crop puts the detected eyes on the template: the eye landmarks of the CSV, mapped by the
    # similarity that the crop used, land on the ArcFace points; checked by the crop's darkest spots near them.
    crop = np.asarray(Image.open(out / "eileen" / "a_0.png"))
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE_112[:2]:
        window = crop[int(y) - 8 : int(y) + 9, int(x) - 8 : int(x) + 9].mean(2)
        dark_y, dark_x = np.unravel_index(window.argmin(), window.shape)
        assert abs(dark_y - 8) <= 5 and abs(dark_x - 8) <= 5, (x, y, dark_x, dark_y)
    data = identity_training_set("recognition_folders", out, 112)
    assert data.num_classes == 2 and len(data.train) == 4

    caplog.clear()
    assert cli(["align", "--src", str(src), "--out", str(out), "--no-progress"]) == 2
    assert "not empty; pass --overwrite" in caplog.text
    assert cli(["align", "--src", str(src / "lfw"), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert [r["aligned"] for r in _rows(out / "faces.csv")] == ["lfw/f0_0.png", "lfw/f1_0.png", "lfw/f2_0.png"]
    assert len(list(tmp_path.glob("aligned.replaced-*"))) == 1


def test_bad_source(tmp_path, caplog, non_face):
    assert cli(["align", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder of photos" in caplog.text
    assert cli(["align", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no photos" in caplog.text
    non_face.save(tmp_path / "coffee.png")
    assert cli(["align", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--min-face", "0"]) == 2
    assert "--min-face must be > 0" in caplog.text
