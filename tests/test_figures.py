"""End-of-run landmark pictures (trainer/figures.py) on a small SynthFaces set, with models built directly."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_loader.datasets import GCDDataset, Split, build_gcd_datasets
from data_loader.multicrop import MultiCropTransform
from data_loader.synthface import generate_synthfaces
from data_loader.transforms import EvalTransform
from model.dino import DINOConfig, DINOMethod
from model.landmark import LAFSViewFrontEnd, LandmarkFrontEnd
from model.recognition import FaceRecognizer, RecognitionConfig
from trainer.figures import (
    LANDMARKS_PNG,
    MOSAIC_PNG,
    eval_transform_points,
    figure_batch,
    find_landmark_front_end,
    synthface_points,
    write_run_figures,
)
from trainer.methods import MethodSetup
from utils.landmark_plots import plot_mosaic
from utils.presets import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SIZE = 64  # network input; the generated images are 80 px, so the mapping rescales as well as crops
PATCH = 8  # 64 landmarks


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """4 identities x (3 train + 4 test) SynthFaces images of 80 px."""
    root = tmp_path_factory.mktemp("figures") / "faces"
    generate_synthfaces(root, ids=4, train_per_id=3, test_per_id=4, size=80, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def datasets(faces):
    return build_gcd_datasets("identity_folders", faces, image_size=IMAGE_SIZE)


def _setup(model, datasets, *, validation: bool = True, train_set=None) -> MethodSetup:
    eval_sets = {"unlabelled": datasets.unlabelled_eval, "test": datasets.test_eval} if validation else {}
    return MethodSetup(
        model=model,
        model_config={},
        train_set=datasets.train if train_set is None else train_set,
        sampler=None,
        data_config={},
        eval_sets=eval_sets,
    )


def _recognizer(**kwargs) -> FaceRecognizer:
    torch.manual_seed(0)
    cfg = RecognitionConfig(
        arch="vit_tiny", img_size=IMAGE_SIZE, patch_size=PATCH, embedding_size=16, num_classes=4, **kwargs
    )
    return FaceRecognizer(cfg)


def _csv_points(root: Path) -> dict[tuple[str, str, str], np.ndarray]:
    with (root / "landmarks.csv").open(newline="") as f:
        return {
            (r["split"], r["identity"], r["file"]): np.array([float(r[f"{a}{i}"]) for i in range(5) for a in "xy"])
            for r in csv.DictReader(f)
        }


def _assert_png(path: Path, min_width: int) -> None:
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= min_width and img.height >= 200, (path, img.size)


def test_eval_transform_points_hand_computed():
    # S = 112: resize to 128 (x 8/7), crop from 8: x -> (x + 0.5) * 8/7 - 0.5 - 8
    mapped = eval_transform_points(np.array([[13.5, 97.0], [55.5, 55.5]]), 112, 112, 112)
    np.testing.assert_allclose(mapped, [[7.5, 102.9285714], [55.5, 55.5]], atol=1e-6)
    # 90 x 120 at S = 64: shorter side 90 -> 73, longer 120 -> int(97.33) = 97; crop left round(4.5) = 4, top 16
    np.testing.assert_allclose(eval_transform_points(np.array([40.0, 70.0]), 90, 120, 64), [28.35, 40.4875])


def test_eval_transform_points_follow_the_eval_transform():
    """A Gaussian blob drawn at a known point lands where the mapping says, through the real EvalTransform."""
    width, height, centre, sigma = 90, 120, (40.3, 70.6), 3.0
    ys, xs = np.mgrid[0:height, 0:width]
    blob = np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma**2))
    img = Image.fromarray(np.repeat((blob * 255).round().astype(np.uint8)[..., None], 3, axis=2))
    out = EvalTransform(64)(img)[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    weight = out.clamp(min=0).numpy()
    oy, ox = np.mgrid[0:64, 0:64]
    found = np.array([(weight * ox).sum(), (weight * oy).sum()]) / weight.sum()
    np.testing.assert_allclose(found, eval_transform_points(np.array(centre), width, height, 64), atol=0.1)


def test_figure_batch_spreads_over_the_test_set_with_mapped_ground_truth(faces, datasets):
    batch = figure_batch(_setup(None, datasets), IMAGE_SIZE)
    assert batch.source == "test set" and batch.images.shape == (16, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.display.min() >= 0 and batch.display.max() <= 1
    test_images = [Image.open(p).convert("RGB") for p in datasets.test_eval.source.paths]
    torch.testing.assert_close(batch.images[5], EvalTransform(IMAGE_SIZE)(test_images[5]))
    table = _csv_points(faces)
    for i in (0, 7, 15):
        split, identity, file = Path(datasets.test_eval.source.paths[i]).parts[-3:]
        expected = eval_transform_points(table[(split, identity, file)].reshape(5, 2), 80, 80, IMAGE_SIZE)
        np.testing.assert_allclose(batch.true_points[i].numpy(), expected, atol=1e-4)
    # eyes above the nose above the mouth, all inside the crop
    points = batch.true_points
    assert (points[:, :2, 1] < points[:, 2:3, 1]).all() and (points[:, 2:3, 1] < points[:, 3:, 1]).all()
    assert points.min() > 0 and points.max() < IMAGE_SIZE - 1


def test_synthface_points_are_none_outside_synthfaces(tmp_path, faces):
    folder = tmp_path / "plain" / "test" / "id_0"
    folder.mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(folder / "000.jpg")
    assert synthface_points([str(folder / "000.jpg")]) is None
    mixed = synthface_points([str(folder / "000.jpg"), str(faces / "test" / "id_0001" / "002.jpg")])
    assert np.isnan(mixed[0]).all() and np.isfinite(mixed[1]).all()


def test_recognizer_figures_are_written_and_leave_the_model_as_it_was(tmp_path, datasets):
    model = _recognizer(landmark_cnn=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    written = write_run_figures(model, _setup(model, datasets), tmp_path, torch.device("cpu"))
    assert [p.name for p in written] == [LANDMARKS_PNG, MOSAIC_PNG]
    _assert_png(tmp_path / LANDMARKS_PNG, 600)
    _assert_png(tmp_path / MOSAIC_PNG, 500)
    assert model.front_end.training and model.front_end.cnn.training  # trainable CNN: back in training mode
    for key, value in model.state_dict().items():  # eval mode: BatchNorm running statistics untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_no_front_end_writes_nothing(tmp_path, datasets):
    model = _recognizer()
    assert find_landmark_front_end(model) is None
    assert write_run_figures(model, _setup(model, datasets), tmp_path, "cpu") == []
    assert not any(tmp_path.iterdir())


def test_the_regularisation_copy_is_not_the_front_end_drawn():
    model = _recognizer(landmark_cnn=True, landmark_regularisation=True)
    assert find_landmark_front_end(model) is model.front_end


def test_lafs_without_validation_draws_the_training_images(tmp_path, datasets):
    landmarks = LandmarkFrontEnd(IMAGE_SIZE, PATCH, frozen=True)
    cfg = DINOConfig(
        arch="vit_tiny", patch_size=PATCH, img_size=IMAGE_SIZE, out_dim=32, hidden_dim=32, bottleneck_dim=16
    )
    model = DINOMethod(cfg, front_end=LAFSViewFrontEnd(landmarks, local_landmarks=36))
    train = datasets.train_eval
    train_set = GCDDataset(
        train.source, train.uq_idx, train.targets, MultiCropTransform(IMAGE_SIZE, 32, 2), Split.TRAIN
    )
    setup = _setup(model, datasets, validation=False, train_set=train_set)
    assert find_landmark_front_end(model) is landmarks
    batch = figure_batch(setup, IMAGE_SIZE)
    assert batch.source == "training set" and batch.images.shape[0] == 12  # every training image, eval transform
    assert batch.true_points is not None and torch.isfinite(batch.true_points).all()
    written = write_run_figures(model, setup, tmp_path, "cpu")
    assert {p.name for p in written} == {LANDMARKS_PNG, MOSAIC_PNG}
    _assert_png(tmp_path / LANDMARKS_PNG, 600)


def test_a_dataset_without_an_image_source_is_named(datasets):
    setup = _setup(None, datasets, validation=False, train_set=torch.utils.data.TensorDataset(torch.zeros(4, 3)))
    with pytest.raises(TypeError, match="training set \\(TensorDataset\\).*GCDDataset"):
        figure_batch(setup, IMAGE_SIZE)


def test_mosaic_figure_checks_its_landmarks(tmp_path):
    image = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match="coords must be \\(L, 2\\)"):
        plot_mosaic(image, image, tmp_path / "bad.png", patch=8, coords=torch.zeros(1, 4, 2))
    _assert_png(plot_mosaic(image, image, tmp_path / "ok.png", patch=8, coords=torch.full((4, 2), 7.5)), 300)
