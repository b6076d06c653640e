"""k-means: torch backend (single, chunked, two gloo ranks) and faiss backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import adjusted_rand_score

from protoclip_cli.core.kmeans import kmeans, resolve_backend
from protoclip_cli.errors import ProtoclipError

torch.set_num_threads(1)


def gaussian_blobs(n_per_blob: int, n_blobs: int, dim: int, seed: int, spread: float = 0.05):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_blobs, dim, generator=generator) * 3.0
    truth = torch.arange(n_blobs).repeat_interleave(n_per_blob)
    points = centres[truth] + spread * torch.randn(n_blobs * n_per_blob, dim, generator=generator)
    shuffle = torch.randperm(points.shape[0], generator=generator)
    return points[shuffle], truth[shuffle]


def squared_distances64(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), centroids.double()).pow(2)


def assert_consistent(x: torch.Tensor, result, k: int) -> None:
    """Labels are the nearest centroids and the objective is their summed squared distance (float64)."""
    assert result.centroids.shape == (k, x.shape[1]) and result.centroids.dtype == torch.float32
    assert result.labels.shape == (x.shape[0],) and result.labels.dtype == torch.int64
    distances = squared_distances64(x, result.centroids)
    chosen = distances.gather(1, result.labels.view(-1, 1)).squeeze(1)
    assert torch.allclose(chosen, distances.min(dim=1).values, rtol=1e-5, atol=1e-5)
    assert result.objective == pytest.approx(float(chosen.sum()), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_kmeanspp_recovers_separated_blobs_and_means(backend):
    x, truth = gaussian_blobs(40, 6, 8, seed=1)
    result = kmeans(x, 6, iterations=20, restarts=2, seed=0, backend=backend, init="kmeans++")
    assert adjusted_rand_score(truth.numpy(), result.labels.numpy()) == pytest.approx(1.0)
    assert_consistent(x, result, 6)
    # Converged: every centroid is the float64 mean of its members.
    for cluster in range(6):
        members = x[result.labels == cluster].double()
        assert torch.allclose(result.centroids[cluster].double(), members.mean(dim=0), atol=1e-5)


def test_kmeanspp_beats_random_starts_on_blobs():
    # Random starts put two centroids in one blob with probability 1 - 6!/6^6 each; D^2 sampling
    # almost never does, so its best objective should be the blobs' within-cluster scatter.
    x, truth = gaussian_blobs(40, 6, 8, seed=2)
    scatter = sum(
        float((x[truth == blob].double() - x[truth == blob].double().mean(0)).pow(2).sum()) for blob in range(6)
    )
    plus = kmeans(x, 6, iterations=10, restarts=1, seed=0, backend="torch", init="kmeans++")
    assert plus.objective == pytest.approx(scatter, rel=1e-5)
    randoms = [kmeans(x, 6, iterations=10, restarts=1, seed=seed, backend="torch").objective for seed in range(5)]
    assert min(randoms) >= plus.objective * (1 - 1e-6)
    assert max(randoms) > 2 * plus.objective


def test_history_never_increases_and_ends_at_objective():
    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(3))
    result = kmeans(x, 12, iterations=15, restarts=1, seed=4, backend="torch")
    history = np.array(result.history)
    assert len(history) == 15
    assert np.all(np.diff(history) <= 1e-6 * history[:-1])
    assert history[0] > history[-1]  # it did improve on the random initialisation
    assert result.objective == history[-1]
    assert_consistent(x, result, 12)


def test_restarts_keep_lowest_objective():
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(5))
    singles = [kmeans(x, 9, iterations=4, restarts=1, seed=seed, backend="torch") for seed in (10, 11, 12)]
    objectives = [single.objective for single in singles]
    assert len(set(objectives)) == 3, "the restarts should reach different optima for the test to mean anything"
    combined = kmeans(x, 9, iterations=4, restarts=3, seed=10, backend="torch")
    best = singles[int(np.argmin(objectives))]
    assert combined.objective == min(objectives)
    assert torch.equal(combined.centroids, best.centroids)
    assert torch.equal(combined.labels, best.labels)
    assert combined.history == best.history


def test_empty_cluster_is_reseeded_with_the_farthest_point():
    # 50 copies of A and one B: almost every initialisation puts both centroids on A, B then
    # joins cluster 0 (a tie) and cluster 1 ends empty. One update must move cluster 1 onto B
    # (left on A, B would stay with the mean of all points, objective 9.8^2).
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([10.0, 0.0])
    x = torch.cat([a.repeat(50, 1), b.view(1, 2)])
    mean_of_all = 10.0 / 51.0
    for seed in range(3):
        one_step = kmeans(x, 2, iterations=1, restarts=1, seed=seed, backend="torch")
        assert one_step.objective == pytest.approx(50 * mean_of_all**2, rel=1e-5)
        assert sorted(tuple(row) for row in one_step.centroids.tolist()) == [
            pytest.approx((mean_of_all, 0.0)),
            (10.0, 0.0),
        ]
        converged = kmeans(x, 2, iterations=3, restarts=1, seed=seed, backend="torch")
        assert converged.objective == 0.0
        assert converged.labels[-1] != converged.labels[0]
        assert {tuple(row) for row in converged.centroids.tolist()} == {(0.0, 0.0), (10.0, 0.0)}


def test_duplicates_with_k_close_to_n_give_no_nan():
    distinct = torch.randn(10, 4, generator=torch.Generator().manual_seed(6))
    x = distinct.repeat(3, 1)
    result = kmeans(x, 12, iterations=10, restarts=1, seed=0, backend="torch")
    assert torch.isfinite(result.centroids).all()
    assert result.objective == pytest.approx(0.0, abs=1e-6)
    assert_consistent(x, result, 12)


def test_deterministic_for_a_seed():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(7))
    first = kmeans(x, 10, iterations=5, restarts=2, seed=3, backend="torch")
    second = kmeans(x, 10, iterations=5, restarts=2, seed=3, backend="torch")
    other = kmeans(x, 10, iterations=5, restarts=2, seed=30, backend="torch")
    assert torch.equal(first.centroids, second.centroids) and torch.equal(first.labels, second.labels)
    assert first.history == second.history
    assert not torch.equal(first.centroids, other.centroids)


def test_chunked_equals_unchunked():
    x = torch.randn(257, 7, generator=torch.Generator().manual_seed(8))
    whole = kmeans(x, 11, iterations=6, restarts=2, seed=1, backend="torch", chunk_rows=10_000)
    chunked = kmeans(x, 11, iterations=6, restarts=2, seed=1, backend="torch", chunk_rows=10)
    assert torch.equal(whole.labels, chunked.labels)
    assert torch.allclose(whole.centroids, chunked.centroids, atol=1e-6)
    assert chunked.objective == pytest.approx(whole.objective, rel=1e-6)


def test_faiss_matches_torch_objective_and_is_consistent():
    x = torch.randn(1500, 16, generator=torch.Generator().manual_seed(9))
    by_faiss = kmeans(x, 20, iterations=20, restarts=2, seed=0, backend="faiss")
    by_torch = kmeans(x, 20, iterations=20, restarts=2, seed=0, backend="torch")
    assert_consistent(x, by_faiss, 20)
    assert len(by_faiss.history) == 20 and by_faiss.history[-1] == by_faiss.objective
    assert by_faiss.objective == pytest.approx(by_torch.objective, rel=0.03)


def test_faiss_uses_every_point_and_stays_quiet(capfd):
    # 1000 points for 2 centroids: faiss's defaults would subsample to 512 and warn.
    x, truth = gaussian_blobs(500, 2, 4, seed=10, spread=0.5)
    result = kmeans(x, 2, iterations=10, restarts=1, seed=0, backend="faiss")
    assert adjusted_rand_score(truth.numpy(), result.labels.numpy()) == pytest.approx(1.0)
    for cluster in range(2):
        members = x[result.labels == cluster].double()
        assert torch.allclose(result.centroids[cluster].double(), members.mean(dim=0), atol=1e-4)
    kmeans(torch.randn(30, 4), 10, iterations=3, backend="faiss")  # far below 39 points per centroid
    captured = capfd.readouterr()
    assert "WARNING" not in captured.err + captured.out


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_more_clusters_than_points_is_a_clear_error(backend):
    with pytest.raises(ProtoclipError, match=r"cannot make 11 clusters from 10 points; lower proto\.k"):
        kmeans(torch.randn(10, 3), 11, backend=backend)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ProtoclipError, match="NaN or inf"):
        kmeans(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, backend="torch")
    with pytest.raises(ProtoclipError, match="2-D"):
        kmeans(torch.randn(10), 2)
    with pytest.raises(ProtoclipError, match="Unknown k-means backend 'sklearn'"):
        kmeans(torch.randn(10, 2), 2, backend="sklearn")
    with pytest.raises(ProtoclipError, match="Unknown k-means initialisation 'forgy'"):
        kmeans(torch.randn(10, 2), 2, init="forgy")


def test_backend_resolution():
    # torch on CPU too: faiss's distances depend on its BLAS threads and kernels (machine-dependent).
    assert resolve_backend("auto", torch.device("cpu"), distributed=False) == "torch"
    assert resolve_backend("faiss", torch.device("cpu"), distributed=False) == "faiss"
    assert resolve_backend("auto", torch.device("cuda", 0), distributed=False) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), distributed=True) == "torch"
    assert resolve_backend("torch", torch.device("cpu"), distributed=False) == "torch"
    with pytest.raises(ProtoclipError, match="faiss k-means backend runs on one process"):
        resolve_backend("faiss", torch.device("cpu"), distributed=True)


# Two gloo ranks, each holding an uneven slice of the data, must reproduce one process on the union.
DISTRIBUTED_SPLIT = 70


def distributed_cases():
    blobs, _ = gaussian_blobs(30, 4, 5, seed=11)
    noise = torch.randn(120, 6, generator=torch.Generator().manual_seed(12))
    duplicates = torch.randn(12, 3, generator=torch.Generator().manual_seed(13)).repeat(10, 1)
    # (data, k, iterations, restarts, seed, init)
    return [
        (blobs, 4, 10, 2, 0, "random"),
        (noise, 9, 8, 3, 5, "random"),
        (duplicates, 20, 6, 1, 2, "random"),
        (noise, 9, 5, 2, 7, "kmeans++"),
        (duplicates, 15, 3, 1, 4, "kmeans++"),
    ]


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = []
        for data, k, iterations, restarts, seed, init in distributed_cases():
            part = data[:DISTRIBUTED_SPLIT] if rank == 0 else data[DISTRIBUTED_SPLIT:]
            result = kmeans(part, k, iterations=iterations, restarts=restarts, seed=seed, init=init)  # auto: torch
            results.append((result.centroids, result.labels, result.objective, result.history))
        try:
            kmeans(torch.randn(60, 2), 121)  # 120 points over both ranks
            error = ""
        except ProtoclipError as exc:
            error = str(exc)
        torch.save({"results": results, "error": error}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # starts processes
def test_two_ranks_match_one_process_on_the_union(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank_output in ranks:
        assert "cannot make 121 clusters from 120 points" in rank_output["error"]
    for index, (data, k, iterations, restarts, seed, init) in enumerate(distributed_cases()):
        single = kmeans(data, k, iterations=iterations, restarts=restarts, seed=seed, backend="torch", init=init)
        (centroids0, labels0, objective0, history0) = ranks[0]["results"][index]
        (centroids1, labels1, objective1, history1) = ranks[1]["results"][index]
        assert torch.equal(centroids0, centroids1), "every rank must end with the same centroids"
        assert objective0 == objective1 and history0 == history1
        assert torch.allclose(centroids0, single.centroids, atol=1e-5)
        assert torch.equal(torch.cat([labels0, labels1]), single.labels)
        assert objective0 == pytest.approx(single.objective, rel=1e-6)
        assert np.allclose(history0, single.history, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_stays_on_the_device():
    x, truth = gaussian_blobs(200, 8, 16, seed=14)
    on_cpu = kmeans(x, 8, iterations=10, restarts=2, seed=0, backend="torch", init="kmeans++")
    on_cuda = kmeans(x.cuda(), 8, iterations=10, restarts=2, seed=0, init="kmeans++")  # auto: torch on CUDA
    assert on_cuda.centroids.is_cuda and on_cuda.labels.is_cuda
    assert torch.equal(on_cuda.labels.cpu(), on_cpu.labels)
    assert torch.allclose(on_cuda.centroids.cpu(), on_cpu.centroids, atol=1e-4)
    by_faiss = kmeans(x.cuda(), 8, iterations=10, restarts=2, seed=0, backend="faiss", init="kmeans++")
    assert by_faiss.labels.is_cuda
    assert adjusted_rand_score(truth.numpy(), by_faiss.labels.cpu().numpy()) == pytest.approx(1.0)


def test_torch_backend_does_not_depend_on_the_thread_count():
    # The default CPU backend: its labels, centroids and objective must not change with the number of
    # threads (machines differ in cores), so a seeded run repeats bit for bit (test_train.py).
    gen = torch.Generator().manual_seed(21)
    centres = torch.randn(40, 64, generator=gen)
    noisy = centres[torch.randint(0, 40, (6000,), generator=gen)] + 1.5 * torch.randn(6000, 64, generator=gen)
    x = torch.nn.functional.normalize(noisy, dim=1)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(kmeans(x, 50, iterations=10, restarts=2, seed=5, backend="auto"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other.labels, results[0].labels) and torch.equal(other.centroids, results[0].centroids)
        assert other.objective == results[0].objective and other.history == results[0].history
