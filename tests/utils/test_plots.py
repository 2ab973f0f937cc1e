"""Diagnostic figures: training curves from summary.csv and the t-SNE of features."""

import pytest
import torch
from PIL import Image

from utils.plots import plot_training_curves, plot_tsne


def test_training_curves_png(tmp_path):
    csv_path = tmp_path / "summary.csv"
    csv_path.write_text(
        "epoch,train_loss,eval_all_acc,eval_old_acc,eval_new_acc,lr\n"
        "0,5.1,0.21,0.30,0.12,0.1\n"
        "9,4.2,0.35,0.41,0.29,0.05\n"
        "19,3.9,0.40,0.47,,0.01\n"
    )
    out = plot_training_curves(csv_path, tmp_path / "curves.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 400


def test_training_curves_missing_column(tmp_path):
    csv_path = tmp_path / "summary.csv"
    csv_path.write_text("epoch,lr\n0,1.0\n")
    with pytest.raises(ValueError, match="lacks the column.*train_loss"):
        plot_training_curves(csv_path, tmp_path / "curves.png")
    csv_path.write_text("epoch,train_loss,eval_all_acc,eval_old_acc,eval_new_acc\n")
    with pytest.raises(ValueError, match="no data row"):
        plot_training_curves(csv_path, tmp_path / "curves.png")
    csv_path.write_text("epoch,train_loss,train_teacher_entropy\n0,1.0,high\n")
    with pytest.raises(ValueError, match="line 2: column train_teacher_entropy holds 'high'"):
        plot_training_curves(csv_path, tmp_path / "curves.png")


def _curve_width(tmp_path, name: str, text: str) -> int:
    csv_path = tmp_path / f"{name}.csv"
    csv_path.write_text(text)
    out = plot_training_curves(csv_path, tmp_path / f"{name}.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.height > 300
        return img.width


def test_training_curves_panels_follow_the_columns_with_values(tmp_path):
    """One panel per kind of curve that has values: loss, DINO teacher entropy, validation accuracy."""
    gcd = "epoch,train_loss,eval_all_acc,eval_old_acc,eval_new_acc\n0,5.1,0.21,0.30,0.12\n1,4.2,0.35,0.41,0.29\n"
    dino_validated = (
        "epoch,train_loss,eval_all_acc,eval_old_acc,eval_new_acc,lr,train_teacher_entropy\n"
        "0,9.1,,,,0.1,10.8\n1,8.0,0.20,0.25,0.15,0.1,7.5\n"
    )
    # DINO on a set without a GCD split: the eval columns exist but are empty in every row
    dino_unvalidated = (
        "epoch,train_loss,eval_all_acc,eval_old_acc,eval_new_acc,lr,train_teacher_entropy\n"
        "0,9.1,,,,0.1,10.8\n1,8.0,,,,0.1,7.5\n2,7.2,,,,0.1,6.1\n"
    )
    loss_only = "epoch,train_loss,eval_all_acc,eval_old_acc,eval_new_acc,lr\n0,5.1,,,,0.1\n1,4.2,,,,0.1\n"
    one = _curve_width(tmp_path, "loss_only", loss_only)
    two_gcd = _curve_width(tmp_path, "gcd", gcd)
    two_dino = _curve_width(tmp_path, "dino_unvalidated", dino_unvalidated)
    three = _curve_width(tmp_path, "dino_validated", dino_validated)
    assert one < two_gcd < three and one < two_dino < three
    assert abs(two_gcd - two_dino) < 0.2 * two_gcd
    # the teacher features' mean cosine adds its own panel beside the entropy
    with_cosine = dino_validated.replace(
        "train_teacher_entropy\n", "train_teacher_entropy,train_teacher_feature_cosine\n"
    )
    with_cosine = with_cosine.replace(",10.8\n", ",10.8,0.42\n").replace(",7.5\n", ",7.5,0.89\n")
    four = _curve_width(tmp_path, "dino_cosine", with_cosine)
    assert four - three > 0.6 * (three - two_gcd)


def test_tsne_png_subsamples(tmp_path):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 5, generator=gen)
    known = torch.arange(60) < 30
    out = plot_tsne(feats, known, tmp_path / "tsne.png", max_points=40)
    with Image.open(out) as img:
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="mask of length n"):
        plot_tsne(feats, known[:10], tmp_path / "bad.png")
