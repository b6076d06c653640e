"""Prototypical Back Translation: per-cluster means in another space, single and over two gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from protoclip_cli.core.pbt import cluster_means
from protoclip_cli.errors import ProtoclipError

torch.set_num_threads(1)


def loop_means(labels: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """The definition, one cluster at a time in float64."""
    means = torch.zeros(k, features.shape[1], dtype=torch.float64)
    for cluster in range(k):
        members = features[labels == cluster].double()
        if len(members):
            means[cluster] = members.sum(dim=0) / len(members)
    return means


def random_case(seed: int = 0, n: int = 90, d: int = 5, k: int = 40):
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    # Labels drawn from only part of the range, so several clusters are surely empty.
    labels = torch.randint(0, k - 10, (n,), generator=generator)
    return labels, features, k


def test_equals_per_cluster_loop_with_empty_clusters():
    labels, features, k = random_case()
    means = cluster_means(labels, features, k)
    assert means.shape == (k, features.shape[1]) and means.dtype == torch.float32
    expected = loop_means(labels, features, k)
    assert torch.allclose(means.double(), expected, atol=1e-6)
    empty = torch.bincount(labels, minlength=k) == 0
    assert empty.sum() >= 10 and torch.all(means[empty] == 0)
    # Means of unit vectors are shorter than 1 unless a cluster has one member: not re-normalised.
    sizes = torch.bincount(labels, minlength=k)
    assert torch.all(means[sizes > 1].norm(dim=1) < 1 - 1e-4)


def test_accepts_half_precision_features():
    labels, features, k = random_case(seed=1)
    means = cluster_means(labels, features.bfloat16(), k)
    assert means.dtype == torch.float32
    assert torch.allclose(means.double(), loop_means(labels, features.bfloat16().float(), k), atol=1e-6)


def test_bad_labels_and_shapes_are_clear_errors():
    features = torch.randn(4, 3)
    with pytest.raises(ProtoclipError, match=r"2 cluster labels lie outside 0\.\.2"):
        cluster_means(torch.tensor([0, 3, -1, 1]), features, 3)
    with pytest.raises(ProtoclipError, match="one label per feature row"):
        cluster_means(torch.tensor([0, 1]), features, 3)


SPLIT = 33


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        labels, features, k = random_case(seed=2)
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        means = cluster_means(labels[part], features[part], k)
        local_only = cluster_means(labels[part], features[part], k, distributed=False)
        try:
            cluster_means(torch.tensor([k + rank]), torch.zeros(1, features.shape[1]), k)
            error = ""
        except ProtoclipError as exc:
            error = str(exc)
        torch.save({"means": means, "local": local_only, "error": error}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # starts processes
def test_two_ranks_reduce_to_the_union(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    labels, features, k = random_case(seed=2)
    expected = loop_means(labels, features, k)
    outputs = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank, output in enumerate(outputs):
        assert torch.allclose(output["means"].double(), expected, atol=1e-6)
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        assert torch.allclose(output["local"].double(), loop_means(labels[part], features[part], k), atol=1e-6)
        # A bad label on either rank makes every rank raise (none is left waiting in a collective).
        assert "2 cluster labels lie outside" in output["error"]
    assert torch.equal(outputs[0]["means"], outputs[1]["means"])
