"""The pretraining search's probe (benchmarks/pretraining_probe.py) and its collapse-curve figure, by hand."""

import pytest
import torch
from PIL import Image

from benchmarks.pretraining_probe import main, probe
from utils.plots import plot_collapse_curves


def test_probe_by_hand():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # each image's nearest neighbour is its duplicate: 1-NN 1; pairs (1,2), (3,4) cosine 1, the 4 cross pairs 0 -> 1/3
    same = probe(torch.tensor([e1, e1, e2, e2]), torch.tensor([0, 0, 1, 1]), kmeans_restarts=2)
    assert same == pytest.approx({"nn_raw": 1.0, "nn_centred": 1.0, "kmeans_acc": 1.0, "mean_pairwise_cosine": 1 / 3})
    # the duplicates belong to the other identity: 1-NN 0; k-means finds {1, 3} and {2, 4}, and the best matching of
    # those clusters to the identities {1, 2} and {3, 4} gets one image of each right: 2 of 4
    crossed = probe(torch.tensor([e1, e2, e1, e2]), torch.tensor([0, 0, 1, 1]), kmeans_restarts=2)
    assert crossed == pytest.approx(
        {"nn_raw": 0.0, "nn_centred": 0.0, "kmeans_acc": 0.5, "mean_pairwise_cosine": 1 / 3}
    )


def test_probe_raw_and_centred_nearest_neighbours_by_hand():
    # r0 = (1,0,10), r1 = (1,0,100) of identity 0; r2 = (0,1,10), r3 = (0,1,100) of identity 1.
    # Raw cosines: r0-r1 1001/1005.05 = 0.996 > r0-r3 1000/1005.05 = 0.995 > r0-r2 100/101 = 0.990, so r0 -> r1
    # (right) and r2 -> r3 (right); r1-r3 10000/10001 = 0.9999 beats r1-r0, so r1 -> r3 and r3 -> r1 (wrong): 1/2.
    # Centred (mean (0.5, 0.5, 55)): r0 = (0.5,-0.5,-45) and r2 = (-0.5,0.5,-45) have cosine 2024.5/2025.5, r1 and
    # r3 likewise, while same-identity pairs are anti-aligned: every neighbour is of the other identity, 0.
    rows = torch.tensor([[1.0, 0.0, 10.0], [1.0, 0.0, 100.0], [0.0, 1.0, 10.0], [0.0, 1.0, 100.0]])
    result = probe(rows, torch.tensor([0, 0, 1, 1]), kmeans_restarts=2)
    assert (result["nn_raw"], result["nn_centred"]) == (0.5, 0.0)


def test_collapse_curves_png(tmp_path):
    header = "epoch,train_loss,train_teacher_entropy,train_teacher_feature_cosine\n"
    (tmp_path / "a.csv").write_text(header + "0,5,4.0,0.4\n1,4,3.0,0.6\n")
    (tmp_path / "b.csv").write_text(header + "0,5,5.0,0.5\n1,4,5.5,0.7\n")
    out = plot_collapse_curves({"a": (tmp_path / "a.csv", 8.3), "b": (tmp_path / "b.csv", 5.5)}, tmp_path / "c.png")
    assert Image.open(out).size == (1210, 440)
    (tmp_path / "recognition.csv").write_text("epoch,train_loss\n0,5\n")
    with pytest.raises(ValueError, match="recognition.csv has no train_teacher_entropy column"):
        plot_collapse_curves({"r": (tmp_path / "recognition.csv", 1.0)}, tmp_path / "r.png")


def test_bad_sources_and_data_are_named(tmp_path, capsys):
    (tmp_path / "test").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["pixels", str(tmp_path / "nowhere.pth"), "--data", str(tmp_path)])
    assert exit_info.value.code == 2 and "nowhere.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["pixels", "--data", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "no test/ folder" in capsys.readouterr().err
