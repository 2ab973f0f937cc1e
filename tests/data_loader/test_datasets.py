"""GCD datasets on small generated trees: listing order, class split, labelled subset, items and transforms."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_torchrun_worker
from PIL import Image

from data_loader import build_gcd_datasets, synthface
from data_loader.recordio import write_recordio
from data_loader.registry import DATASET_REGISTRY, BenchmarkSpec, KnownRule, Layout
from data_loader.transforms import EvalTransform, TrainTransform, TwoViewTransform
from utils.presets import IMAGENET_MEAN, IMAGENET_STD

S = 16  # image size used in these tests (resize to int(16 / 0.875) = 18, crop 16)
DIST_WORKER = Path(__file__).with_name("_datasets_dist_worker.py")


def _write_tree(root, classes, n_train, n_test, size=20):
    """root/{train,test}/<class>/img_<i>.jpg, a distinct flat colour per (class, split, image)."""
    for c, name in enumerate(classes):
        for split, count in (("train", n_train), ("test", n_test)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour = (40 * c + 20, 25 * i + 10, 100 if split == "train" else 200)
                Image.new("RGB", (size, size), colour).save(folder / f"img_{i}.jpg", quality=95)


def _register(monkeypatch, **fields):
    spec = BenchmarkSpec(**fields)
    monkeypatch.setitem(DATASET_REGISTRY, spec.name, spec)
    return spec


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """4 classes x (5 train, 2 test) images, registered as 'tiny4' (N = 4, N_old = 2)."""
    _register(monkeypatch, name="tiny4", layout=Layout.FACE_FOLDERS, num_classes=4, num_known=2)
    # names chosen so that sorted order differs from creation order
    _write_tree(tmp_path, ["d_id", "a_id", "c_id", "b_id"], n_train=5, n_test=2)
    return tmp_path


def test_split_and_labelled_subset_match_hand_computed_values(tiny):
    ds = build_gcd_datasets("TINY4", tiny, image_size=S)
    assert ds.class_names == ["a_id", "b_id", "c_id", "d_id"]
    assert (ds.num_classes, ds.num_known) == (4, 2)
    assert ds.train_labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert ds.test_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # known = classes 0, 1 -> the first 10 train images; RandomState(0).choice(10, 5, replace=False) = [2, 8, 4, 9, 1]
    assert torch.nonzero(ds.labelled_mask).flatten().tolist() == [1, 2, 4, 8, 9]
    assert ds.labelled_mask.dtype == torch.bool and len(ds.labelled_mask) == 20
    unlabelled = [0, 3, 5, 6, 7] + list(range(10, 20))
    assert ds.train.uq_idx.tolist() == [1, 2, 4, 8, 9] + unlabelled
    assert ds.train.is_labelled.tolist() == [True] * 5 + [False] * 15
    assert ds.unlabelled_eval.uq_idx.tolist() == unlabelled
    assert ds.train_eval.uq_idx.tolist() == list(range(20))
    assert ds.test_eval.uq_idx.tolist() == list(range(8))
    assert ds.train_eval.source.describe(7).endswith("b_id/img_2.jpg")


def test_items_carry_views_labels_and_uq_idx(tiny):
    ds = build_gcd_datasets("tiny4", tiny, image_size=S)
    views, label, uq, labelled = ds.train[0]
    assert isinstance(views, list) and len(views) == 2
    assert all(v.shape == (3, S, S) and v.dtype == torch.float32 for v in views)
    assert (label, uq, labelled) == (0, 1, True)
    _, label, uq, labelled = ds.train[5]
    assert (label, uq, labelled) == (0, 0, False)
    for split in (ds.train_eval, ds.unlabelled_eval, ds.test_eval):
        img, label, uq = split[len(split) - 1]
        assert img.shape == (3, S, S)
        assert label == 3 and uq == len(split.source) - 1
    batch = next(iter(torch.utils.data.DataLoader(ds.train, batch_size=4)))
    assert len(batch[0]) == 2 and batch[0][0].shape == (4, 3, S, S)
    assert batch[3].dtype == torch.bool


def test_labelled_draw_depends_on_the_seed_only(tiny):
    first = build_gcd_datasets("tiny4", tiny, image_size=S)
    again = build_gcd_datasets("tiny4", tiny, image_size=S)
    assert torch.equal(first.labelled_mask, again.labelled_mask)
    assert first.train.uq_idx.tolist() == again.train.uq_idx.tolist()
    other = build_gcd_datasets("tiny4", tiny, image_size=S, seed=1)
    expected = np.sort(np.random.RandomState(1).choice(10, 5, replace=False))
    assert torch.nonzero(other.labelled_mask).flatten().tolist() == expected.tolist()
    full = build_gcd_datasets("tiny4", tiny, image_size=S, prop_train_labels=1.0)
    assert full.labelled_mask.tolist() == [True] * 10 + [False] * 10


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_ranks_build_the_same_benchmark_and_only_rank_0_verifies(tmp_path):
    root, out = tmp_path / "faces", tmp_path / "out"
    out.mkdir()
    _write_tree(root, ["d_id", "a_id", "c_id", "b_id", "e_id"], n_train=4, n_test=2)
    bad = root / "test" / "c_id" / "img_1.jpg"
    run_torchrun_worker(DIST_WORKER, [root, out, bad], timeout=170, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # the first build: rank 0 opened every image once, rank 1 none; both built the same benchmark
    assert ranks[0]["opened"] == 5 * (4 + 2) and ranks[1]["opened"] == 0
    for key in ("labelled_mask", "train_labels", "test_labels", "train_order", "unlabelled_order"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    for key in ("train_paths", "class_names", "num_known"):
        assert ranks[0][key] == ranks[1][key], key
    # ... which is the one a single process builds
    single = build_gcd_datasets("identity_folders", root, image_size=S, num_known=2, verify_images=False)
    assert torch.equal(ranks[0]["labelled_mask"], single.labelled_mask)
    assert ranks[0]["train_order"].tolist() == single.train.uq_idx.tolist()
    assert ranks[0]["class_names"] == ["a_id", "b_id", "c_id", "d_id", "e_id"] == single.class_names
    # the second build: rank 0 re-verified only the changed folder and both ranks stop with the same error
    assert ranks[0]["opened_second"] == 2 and ranks[1]["opened_second"] == 0
    assert str(bad) in ranks[0]["error"] and ranks[0]["error"] == ranks[1]["error"]


def test_identity_folders_take_n_from_the_tree_and_num_known_from_the_caller(tmp_path):
    _write_tree(tmp_path, ["zoe", "ann", "max", "bob", "eve"], n_train=2, n_test=1)
    ds = build_gcd_datasets("identity_folders", tmp_path, image_size=S)
    assert ds.spec.name == "identity_folders"
    assert ds.class_names == ["ann", "bob", "eve", "max", "zoe"]
    assert (ds.num_classes, ds.num_known) == (5, 2)  # N // 2
    assert ds.train_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    ds = build_gcd_datasets("Identity_Folders", tmp_path, image_size=S, num_known=4)
    assert ds.num_known == 4
    # known = ann, bob, eve, max: the labelled draw runs over their 8 train images
    expected = np.sort(np.random.RandomState(0).choice(8, 4, replace=False))
    assert torch.nonzero(ds.labelled_mask).flatten().tolist() == expected.tolist()
    assert build_gcd_datasets("identity_folders", tmp_path, image_size=S, num_known=1).num_known == 1


def test_pickle_class_split_remaps_known_classes_first(tmp_path, monkeypatch):
    _register(
        monkeypatch,
        name="herb4",
        layout=Layout.GCD_FOLDER,
        num_classes=4,
        num_known=None,
        test_dirs=("val",),
        known_rule=KnownRule.PICKLE,
        split_file="splits.pkl",
    )
    _write_tree(tmp_path / "data", ["c0", "c1", "c2", "c3"], n_train=2, n_test=1)
    (tmp_path / "data" / "test").rename(tmp_path / "data" / "val")
    with open(tmp_path / "splits.pkl", "wb") as f:
        pickle.dump({"Old": [3, 1], "New": [0, 2]}, f)
    ds = build_gcd_datasets("herb4", tmp_path / "data", image_size=S, osr_split_dir=tmp_path)
    assert ds.num_known == 2
    assert ds.class_names == ["c3", "c1", "c0", "c2"]
    assert ds.train_labels.tolist() == [2, 2, 1, 1, 3, 3, 0, 0]  # listing stays in folder order
    assert ds.train.uq_idx[: int(ds.labelled_mask.sum())].tolist() == torch.nonzero(ds.labelled_mask).flatten().tolist()
    assert set(ds.train_labels[ds.labelled_mask].tolist()) <= {0, 1}


def test_class_subset_draw_and_class_list_file(tmp_path, monkeypatch):
    _register(
        monkeypatch,
        name="sub4",
        layout=Layout.GCD_FOLDER,
        num_classes=4,
        num_known=2,
        class_subset_seed=42,
        class_list_file="classes.txt",
    )
    names = [f"n{i}" for i in range(6)]
    _write_tree(tmp_path, names, n_train=1, n_test=1)
    # one image per class: labelling all known-class images gives one labelled image per known class
    ds = build_gcd_datasets("sub4", tmp_path, image_size=S, prop_train_labels=1.0)
    drawn = sorted(np.random.RandomState(42).choice(6, 4, replace=False).tolist())  # [0, 1, 2, 5]
    assert ds.class_names == [names[i] for i in drawn]
    assert ds.train_labels.tolist() == [0, 1, 2, 3]
    (tmp_path / "classes.txt").write_text("n5\nn4\nn1\nn3\n")
    ds = build_gcd_datasets("sub4", tmp_path, image_size=S, prop_train_labels=1.0)
    assert ds.class_names == ["n1", "n3", "n4", "n5"]


def test_recordio_benchmark_reads_the_rec_directly(tmp_path, monkeypatch):
    _register(
        monkeypatch,
        name="casia_tiny",
        layout=Layout.FACE_RECORDIO_OR_FOLDERS,
        num_classes=2,
        num_known=1,
        min_images=5,
        train_fraction=0.8,
    )
    labels = [0] * 6 + [1] * 3 + [2] * 5  # identity 1 has too few images
    items = [(0, [len(labels) + 1, 0.0], b"")]
    for key, label in enumerate(labels, start=1):
        img = Image.new("RGB", (20, 20), (10 * key, 50 * label, 0))
        path = tmp_path / "tmp.jpg"
        img.save(path)
        items.append((key, float(label), path.read_bytes()))
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", items)
    ds = build_gcd_datasets("casia_tiny", tmp_path, image_size=S)
    # eligible identities [0, 2]; random.Random(42).sample -> [0, 2]; identity 0 keys 1..6 -> 4 train, 2 test,
    # identity 2 keys 10..14 -> 4 train, 1 test
    assert ds.class_names == ["00000_0", "00001_2"]
    assert ds.train_labels.tolist() == [0] * 4 + [1] * 4
    assert ds.test_labels.tolist() == [0, 0, 1]
    train_keys, test_keys = ds.train_eval.source.keys, ds.test_eval.source.keys
    assert sorted(train_keys[:4] + test_keys[:2]) == [1, 2, 3, 4, 5, 6]
    assert sorted(train_keys[4:] + test_keys[2:]) == [10, 11, 12, 13, 14]
    assert train_keys == sorted(train_keys)
    img, label, uq = ds.test_eval[2]
    assert img.shape == (3, S, S) and (label, uq) == (1, 2)
    assert ds.test_eval.source.describe(2).endswith(f"train.rec key {test_keys[2]}")
    # worker processes open their own descriptor and read the same pixels
    loader = torch.utils.data.DataLoader(ds.train_eval, batch_size=4, num_workers=2)
    images = torch.cat([batch[0] for batch in loader])
    assert torch.equal(images[5], ds.train_eval[5][0])


def test_synthfaces_preset_reads_the_generated_tree(tmp_path):
    root = synthface.ensure_synthfaces(tmp_path / "tiny", "synthfaces_tiny")
    preset = synthface.SYNTH_PRESETS["synthfaces_tiny"]
    ds = build_gcd_datasets("synthfaces_tiny", root, image_size=S)
    assert ds.num_classes == preset["ids"] and ds.num_known == preset["ids"] // 2
    assert len(ds.train_eval) == preset["ids"] * preset["train_per_id"]
    assert len(ds.test_eval) == preset["ids"] * preset["test_per_id"]
    assert ds.class_names == sorted(ds.class_names)
    assert int(ds.labelled_mask.sum()) == int(0.5 * ds.num_known * preset["train_per_id"])


def test_transforms_follow_the_spec():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (112, 112, 3), dtype=np.uint8))
    eval_tf = EvalTransform(112)
    out = eval_tf(img)
    assert out.shape == (3, 112, 112)
    assert torch.equal(out, eval_tf(img))
    resize = eval_tf.transform.transforms[0]
    assert resize.size == 128 and resize.interpolation.value == "bicubic"
    flat = Image.new("RGB", (112, 112), (255, 0, 128))
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(eval_tf(flat)[:, 50, 50], expected, atol=1e-3)
    torch.manual_seed(0)
    views = TwoViewTransform(TrainTransform(112))(img)
    assert len(views) == 2 and views[0].shape == (3, 112, 112)
    assert not torch.equal(views[0], views[1])
    assert TrainTransform(112).transform.transforms[1].size == (112, 112)
