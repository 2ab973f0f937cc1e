"""Semi-supervised and plain k-means: recovery, pinning, empty clusters, determinism, errors, distributed runs."""

import importlib.util
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils.kmeans as kmeans_module
from utils.kmeans import assign_to_centres, contiguous_shard, kmeans, semi_supervised_kmeans
from utils.evaluation.clustering import cluster_acc

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_kmeans_dist_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("_kmeans_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


@pytest.fixture(scope="module")
def blobs():
    return worker.make_blobs()


def test_recovers_separated_clusters(blobs):
    x, y, lab = blobs["x"], blobs["labels"], blobs["labelled"]
    res = semi_supervised_kmeans(x, 12, y, lab, n_init=2, progress=False)
    assert cluster_acc(y[~lab], res.labels[~lab]) == 1.0
    assert torch.equal(res.labelled_classes, torch.arange(6))
    # known unlabelled points land in their class's cluster (cluster j = labelled class j)
    known_u = blobs["known"] & ~lab
    assert torch.equal(res.labels[known_u], y[known_u])
    plain = kmeans(x, 12, n_init=2, progress=False)
    assert cluster_acc(y, plain.labels) == 1.0
    assert plain.labelled_classes.numel() == 0


def test_labelled_points_stay_pinned_and_centres_are_means():
    # overlapping classes: without pinning many labelled points would join another cluster
    gen = torch.Generator().manual_seed(3)
    y = torch.arange(6).repeat_interleave(50)
    x = torch.randn(6, 4, generator=gen)[y] + 1.5 * torch.randn(300, 4, generator=gen)
    lab = (y < 3) & (torch.rand(300, generator=gen) < 0.6)
    res = semi_supervised_kmeans(x, 6, y, lab, n_init=2, max_iter=100, tol=0.0, progress=False)
    assert torch.equal(res.labels[lab], y[lab])  # labelled classes 0, 1, 2 are clusters 0, 1, 2
    assert not torch.equal(assign_to_centres(x[lab], res.centres), y[lab])  # nearest centre alone would move some
    for j in range(6):
        members = x[res.labels == j]
        assert torch.allclose(res.centres[j], members.mean(0), atol=1e-5)


def test_sampling_uniforms_do_not_depend_on_sharding(monkeypatch):
    monkeypatch.setattr(kmeans_module, "_UNIFORM_BLOCK", 7)  # shards straddle several generator blocks
    counts = [10, 13, 0, 17]
    shards = [kmeans_module._Shard(r, 4, counts, sum(counts[:r])) for r in range(4)]
    parts = [kmeans_module._global_uniforms(3, s, counts[s.rank], torch.device("cpu")) for s in shards]
    whole = kmeans_module._global_uniforms(3, kmeans_module._Shard(0, 1, [40], 0), 40, torch.device("cpu"))
    assert [p.numel() for p in parts] == counts and torch.equal(torch.cat(parts), whole)


def test_kmeans_parallel_recovers_ten_blobs():
    # blob spread << separation, so that D^2 sampling almost never puts two centres in one blob
    gen = torch.Generator().manual_seed(11)
    y = torch.arange(10).repeat_interleave(60)
    x = 10.0 * torch.randn(10, 16, generator=gen)[y] + 0.1 * torch.randn(600, 16, generator=gen)
    for seed in range(3):
        res = kmeans(x, 10, n_init=1, seed=seed, init="k-means||", progress=False)
        assert cluster_acc(y, res.labels) == 1.0


def test_kmeans_parallel_keeps_labelled_centres_first(blobs):
    x, y, lab = blobs["x"], blobs["labels"], blobs["labelled"]
    res = semi_supervised_kmeans(x, 12, y, lab, n_init=2, init="k-means||", progress=False)
    assert torch.equal(res.labels[lab], y[lab])
    assert cluster_acc(y[~lab], res.labels[~lab]) == 1.0
    known_u = blobs["known"] & ~lab
    assert torch.equal(res.labels[known_u], y[known_u])
    # the seeding itself (results hold post-Lloyd centres): the class means stay the first M centres, unchanged
    means = torch.stack([x[lab & (y == c)].mean(0) for c in range(6)])
    gen = torch.Generator().manual_seed(0)
    xu = x[~lab].contiguous()
    shard = kmeans_module._Shard(0, 1, [xu.shape[0]], 0)
    centres = kmeans_module._kmeans_parallel(xu, (xu * xu).sum(1), means, 12, gen, shard, 2**20)
    assert centres.shape == (12, 8) and torch.equal(centres[:6], means)
    assert all(bool((xu == c).all(1).any()) for c in centres[6:])  # the other centres are unlabelled points


def test_kmeans_parallel_same_seed_same_result_and_falls_back(caplog):
    x = torch.rand(400, 3, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 10, n_init=2, seed=7, init="k-means||", progress=False)
    b = kmeans(x, 10, n_init=2, seed=7, init="k-means||", progress=False)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centres, b.centres)
    assert a.restart_inertia == b.restart_inertia
    assert kmeans(x, 10, n_init=2, seed=8, init="k-means||", progress=False).restart_inertia != a.restart_inertia
    # three distinct locations and K = 5: too few distinct candidates, k-means++ places the rest
    with caplog.at_level(logging.INFO, logger="utils.kmeans"):
        res = kmeans(worker.make_duplicates(), 5, n_init=2, seed=1, init="k-means||", progress=False)
    assert "k-means++ places the other 2" in caplog.text
    assert (torch.bincount(res.labels, minlength=5) > 0).all()
    assert res.inertia == pytest.approx(0.0, abs=1e-6)


def test_unknown_init_is_rejected(blobs):
    with pytest.raises(ValueError, match=r"init must be one of k-means\+\+, k-means\|\|; got 'random'"):
        kmeans(blobs["x"], 4, init="random", progress=False)


def test_inertia_is_sum_of_squared_distances_at_convergence(blobs):
    x, y, lab = blobs["x"], blobs["labels"], blobs["labelled"]
    res = semi_supervised_kmeans(x, 12, y, lab, n_init=1, progress=False)
    direct = ((x - res.centres[res.labels]) ** 2).sum().item()
    assert res.inertia == pytest.approx(direct, rel=1e-5)
    assert 1 < res.n_iter < 300


def test_matches_sklearn_inertia_on_separated_data(blobs):
    from sklearn.cluster import KMeans

    x = blobs["x"]
    ours = kmeans(x, 12, n_init=3, progress=False)
    ref = KMeans(12, n_init=3, random_state=0).fit(x.double().numpy())
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-4)  # float32 expanded-form distances


def test_empty_clusters_are_reseeded():
    # three distinct locations and K = 5: k-means++ must place duplicate centres, which leaves clusters empty
    points = worker.make_duplicates()
    res = kmeans(points, 5, n_init=2, seed=1, progress=False)
    assert torch.isfinite(res.centres).all()
    assert (torch.bincount(res.labels, minlength=5) > 0).all()
    assert res.inertia == pytest.approx(0.0, abs=1e-6)
    # semi-supervised: labelled clusters are never empty, the free ones are reseeded from unlabelled points
    y = torch.zeros(points.shape[0], dtype=torch.long)
    lab = torch.zeros(points.shape[0], dtype=torch.bool)
    lab[(points == torch.tensor([0.0, 0.0])).all(1).nonzero()[:3, 0]] = True
    ss = semi_supervised_kmeans(points, 5, y, lab, n_init=2, progress=False)
    assert torch.isfinite(ss.centres).all()
    assert (torch.bincount(ss.labels, minlength=5) > 0).all()
    assert (ss.labels[lab] == 0).all()


def test_kmeanspp_samples_proportionally_to_squared_distance():
    # 99 unlabelled points at the labelled class mean, one far away: D^2 sampling (unlike a uniform pick) gives the
    # second centre to the far point for every seed, so it forms a cluster of its own
    x = torch.cat([torch.zeros(120, 3), torch.tensor([[10.0, 0.0, 0.0]])])
    x[:99] += 1e-3 * torch.randn(99, 3, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(121, dtype=torch.long)
    lab = torch.zeros(121, dtype=torch.bool)
    lab[99:120] = True
    for seed in range(8):
        res = semi_supervised_kmeans(x, 2, y, lab, n_init=1, max_iter=1, seed=seed, progress=False)
        assert res.labels[120] == 1 and (res.labels[:120] == 0).all()
        assert torch.allclose(res.centres[1], x[120])


def test_same_seed_same_result_and_seeds_differ():
    x = torch.rand(400, 3, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 10, n_init=2, seed=7, progress=False)
    b = kmeans(x, 10, n_init=2, seed=7, progress=False)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centres, b.centres)
    assert a.restart_inertia == b.restart_inertia and a.n_iter == b.n_iter
    c = kmeans(x, 10, n_init=2, seed=8, progress=False)
    assert c.restart_inertia != a.restart_inertia
    # restart r uses seed + r: restart 1 of seed 7 is restart 0 of seed 8
    assert c.restart_inertia[0] == a.restart_inertia[1]


def test_chunking_does_not_change_the_result(blobs):
    x, y, lab = blobs["x"], blobs["labels"], blobs["labelled"]
    big = semi_supervised_kmeans(x, 12, y, lab, n_init=2, progress=False)
    small = semi_supervised_kmeans(x, 12, y, lab, n_init=2, chunk_bytes=4 * 12 * 7, progress=False)
    assert torch.equal(big.labels, small.labels)
    assert torch.allclose(big.centres, small.centres, atol=1e-6)


def test_init_centres_and_iteration_cap(blobs):
    x = blobs["x"]
    first = kmeans(x, 12, n_init=1, max_iter=1, progress=False)
    assert first.n_iter == 1
    resumed = kmeans(x, 12, init_centres=first.centres, progress=False)
    assert resumed.restart_inertia == [resumed.inertia]  # one run, no restarts
    assert resumed.inertia <= first.inertia + 1e-6


def test_assign_to_centres_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(257, 9, generator=gen), torch.randn(13, 9, generator=gen)
    expected = torch.cdist(x.double(), c.double()).argmin(1)
    assert torch.equal(assign_to_centres(x, c, chunk_bytes=4 * 13 * 10), expected)


def test_precision_settings_are_restored(blobs):
    prev = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        kmeans(blobs["x"], 4, n_init=1, max_iter=2, progress=False)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=3), r"K=3 is smaller than the number of labelled classes M=6"),
        (dict(k=1000), r"K=1000 exceeds the number of points"),
        (dict(nan=True), r"NaN or infinite values in 1 row"),
        (dict(init=torch.zeros(5, 8)), r"init_centres must be finite with shape \(12, 8\)"),
        (dict(k=12, n_init=0), r"n_init >= 1"),
    ],
)
def test_bad_inputs(blobs, kwargs, match):
    x = blobs["x"].clone()
    if kwargs.get("nan"):
        x[5, 2] = float("nan")
    with pytest.raises(ValueError, match=match):
        semi_supervised_kmeans(
            x,
            kwargs.get("k", 12),
            blobs["labels"],
            blobs["labelled"],
            n_init=kwargs.get("n_init", 1),
            init_centres=kwargs.get("init"),
            progress=False,
        )


def test_not_enough_unlabelled_points():
    x = torch.randn(6, 2)
    lab = torch.tensor([True, True, True, True, False, False])
    with pytest.raises(ValueError, match="at least 3 unlabelled points"):
        semi_supervised_kmeans(x, 4, torch.tensor([0, 0, 0, 0, 1, 1]), lab, progress=False)


def test_contiguous_shards_cover_all_rows():
    parts = [contiguous_shard(10, r, 3) for r in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 10)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("init", ["k-means++", "k-means||"])
def test_two_processes_match_single_process(tmp_path, init):
    out = tmp_path / "dist.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(WORKER),
        str(out),
        init,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    assert saved["init"] == init
    single = worker.run_cases(saved["data"], saved["duplicates"], init)
    for name, dist in saved["cases"].items():
        ref = single[name]
        assert torch.equal(dist["labels"], ref["labels"]), name
        assert torch.allclose(dist["centres"], ref["centres"], atol=1e-5), name
        # float32 ||x||^2 + ||c||^2 - 2 x.c with ||x||^2 ~ 800 here: inertia agrees to float32 rounding
        assert dist["inertia"] == pytest.approx(ref["inertia"], rel=1e-4, abs=1e-6), name
        assert (dist["n_iter"], dist["best_restart"]) == (ref["n_iter"], ref["best_restart"]), name
