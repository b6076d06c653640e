"""k-means for the per-episode prototypes: a torch backend (CPU, CUDA, across ranks) and faiss.

Both backends minimise the sum of squared L2 distances of points to their assigned centroid and
return the same :class:`KMeansResult`. The torch backend is the one that scales with the training
job: each rank keeps its own episode features, assigns them locally and all-reduces centroid sums,
counts and the objective, so no rank ever holds the whole episode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from protoclip_cli.core import distributed as dist_utils
from protoclip_cli.errors import ProtoclipError

BACKENDS = ("auto", "torch", "faiss")
INITS = ("random", "kmeans++")

# One distance block holds chunk_rows x k float32 values; 2**26 floats (256 MiB) keeps the block
# large enough for an efficient GEMM on a GPU while bounding memory at the reference scale
# (200K x 128 features, k = 20000: 3355 rows per block instead of a 16 GB n x k matrix).
DISTANCE_BLOCK_FLOATS = 2**26


@dataclass
class KMeansResult:
    """The outcome of one clustering.

    ``centroids`` (k, d) float32 and ``labels`` (n_local,) int64 live on the input's device;
    ``objective`` is the global sum of squared distances of the points to their centroid (over
    all ranks) and ``history`` the objective after each iteration of the kept restart.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    objective: float
    history: list[float] = field(default_factory=list)


def kmeans(
    x: torch.Tensor,
    k: int,
    iterations: int = 20,
    restarts: int = 1,
    seed: int = 0,
    backend: str = "auto",
    distributed: bool | None = None,
    *,
    init: str = "random",
    chunk_rows: int | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` clusters with Lloyd's algorithm.

    ``distributed=None`` follows torch.distributed (on when it is initialised with more than one
    rank); then ``x`` is this rank's part of the data, every rank must call with the same ``k``,
    ``iterations``, ``restarts`` and ``seed``, all ranks get identical centroids and each its own
    labels. ``backend="auto"`` is torch (``"faiss"`` must be asked for).
    ``restarts`` runs use seeds ``seed, seed + 1, ...``; the lowest final objective is kept.
    ``init`` is ``"random"`` (k distinct random points, as faiss and the reference do) or
    ``"kmeans++"`` (D^2 sampling: better optima for small k, but k sequential steps, so slow for
    tens of thousands of clusters). ``chunk_rows`` overrides how many rows share one distance
    block (torch backend only).
    """
    if x.ndim != 2:
        raise ProtoclipError(f"k-means needs a 2-D (points x dims) tensor, got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ProtoclipError(f"k-means needs floating-point features, got {x.dtype}.")
    if k < 1 or iterations < 1 or restarts < 1:
        raise ProtoclipError(
            f"k-means needs k, iterations and restarts of at least 1 (got k={k}, iterations={iterations}, "
            f"restarts={restarts}); fix the [proto] section of the recipe."
        )
    if init not in INITS:
        raise ProtoclipError(f"Unknown k-means initialisation {init!r}; use one of {', '.join(INITS)}.")
    if chunk_rows is not None and chunk_rows < 1:
        raise ProtoclipError(f"chunk_rows must be at least 1, got {chunk_rows}.")
    use_distributed = dist_utils.is_distributed() if distributed is None else bool(distributed)
    use_distributed = use_distributed and dist_utils.is_distributed()
    chosen = resolve_backend(backend, x.device, use_distributed)
    with torch.no_grad():
        if chosen == "faiss":
            return _faiss_kmeans(x, k, iterations, restarts, seed, init)
        return _torch_kmeans(x, k, iterations, restarts, seed, use_distributed, init, chunk_rows)


def resolve_backend(backend: str, device: torch.device, distributed: bool) -> str:
    """The backend ``kmeans`` uses: ``auto`` is torch (on CPU, CUDA and across ranks)."""
    if backend not in BACKENDS:
        raise ProtoclipError(f"Unknown k-means backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        # torch everywhere: on CPU its results depend only on torch's kernels (the ones the training
        # step uses), while faiss's distances change with its own BLAS threads, BLAS kernel and SIMD
        # level, which differ from machine to machine (see docs/kmeans-and-pbt.md).
        return "torch"
    if backend == "faiss" and distributed:
        raise ProtoclipError(
            "The faiss k-means backend runs on one process only; set proto.backend to 'torch' or 'auto' "
            "for distributed training."
        )
    return backend


def _check_k(k: int, n_total: int) -> None:
    if k > n_total:
        raise ProtoclipError(
            f"k-means cannot make {k} clusters from {n_total} points; lower proto.k (or proto.teacher_k) "
            f"to at most {n_total} or use a larger episode."
        )


# ---------------------------------------------------------------------------------------------
# torch backend


@dataclass
class _Shard:
    """This rank's rows and where they sit in the global (rank-ordered) data."""

    x: torch.Tensor  # (n_local, d), the caller's tensor, any float dtype
    offset: int
    n_total: int
    distributed: bool
    chunk_rows: int

    def chunks(self):
        for start in range(0, self.x.shape[0], self.chunk_rows):
            stop = min(start + self.chunk_rows, self.x.shape[0])
            yield start, stop, self.x[start:stop].float()


def _torch_kmeans(
    x: torch.Tensor,
    k: int,
    iterations: int,
    restarts: int,
    seed: int,
    distributed: bool,
    init: str,
    chunk_rows: int | None,
) -> KMeansResult:
    shard = _make_shard(x, k, distributed, chunk_rows)
    best: KMeansResult | None = None
    for restart in range(restarts):
        result = _lloyd(shard, k, iterations, seed + restart, init)
        # The objective is global, so every rank keeps the same restart.
        if best is None or result.objective < best.objective:
            best = result
    return best


def _make_shard(x: torch.Tensor, k: int, distributed: bool, chunk_rows: int | None) -> _Shard:
    n_local = x.shape[0]
    non_finite = 0 if n_local == 0 else int((~torch.isfinite(x)).any(dim=1).sum())
    # One collective tells every rank all row counts (for global indices) and whether any rank
    # holds NaN/inf, so that all ranks raise together instead of leaving the others waiting.
    local = torch.tensor([n_local, non_finite], dtype=torch.int64, device=x.device)
    per_rank = (dist_utils.all_gather_cat(local.view(1, 2)) if distributed else local.view(1, 2)).cpu()
    if int(per_rank[:, 1].sum()) > 0:
        raise ProtoclipError(
            f"k-means input holds {int(per_rank[:, 1].sum())} rows with NaN or inf values; "
            "check the features (a diverged model produces them)."
        )
    counts = per_rank[:, 0].tolist()
    rank = dist_utils.rank() if distributed else 0
    n_total = int(sum(counts))
    _check_k(k, n_total)
    rows = chunk_rows or max(1, DISTANCE_BLOCK_FLOATS // k)
    return _Shard(x, int(sum(counts[:rank])), n_total, distributed, rows)


def _all_reduce(tensor: torch.Tensor, shard: _Shard) -> torch.Tensor:
    return dist_utils.all_reduce_sum(tensor) if shard.distributed else tensor


def _initial_centroids(shard: _Shard, k: int, seed: int) -> torch.Tensor:
    """k distinct random points of the global data, identical on every rank.

    The indices are drawn on a CPU generator over the global row numbering, so the choice does
    not depend on the device or on how the rows are split across ranks; each rank fills in the
    rows it owns and a sum (exact: the other ranks contribute zeros) assembles the full set.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(shard.n_total, generator=generator)[:k]
    local = chosen - shard.offset
    owned = (local >= 0) & (local < shard.x.shape[0])
    centroids = torch.zeros(k, shard.x.shape[1], dtype=torch.float32, device=shard.x.device)
    owned_rows = torch.nonzero(owned).flatten().to(shard.x.device)
    centroids[owned_rows] = shard.x[local[owned].to(shard.x.device)].float()
    return _all_reduce(centroids, shard)


def _kmeanspp_centroids(shard: _Shard, k: int, seed: int) -> torch.Tensor:
    """k-means++ seeding over all ranks: each next centroid is a point drawn with probability
    proportional to its squared distance to the nearest centroid chosen so far."""
    generator = torch.Generator().manual_seed(seed)
    points = shard.x.float()
    centroids = torch.zeros(k, points.shape[1], dtype=torch.float32, device=points.device)
    sq_norms = points.pow(2).sum(dim=1)
    uniform = torch.ones(points.shape[0], dtype=torch.float64, device=points.device)
    nearest = uniform
    for index in range(k):
        chosen = _draw_point(shard, points, nearest, generator)
        if chosen is None:
            # Every point already sits on a centroid (duplicates): any point is as good as another.
            chosen = _draw_point(shard, points, uniform, generator)
        centroids[index] = chosen
        # A matrix-vector product per step instead of an n x d difference keeps the k sequential
        # steps cheap; sampling weights tolerate the expanded form's rounding.
        distances = (sq_norms - 2.0 * (points @ chosen) + chosen.dot(chosen)).clamp_min_(0.0).double()
        nearest = distances if index == 0 else torch.minimum(nearest, distances)
    return centroids


def _draw_point(
    shard: _Shard, points: torch.Tensor, weights: torch.Tensor, generator: torch.Generator
) -> torch.Tensor | None:
    """One point drawn with probability proportional to ``weights`` over all ranks (None if all are 0).

    The draw comes from a CPU generator every rank holds in the same state; the rank whose rows
    hold the drawn position contributes the point, the others zeros, and a sum hands it to all.
    """
    local_total = weights.sum().reshape(1)
    totals = (dist_utils.all_gather_cat(local_total) if shard.distributed else local_total).cpu()
    total = float(totals.sum())
    if total <= 0:
        return None
    target = float(torch.rand(1, generator=generator, dtype=torch.float64)) * total
    rank_ends = totals.cumsum(0)
    owner = min(int((rank_ends <= target).sum()), totals.shape[0] - 1)
    chosen = torch.zeros(points.shape[1], dtype=torch.float32, device=points.device)
    if owner == (dist_utils.rank() if shard.distributed else 0):
        local_target = torch.tensor([target - float(totals[:owner].sum())], dtype=torch.float64, device=points.device)
        row = torch.searchsorted(weights.cumsum(0), local_target, right=True).clamp_max(points.shape[0] - 1)
        chosen = points[row].reshape(-1).clone()
    return _all_reduce(chosen, shard) if shard.distributed else chosen


def _assign(shard: _Shard, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance of every local row, one bounded block at a time."""
    n_local = shard.x.shape[0]
    labels = torch.empty(n_local, dtype=torch.int64, device=shard.x.device)
    distances = torch.empty(n_local, dtype=torch.float32, device=shard.x.device)
    centroid_sq = centroids.pow(2).sum(dim=1)
    centroids_t = centroids.t().contiguous()
    for start, stop, block in shard.chunks():
        # ||x||^2 is constant per row, so the argmin only needs ||c||^2 - 2 x.c.
        partial = torch.addmm(centroid_sq.unsqueeze(0), block, centroids_t, alpha=-2.0)
        index = partial.argmin(dim=1)
        labels[start:stop] = index
        # The expanded form loses digits to cancellation far from the origin; the distance to the
        # chosen centroid alone is cheap to compute exactly and feeds the objective and re-seeding.
        distances[start:stop] = (block - centroids[index]).pow(2).sum(dim=1)
    return labels, distances


def _cluster_sums(shard: _Shard, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster coordinate sums in float64 (k, d), so that partial sums of ranks add up exactly enough."""
    sums = torch.zeros(k, shard.x.shape[1], dtype=torch.float64, device=shard.x.device)
    for start, stop, block in shard.chunks():
        sums.index_add_(0, labels[start:stop], block.double())
    return sums


def _lloyd(shard: _Shard, k: int, iterations: int, seed: int, init: str) -> KMeansResult:
    d = shard.x.shape[1]
    device = shard.x.device
    if init == "kmeans++":
        centroids = _kmeanspp_centroids(shard, k, seed)
    else:
        centroids = _initial_centroids(shard, k, seed)
    labels, distances = _assign(shard, centroids)
    history: list[float] = []
    for _ in range(iterations):
        # One all-reduce per iteration carries sums, counts and the objective of this assignment.
        packed = torch.empty(k * d + k + 1, dtype=torch.float64, device=device)
        packed[: k * d] = _cluster_sums(shard, labels, k).flatten()
        packed[k * d : k * d + k] = torch.bincount(labels, minlength=k).double()
        packed[-1] = distances.double().sum()
        _all_reduce(packed, shard)
        sums = packed[: k * d].view(k, d)
        counts = packed[k * d : k * d + k]
        empty = counts == 0
        centroids = (sums / counts.clamp_min(1.0).unsqueeze(1)).float()
        n_empty = int(empty.sum())
        if n_empty:
            empty_ids = torch.nonzero(empty).flatten()
            centroids[empty_ids] = _farthest_points(shard, distances, n_empty)
        labels, distances = _assign(shard, centroids)
        history.append(_global_objective(shard, distances))
    return KMeansResult(centroids=centroids, labels=labels, objective=history[-1], history=history)


def _global_objective(shard: _Shard, distances: torch.Tensor) -> float:
    total = distances.double().sum().reshape(1)
    return float(_all_reduce(total, shard).item())


def _farthest_points(shard: _Shard, distances: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` points farthest from their centroid over all ranks, as new seeds for empty clusters.

    Ties break towards the lower global row index, so one process and several ranks holding the
    same rows pick the same points. Each rank offers its own ``count`` best candidates; the global
    best ``count`` are among them.
    """
    d = shard.x.shape[1]
    device = shard.x.device
    order = torch.sort(distances, descending=True, stable=True).indices[:count]
    # Rows: distance, global index, coordinates; padding rows (-inf) when this rank has too few points.
    candidates = torch.full((count, d + 2), float("-inf"), dtype=torch.float64, device=device)
    taken = order.shape[0]
    candidates[:taken, 0] = distances[order].double()
    candidates[:taken, 1] = (order + shard.offset).double()
    candidates[:taken, 2:] = shard.x[order].double()
    if shard.distributed:
        candidates = dist_utils.all_gather_cat(candidates)
    # Candidates arrive in rank order, each rank's list already in index order within equal
    # distances, so a stable sort on distance alone keeps ties in global index order.
    best = torch.sort(candidates[:, 0], descending=True, stable=True).indices[:count]
    return candidates[best, 2:].float()


# ---------------------------------------------------------------------------------------------
# faiss backend


def _faiss_kmeans(x: torch.Tensor, k: int, iterations: int, restarts: int, seed: int, init: str) -> KMeansResult:
    if init == "random":
        return _faiss_run(x, k, iterations, restarts, seed, None)
    # faiss seeds only at random; k-means++ starts come from the torch seeding, one run per restart.
    shard = _make_shard(x, k, distributed=False, chunk_rows=None)
    best: KMeansResult | None = None
    for restart in range(restarts):
        start = _kmeanspp_centroids(shard, k, seed + restart)
        result = _faiss_run(x, k, iterations, 1, seed + restart, start)
        if best is None or result.objective < best.objective:
            best = result
    return best


def _faiss_run(
    x: torch.Tensor, k: int, iterations: int, restarts: int, seed: int, start: torch.Tensor | None
) -> KMeansResult:
    import faiss
    import numpy as np

    n, d = x.shape
    _check_k(k, n)
    points = np.ascontiguousarray(x.detach().float().cpu().numpy())
    if not np.isfinite(points).all():
        raise ProtoclipError(
            "k-means input holds NaN or inf values; check the features (a diverged model produces them)."
        )
    use_gpu = x.device.type == "cuda" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    model = faiss.Kmeans(
        d,
        k,
        niter=iterations,
        nredo=restarts,
        seed=seed,
        gpu=use_gpu,
        verbose=False,
        # faiss would otherwise train on a random subset of 256 points per centroid without
        # saying so, and print a warning below 39 points per centroid: use every point, quietly.
        max_points_per_centroid=math.ceil(n / k) + 1,
        min_points_per_centroid=1,
    )
    model.train(points, init_centroids=None if start is None else start.cpu().numpy())
    distances, nearest = model.index.search(points, 1)
    objective = float(distances.astype(np.float64).sum())
    # faiss records the objective of each assignment before its update; drop the initial one and
    # append the final assignment so the history means the same as the torch backend's.
    history = [float(value) for value in model.obj[1:]] + [objective]
    return KMeansResult(
        centroids=torch.from_numpy(np.asarray(model.centroids, dtype=np.float32).copy()).to(x.device),
        labels=torch.from_numpy(nearest[:, 0].astype(np.int64)).to(x.device),
        objective=objective,
        history=history,
    )
