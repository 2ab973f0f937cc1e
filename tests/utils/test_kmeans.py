"""Semi-supervised and plain k-means: recovery, pinning, empty clusters, determinism, errors, distributed runs."""

import importlib.util
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils.kmeans as kmeans_module
from utils.kmeans import assign_to_centres, kmeans, semi_supervised_kmeans
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


def _reference_kmeanspp(xu: torch.Tensor, fixed: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """GCD's k-means++ D^2 seeding written out plainly: float64 direct distances, one candidate per step.

    Same generator protocol as utils/kmeans.py: a uniform first centre from ``torch.randint`` when nothing is fixed,
    then per step one ``torch.rand`` float64 draw u, and the first point whose running sum of d exceeds u * sum(d).
    """
    gen = torch.Generator().manual_seed(seed)
    x = xu.double()
    centres = [c for c in fixed.double()]
    if not centres:
        centres.append(x[int(torch.randint(x.shape[0], (1,), generator=gen))])
    d = torch.stack([((x - c) ** 2).sum(1) for c in centres]).min(0).values
    while len(centres) < k:
        threshold = float(torch.rand(1, generator=gen, dtype=torch.float64)) * float(d.sum())
        i = int(torch.searchsorted(d.cumsum(0), torch.tensor([threshold], dtype=torch.float64), right=True))
        centres.append(x[i])
        d = torch.minimum(d, ((x - x[i]) ** 2).sum(1))
        d[i] = 0.0
    return torch.stack(centres).float()


@pytest.mark.parametrize("semi_supervised", [False, True])
def test_kmeanspp_seeding_matches_plain_reference(semi_supervised):
    # spread-out continuous data: no two running sums are within float32 rounding of a drawn threshold
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 5, generator=gen) * torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5])
    fixed = torch.randn(4, 5, generator=gen) if semi_supervised else torch.zeros(0, 5)
    shard = kmeans_module._Shard(0, 1, [300], 0)
    for seed in range(4):
        ours = kmeans_module._kmeanspp(x, (x * x).sum(1), fixed, 20, torch.Generator().manual_seed(seed), shard, 2**20)
        assert torch.equal(ours, _reference_kmeanspp(x, fixed, 20, seed)), seed


def test_row_block_matvec_is_bitwise_one_product(monkeypatch):
    # the blocks run concurrently only with >= 2 threads and enough elements; force both on small inputs
    torch.set_num_threads(2)  # the autouse fixture restores the previous setting
    monkeypatch.setattr(kmeans_module, "_MATVEC_MIN_ELEMENTS", 1)
    gen = torch.Generator().manual_seed(0)
    for n, dim in [(1000, 3), (4097, 384), (130, 17), (64, 8)]:
        x, v = torch.randn(n, dim, generator=gen), torch.randn(dim, generator=gen)
        p, x_sq = x[n // 3], (x * x).sum(1)
        with kmeans_module._matvec_pool(x.device) as pool:
            matvec = kmeans_module._MatVec(x, pool)
            got = matvec(v, out=torch.empty(n))
            dist = kmeans_module._sq_dist_to_point(x_sq, p, matvec, torch.empty(n), torch.empty(n))
        starts = [a for a, _ in matvec.blocks]
        assert starts[0] == 0 and matvec.blocks[-1][1] == n and all(a % 64 == 0 for a in starts)
        assert all(b == a2 for (_, b), (a2, _) in zip(matvec.blocks, matvec.blocks[1:]))  # contiguous cover
        assert len(matvec.blocks) == (2 if n >= 128 else 1)
        assert torch.equal(got, x @ v), (n, dim)
        # the distance update is the expression that k-means++ has always used, bit for bit
        expected = (x_sq + (p * p).sum() - 2.0 * (x @ p)).clamp_min_(0.0)
        assert torch.equal(dist, expected)
        # so are the squared norms, computed in row blocks without an (n, D) temporary
        assert all(torch.equal(kmeans_module._row_sq_norms(x, rows), x_sq) for rows in (1, 63, 1000))


def test_cpu_distance_blocks_are_cache_sized_under_the_budget():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    budget = 256 * 2**20
    # K = 1000: the budget allows 256 MiB / 4000 B = 67,108 rows; on CPU a 16 MiB block: 16 MiB / 4000 B = 4,194 rows
    assert kmeans_module._rows_per_chunk(1000, budget) == 67_108
    assert kmeans_module._rows_per_chunk(1000, budget, cuda) == 67_108
    assert kmeans_module._rows_per_chunk(1000, budget, cpu) == 4_194
    # K = 20,000: 16 MiB / 80,000 B = 209 rows, below the 256-row floor
    assert kmeans_module._rows_per_chunk(20_000, budget, cpu) == 256
    # the budget stays the cap: 1 MiB / 80,000 B = 13 rows
    assert kmeans_module._rows_per_chunk(20_000, 2**20, cpu) == 13


def test_distance_blocks_and_bounds_match_brute_force():
    gen = torch.Generator().manual_seed(2)
    x, c = torch.randn(301, 6, generator=gen), torch.randn(11, 6, generator=gen)
    x_sq, c_sq = (x * x).sum(1), (c * c).sum(1)
    dist64 = torch.cdist(x.double(), c.double()) ** 2
    top2 = dist64.topk(2, dim=1, largest=False).values
    ids = torch.arange(0, 301, 3)
    for rows in (1, 7, 64, 301, 1000):
        min_dist, labels = kmeans_module._nearest(x, x_sq, c, rows)
        assert torch.equal(labels, dist64.argmin(1))
        assert torch.allclose(min_dist.double(), top2[:, 0], atol=1e-5)
        # nearest and second-nearest of a subset of rows, written in place; the other rows stay untouched
        lab, near, sec = torch.full((301,), -1), torch.full((301,), -1.0), torch.full((301,), -1.0)
        kmeans_module._search(x, x_sq, c, c_sq, rows, ids, lab, near, sec)
        assert torch.equal(lab[ids], dist64.argmin(1)[ids]) and (lab[1::3] == -1).all()
        assert torch.allclose(near[ids].double(), top2[ids, 0], atol=1e-5)
        assert torch.allclose(sec[ids].double(), top2[ids, 1], atol=1e-5) and (sec[1::3] == -1).all()
        own = kmeans_module._dist_to_own(x, x_sq, c, c_sq, labels, rows)
        assert torch.allclose(own.double(), top2[:, 0], atol=1e-5)
    # half the distance to the nearest other centre, a lower bound within the float32 error bound
    gaps = kmeans_module._half_gaps(c, c_sq, 4, kmeans_module._sq_dist_error(6))
    cc = torch.cdist(c.double(), c.double()).fill_diagonal_(float("inf")).min(1).values / 2
    assert (gaps <= cc).all() and torch.allclose(gaps, cc, rtol=1e-4)
    assert torch.isinf(kmeans_module._half_gaps(c[:1], c_sq[:1], 4, 0.0)).all()


def test_float32_distance_error_bound():
    # 2 (2 gamma_D + 4 u) with gamma_D = D u / (1 - D u), u = 2^-24: for D = 384, gamma = 2.2888e-5
    u = 2.0**-24
    assert kmeans_module._sq_dist_error(384) == pytest.approx(2 * (2 * 384 * u / (1 - 384 * u) + 4 * u))
    assert kmeans_module._sq_dist_error(384) == pytest.approx(9.2029e-5, rel=1e-4)
    # and it holds: float32 expanded-form distances of large-norm points stay within it
    gen = torch.Generator().manual_seed(3)
    x, c = 30.0 * torch.randn(2000, 384, generator=gen), 30.0 * torch.randn(50, 384, generator=gen)
    x_sq, c_sq = (x * x).sum(1), (c * c).sum(1)
    ours = torch.addmm(c_sq, x, c.t(), alpha=-2.0) + x_sq[:, None]
    exact = torch.cdist(x.double(), c.double()) ** 2
    assert ((ours.double() - exact).abs() <= kmeans_module._sq_dist_error(384) * (x_sq[:, None] + c_sq)).all()


def test_pruned_lloyd_matches_plain_lloyd(caplog):
    # Hamerly's bounds only skip searches whose outcome is certain: same partition and centres as brute force
    gen = torch.Generator().manual_seed(6)
    y = torch.randint(25, (3000,), generator=gen)
    x = torch.randn(25, 16, generator=gen)[y] + 0.5 * torch.randn(3000, 16, generator=gen)
    start = x[:25].clone()
    with caplog.at_level(logging.DEBUG, logger="utils.kmeans"):
        res = kmeans(x, 25, init_centres=start, max_iter=15, tol=0.0, progress=False)
    centres = start.double()
    xd = x.double()
    inertias = []
    for _ in range(15):
        dist = torch.cdist(xd, centres) ** 2
        labels = dist.argmin(1)
        inertias.append(float(dist.min(1).values.sum()))
        centres = torch.stack([xd[labels == j].mean(0) for j in range(25)])
    assert torch.equal(res.labels, labels)
    assert torch.allclose(res.centres.double(), centres, atol=1e-5)
    assert res.inertia == pytest.approx(min(inertias), rel=1e-6)
    searched = [float(v) for v in re.findall(r"([0-9.]+)% of the points searched", caplog.text)]
    assert len(searched) == 15 and searched[0] == 100.0 and searched[-1] < 10.0  # later iterations skip most


def test_kmeans_parallel_weights_count_the_nearest_points(monkeypatch):
    # the candidate weights tracked over the rounds equal a brute-force nearest-candidate count over all points
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(500, 4, generator=gen)
    fixed = torch.randn(3, 4, generator=gen)
    seen = {}
    real = kmeans_module._weighted_kmeanspp

    def spy(cand, weights, *args):
        seen.update(cand=cand, weights=weights)
        return real(cand, weights, *args)

    monkeypatch.setattr(kmeans_module, "_weighted_kmeanspp", spy)
    shard = kmeans_module._Shard(0, 1, [500], 0)
    for fx in (torch.zeros(0, 4), fixed):
        centres = kmeans_module._kmeans_parallel(
            x, (x * x).sum(1), fx, 8, torch.Generator().manual_seed(1), shard, 2**20
        )
        assert centres.shape == (8, 4)
        everything = torch.cat([fx, seen["cand"]]).double()
        nearest = torch.cdist(x.double(), everything).argmin(1)
        expected = torch.bincount(nearest, minlength=everything.shape[0])[fx.shape[0] :].double()
        assert seen["cand"].shape[0] > 8 and torch.equal(seen["weights"], expected)
        assert seen["weights"].sum() <= 500


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
    assert set(first.seconds) == {"init", "lloyd"}
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
        (dict(nan=True, chunk=4 * 8 * 3), r"NaN or infinite values in 1 row"),
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
            chunk_bytes=kwargs.get("chunk", kmeans_module.DEFAULT_CHUNK_BYTES),
            progress=False,
        )


def test_not_enough_unlabelled_points():
    x = torch.randn(6, 2)
    lab = torch.tensor([True, True, True, True, False, False])
    with pytest.raises(ValueError, match="at least 3 unlabelled points"):
        semi_supervised_kmeans(x, 4, torch.tensor([0, 0, 0, 0, 1, 1]), lab, progress=False)


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
