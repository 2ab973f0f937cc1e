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
    csv_path.write_text("epoch,train_loss\n0,1.0\n")
    with pytest.raises(ValueError, match="lacks the column.*eval_all_acc"):
        plot_training_curves(csv_path, tmp_path / "curves.png")
    csv_path.write_text("epoch,train_loss,eval_all_acc,eval_old_acc,eval_new_acc\n")
    with pytest.raises(ValueError, match="no data row"):
        plot_training_curves(csv_path, tmp_path / "curves.png")


def test_tsne_png_subsamples(tmp_path):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 5, generator=gen)
    known = torch.arange(60) < 30
    out = plot_tsne(feats, known, tmp_path / "tsne.png", max_points=40)
    with Image.open(out) as img:
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="mask of length n"):
        plot_tsne(feats, known[:10], tmp_path / "bad.png")
