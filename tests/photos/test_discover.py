"""``discover.py`` end to end: SynthFaces identities recovered and separated, reruns reuse unchanged files, and bad
input gives report lines or one clear error."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageOps

from discover import cli
from photos.demo_score import score


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _synth_folders(faces: str, root: Path, extra: bool = False) -> tuple[Path, Path]:
    """Gallery: images 000-002 of identities 0-3 (train split). Photos: the 2 test images and train images 003-005
    of all 8 identities (identities 4-7 are new to the gallery), named ``id<k>_...``; ``extra`` adds the mirror image of
    each identity's first test image (a rerun with more photos)."""
    gallery, photos = root / "known", root / "photos"
    for k in range(4):
        (gallery / f"person{k}").mkdir(parents=True, exist_ok=True)
        for i in range(3):
            shutil.copy(f"{faces}/train/id_{k:04d}/{i:03d}.jpg", gallery / f"person{k}" / f"{i}.jpg")
    photos.mkdir(exist_ok=True)
    for k in range(8):
        sources = [f"{faces}/test/id_{k:04d}/{i:03d}.jpg" for i in range(2)]
        sources += [f"{faces}/train/id_{k:04d}/{i:03d}.jpg" for i in range(3, 6)]
        for j, src in enumerate(sources):
            shutil.copy(src, photos / f"id{k}_{j}.jpg")
        if extra:
            _mirror(f"{faces}/test/id_{k:04d}/000.jpg", photos / f"id{k}_flip.jpg")
    return gallery, photos


def _mirror(src: str, dst: Path) -> None:
    """Save the mirror image of ``src`` (new file content, the same face)."""
    ImageOps.mirror(Image.open(src)).save(dst)


def test_discover_synthfaces(tiny_faces, checkpoint, tmp_path):
    """Known identities are named after their gallery person and the four new ones are separated: the Hungarian
    assignment accuracy over the 40 photo faces is measured (0.925 when written) and must stay >= 0.8."""
    gallery, photos = _synth_folders(tiny_faces, tmp_path)
    out = tmp_path / "report"
    base = ["--checkpoint-weights", str(checkpoint), "--gallery", str(gallery), "--photos", str(photos)]
    base += ["--out", str(out), "--aligned", "--no-progress"]
    assert cli(base + ["--K", "8"]) == 0

    measured = score(out, {0, 1, 2, 3}, gallery_name="person{}")
    print(measured)
    assert measured["faces"] == 40 and measured["people_found"] == 8
    assert measured["accuracy"] >= 0.8 and measured["known_named"] >= 0.8 and measured["new_kept_apart"] >= 0.8
    settings = json.loads((out / "settings.json").read_text())
    assert settings["K"] == 8 and settings["known_people"] == [f"person{k}" for k in range(4)]
    assert settings["files_detected"] == 52 and settings["files_reused"] == 0
    page = (out / "report.html").read_text()
    assert page.count("class='row'") == len(settings["sheets"]) == 4 + settings["new_people"]
    assert all((out / sheet).is_file() for sheet in settings["sheets"])
    embeddings = torch.load(out / "embeddings.pt", weights_only=True)
    assert embeddings["embeddings"].shape == (52, 64) and embeddings["role"].count("gallery") == 12

    assert cli(base + ["--K", "8"]) == 2  # a complete report is not replaced without --overwrite
    _synth_folders(tiny_faces, tmp_path, extra=True)
    assert cli(base + ["--overwrite"]) == 0  # --K auto, 8 more photos: only those are detected and embedded
    settings = json.loads((out / "settings.json").read_text())
    assert settings["files_reused"] == 52 and settings["files_detected"] == 8 and settings["faces_embedded"] == 8
    assert settings["K_estimate"]["min_K"] == 4 and 4 <= settings["K"] <= 60
    assert settings["photo_faces"] == 48


def test_discover_bad_input(checkpoint, tmp_path, astronaut, lfw_faces, non_face, caplog):
    """Not an image, a photo without a face, a face under --min-face and a gallery person without a usable face are
    report lines; the other photos are still processed. A DINO run's checkpoint is one clear error."""
    gallery, photos = tmp_path / "known", tmp_path / "photos"
    (gallery / "eileen").mkdir(parents=True)
    (gallery / "cup").mkdir()
    photos.mkdir()
    astronaut.save(gallery / "eileen" / "a.png")
    non_face.save(gallery / "cup" / "coffee.png")
    for i, face in enumerate(lfw_faces[:3]):
        face.save(photos / f"lfw{i}.jpg")
    astronaut.transpose(0).save(photos / "mirrored.png")
    astronaut.resize((64, 64)).save(photos / "small.png")
    non_face.save(photos / "coffee.png")
    (photos / "notes.jpg").write_text("not an image")
    out = tmp_path / "report"
    args = ["--checkpoint-weights", str(checkpoint), "--gallery", str(gallery), "--photos", str(photos)]
    assert cli(args + ["--out", str(out), "--K", "2", "--no-progress"]) == 0
    problems = {Path(r["source"]).name: r["problem"] for r in _rows(out / "problems.csv")}
    assert set(problems) == {"coffee.png", "notes.jpg", "small.png", "cup"}, problems
    assert "not a readable image" in problems["notes.jpg"] and "without a usable face" in problems["cup"]
    faces = [r for r in _rows(out / "assignments.csv") if r["role"] == "photo"]
    assert sorted(Path(r["photo"]).name for r in faces) == ["lfw0.jpg", "lfw1.jpg", "lfw2.jpg", "mirrored.png"]

    dino = tmp_path / "dino" / "checkpoint.pth"
    dino.parent.mkdir()
    torch.save({"method": "dino", "epoch": 3, "model": {}}, dino)
    caplog.clear()
    assert cli(["--checkpoint-weights", str(dino), "--photos", str(photos), "--out", str(tmp_path / "r2")]) == 2
    assert "self-supervised pretraining run" in caplog.text
    assert cli(args + ["--out", str(tmp_path / "r3"), "--K", "zero"]) == 2
    assert "--K 'zero': expected a positive integer or auto" in caplog.text
