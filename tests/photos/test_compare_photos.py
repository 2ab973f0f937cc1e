"""Two photos in, one similarity out (the ``verify.py --photos`` function)."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from photos.compare import add_photo_args, compare_photos, threshold_from_results
from utils.cli_errors import exit_code


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-weights", dest="checkpoint_weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--unsafe-load", action="store_true")
    add_photo_args(parser)
    return parser.parse_args(argv)


def test_a_photo_and_its_mirror_are_the_same_person(checkpoint, tmp_path, astronaut, non_face, capsys, caplog):
    """The image + flip embedding does not change under mirroring, so a photo and its mirror image (detected and
    aligned anew) score close to 1; a pair-set threshold t = 1.2 (squared distance) is the cosine 1 - 1.2 / 2 =
    0.4."""
    astronaut.save(tmp_path / "a.png")
    astronaut.transpose(0).save(tmp_path / "b.png")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"lfw": {"accuracy": 0.99, "threshold": 1.2}}}))
    photos = ["--photos", str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert (
        compare_photos(_args("--checkpoint-weights", str(checkpoint), *photos, "--threshold-from", str(results))) == 0
    )
    printed = capsys.readouterr().out.splitlines()
    similarity = float(printed[0].split()[-1])
    assert similarity > 0.95, printed
    assert printed[1].startswith("same person at threshold 0.4000 (lfw of")

    non_face.save(tmp_path / "cup.png")
    args = _args(
        "--checkpoint-weights", str(checkpoint), "--photos", str(tmp_path / "a.png"), str(tmp_path / "cup.png")
    )
    assert exit_code(lambda: compare_photos(args), logging.getLogger("test")) == 2
    assert f"--photos {tmp_path / 'cup.png'}: no face found" in caplog.text


def test_threshold_from_results_needs_one_pair_set(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"lfw": {"threshold": 1.0}, "cfp_fp": {"threshold": 1.4}, "IJBB": {}}}))
    with pytest.raises(ValueError, match="holds 2 pair sets"):
        threshold_from_results(results, None)
    assert threshold_from_results(results, "cfp_fp")[0] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="not a verify.py results.json"):
        threshold_from_results(tmp_path / "missing.json", None)
