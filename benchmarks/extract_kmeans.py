"""Per-episode overhead of ProtoCLIP: the extraction pass, k-means, back-translation and their total.

Measured on synthetic in-memory data, so decoding is left out (see the design notes: with enough
decoding cores the model is the bound):

- extraction: both towers and both heads in eval mode without gradients (bf16 autocast and
  channels_last for convolutional towers on CUDA), exactly the work of
  ``training.extraction.extract_features`` per batch, in samples/s;
- k-means: ``core.kmeans.kmeans`` with the torch backend, and with faiss where it is installed,
  on ``--n`` L2-normalised random ``--d``-dimensional points into ``--k`` clusters for
  ``--iterations`` iterations (one restart);
- PBT: one ``core.pbt.cluster_means`` call (the k cluster means of n points in another space);
- episode: ``training.prototypes.build_prototypes``, the whole per-episode clustering of the trainer
  (image, text and, with ``--teacher-dim``, teacher features; ``--restarts`` restarts each; all PBT
  means). The episode overhead adds the extraction time of ``--n`` samples at the measured rate.

The defaults are the reference scale for a GPU (200000 x 128 features, k = 20000, 20 iterations):

    .venv/bin/python benchmarks/extract_kmeans.py --device cuda --arch RN50
    .venv/bin/python benchmarks/extract_kmeans.py --device cpu --arch protoclip-tiny --n 2000 --k 50 --batch 64

Prints a table and writes JSON (default ``benchmarks/results/extract_kmeans-<device>.json``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

# Both scripts run from benchmarks/, which Python puts first on sys.path; they share these helpers.
from train_step import (
    MemoryMeter,
    autocast_for,
    is_convolutional,
    machine_info,
    make_inputs,
    prepare_device,
    release_memory,
    synchronize,
)

KMEANS_BACKENDS = ("torch", "faiss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--arch", default="RN50", help="open_clip architecture or protoclip-tiny")
    parser.add_argument("--batch", type=int, default=1024, help="extraction batch size")
    parser.add_argument("--extract-batches", type=int, default=20, help="timed extraction batches")
    parser.add_argument("--warmup-batches", type=int, default=3, help="untimed extraction batches first")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for extraction")
    parser.add_argument("--n", type=int, default=200_000, help="points to cluster (samples of an episode)")
    parser.add_argument("--d", type=int, default=128, help="feature dimension (the projection heads' output)")
    parser.add_argument("--k", type=int, default=20_000, help="clusters")
    parser.add_argument("--iterations", type=int, default=20, help="k-means iterations")
    parser.add_argument("--restarts", type=int, default=3, help="k-means restarts in the episode clustering")
    parser.add_argument("--teacher-dim", type=int, default=384, help="teacher feature size in the episode (0: no teacher)")
    parser.add_argument("--backends", default=",".join(KMEANS_BACKENDS), help="k-means backends to time: torch,faiss")
    parser.add_argument("--episode-backend", default="auto", choices=("auto", "torch", "faiss"), help="k-means backend of the episode clustering (the recipe's proto.backend)")
    parser.add_argument("--no-episode", action="store_true", help="skip the whole-episode clustering")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="output file (default benchmarks/results/extract_kmeans-<device>.json)")
    args = parser.parse_args(argv)
    unknown = [b for b in args.backends.split(",") if b not in KMEANS_BACKENDS]
    if unknown:
        parser.error(f"unknown k-means backend(s) {', '.join(unknown)}; choose from {', '.join(KMEANS_BACKENDS)}")
    for name in ("batch", "extract_batches", "n", "d", "k", "iterations", "restarts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.k > args.n:
        parser.error(f"--k {args.k} is larger than --n {args.n}; k-means needs at least one point per cluster")
    return args


def timed(call: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``call()`` and its wall time, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return result, time.perf_counter() - start


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# -- extraction ----------------------------------------------------------------------------------


@torch.no_grad()
def time_extraction(args: argparse.Namespace, device: torch.device) -> dict:
    """Samples/s of the extraction pass: what ``extract_features`` does per batch, on synthetic input."""
    from protoclip_cli.core.model import build_model
    from protoclip_cli.data.transforms import normalize
    from protoclip_cli.configs.train import ModelConfig

    release_memory(device)
    meter = MemoryMeter(device)
    inputs = make_inputs(args.arch, args.batch, k=1, device=device, seed=args.seed)
    model_cfg = ModelConfig(arch=args.arch, heads=True, projection_dim=args.d)
    torch.manual_seed(args.seed)
    model = build_model(model_cfg).to(device)
    channels_last = device.type == "cuda" and model_cfg.channels_last and is_convolutional(args.arch)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    run_model = torch.compile(model) if args.compile else model
    autocast = autocast_for(device)
    kept: list[torch.Tensor] = []

    def extract_batch(index: int) -> None:
        pixels, tokens, _ = inputs.batch(index)
        images = normalize(pixels, model.image_mean, model.image_std, device, channels_last=channels_last)
        with autocast():
            outputs = run_model(images, tokens.to(device, non_blocking=True))
        # The trainer keeps every batch's projections for clustering; so does this loop.
        kept.extend((outputs["image_proj"].float(), outputs["text_proj"].float()))

    for index in range(args.warmup_batches):
        extract_batch(index)
        meter.sample()
    seconds = []
    for index in range(args.extract_batches):
        _, elapsed = timed(lambda: extract_batch(index), device)
        seconds.append(elapsed)
        meter.sample()
    mean = statistics.fmean(seconds)
    return {
        "samples_per_s": args.batch / mean,
        "batch_ms_mean": 1000 * mean,
        "batch_ms_std": 1000 * statistics.pstdev(seconds),
        "samples": args.batch * args.extract_batches,
        "peak_memory_mib": meter.peak_mib(),
        "memory_kind": meter.kind,
    }


# -- clustering ----------------------------------------------------------------------------------


def random_features(n: int, d: int, device: torch.device, seed: int) -> torch.Tensor:
    """Points spread uniformly on the unit sphere (the projections are L2-normalised too)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1).to(device)


def warm_up_kmeans(backend: str, device: torch.device, d: int) -> None:
    """One small clustering first, so CUDA and BLAS start-up costs stay out of the timings."""
    from protoclip_cli.core.kmeans import kmeans

    kmeans(random_features(512, d, device, seed=1), 8, iterations=2, backend=backend)


def time_kmeans(backend: str, features: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    from protoclip_cli.core.kmeans import kmeans

    warm_up_kmeans(backend, device, features.shape[1])
    release_memory(device)
    meter = MemoryMeter(device)
    result, seconds = timed(
        lambda: kmeans(features, args.k, iterations=args.iterations, restarts=1, seed=args.seed, backend=backend),
        device,
    )
    meter.sample()
    where = device.type
    if backend == "faiss":
        import faiss

        on_gpu = device.type == "cuda" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        where = "cuda" if on_gpu else "cpu"
    return {
        "backend": backend,
        "runs_on": where,
        "seconds": seconds,
        "ms_per_iteration": 1000 * seconds / args.iterations,
        "objective": float(result.objective),
        "empty_clusters": int(args.k - torch.unique(result.labels).numel()),
        "peak_memory_mib": meter.peak_mib(),
        "memory_kind": meter.kind,
        "labels": result.labels,
    }


def time_pbt(labels: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    from protoclip_cli.core.pbt import cluster_means

    other_space = random_features(args.n, args.d, device, seed=args.seed + 2)
    cluster_means(labels[:256], other_space[:256], args.k)
    means, seconds = timed(lambda: cluster_means(labels, other_space, args.k), device)
    return {"seconds": seconds, "nonzero_means": int((means.abs().sum(dim=1) > 0).sum())}


def time_episode(args: argparse.Namespace, device: torch.device) -> dict:
    """The trainer's whole per-episode clustering (``build_prototypes``) on random features."""
    from protoclip_cli.core.kmeans import resolve_backend
    from protoclip_cli.configs.train import ProtoConfig
    from protoclip_cli.training.prototypes import build_prototypes

    features = {
        "image": random_features(args.n, args.d, device, seed=args.seed + 3),
        "text": random_features(args.n, args.d, device, seed=args.seed + 4),
    }
    if args.teacher_dim > 0:
        features["teacher"] = random_features(args.n, args.teacher_dim, device, seed=args.seed + 5)
    keys = torch.arange(args.n, dtype=torch.int64)
    backend = resolve_backend(args.episode_backend, device, distributed=False)
    proto = ProtoConfig(k=args.k, teacher_k=args.k, iterations=args.iterations, restarts=args.restarts, backend=backend)
    warm_up_kmeans(backend, device, args.d)
    prototypes, seconds = timed(
        lambda: build_prototypes(0, keys, features, proto, args.seed),
        device,
    )
    return {
        "backend": backend,
        "clusterings": len(features),
        "restarts": args.restarts,
        "pbt_means": len(prototypes.pbt),
        "seconds": seconds,
    }


# -- report --------------------------------------------------------------------------------------


def print_table(record: dict) -> None:
    from rich.table import Table

    from protoclip_cli.console import out

    config, machine = record["config"], record["machine"]
    table = Table(title=f"episode overhead, {config['arch']} on {machine['device_name']} ({config['precision']})")
    for column in ("what", "size", "time", "throughput", "peak memory MiB"):
        table.add_column(column, justify="left" if column in ("what", "size") else "right")

    def memory(row: dict) -> str:
        return "n/a" if row.get("peak_memory_mib") is None else f"{row['peak_memory_mib']:,.0f}"

    extraction = record["extraction"]
    table.add_row(
        "extraction (towers + heads, no grad)", f"batch {config['batch']} x {config['extract_batches']}",
        f"{extraction['batch_ms_mean']:,.1f} ms/batch", f"{extraction['samples_per_s']:,.0f} samples/s", memory(extraction),
    )
    size = f"{config['n']:,} x {config['d']}, k {config['k']:,}, {config['iterations']} it"
    for row in record["kmeans"]:
        table.add_row(
            f"k-means {row['backend']} ({row['runs_on']})", size, f"{row['seconds']:,.2f} s",
            f"{row['ms_per_iteration']:,.1f} ms/iteration", memory(row),
        )
    if record.get("pbt"):
        table.add_row("PBT cluster_means", f"{config['n']:,} x {config['d']}, k {config['k']:,}", f"{record['pbt']['seconds'] * 1000:,.1f} ms", "", "n/a")
    episode = record.get("episode")
    if episode:
        table.add_row(
            f"episode clustering ({episode['backend']})",
            f"{episode['clusterings']} clusterings x {episode['restarts']} restarts, {episode['pbt_means']} PBT",
            f"{episode['seconds']:,.2f} s", "", "n/a",
        )
        table.add_row(
            "episode overhead (extraction + clustering)", f"{config['n']:,} samples",
            f"{episode['overhead_seconds']:,.2f} s", "", "",
        )
    out.print(table)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = prepare_device(args)
    from protoclip_cli.artifacts import write_json
    from protoclip_cli.console import info

    info(f"timing extraction: {args.warmup_batches} warm-up + {args.extract_batches} timed batches of {args.batch}")
    extraction = time_extraction(args, device)
    features = random_features(args.n, args.d, device, seed=args.seed)
    backends = [b for b in args.backends.split(",") if b != "faiss" or faiss_available()]
    kmeans_rows = []
    for backend in backends:
        info(f"timing k-means ({backend}): {args.n} x {args.d}, k={args.k}, {args.iterations} iterations")
        kmeans_rows.append(time_kmeans(backend, features, args, device))
    pbt = None
    if kmeans_rows:
        info("timing PBT cluster_means")
        pbt = time_pbt(kmeans_rows[0]["labels"], args, device)
    for row in kmeans_rows:
        del row["labels"]
    del features
    episode = None
    if not args.no_episode:
        info(f"timing the episode clustering: {args.restarts} restarts per clustering")
        episode = time_episode(args, device)
        extraction_seconds = args.n / extraction["samples_per_s"]
        episode["extraction_seconds"] = extraction_seconds
        episode["overhead_seconds"] = extraction_seconds + episode["seconds"]
    record = {
        "benchmark": "extract_kmeans",
        "machine": machine_info(device),
        "config": {
            "arch": args.arch, "batch": args.batch, "extract_batches": args.extract_batches,
            "warmup_batches": args.warmup_batches, "compile": args.compile, "n": args.n, "d": args.d,
            "k": args.k, "iterations": args.iterations, "restarts": args.restarts, "teacher_dim": args.teacher_dim,
            "precision": "bf16" if device.type == "cuda" else "fp32", "seed": args.seed,
            "faiss_installed": faiss_available(),
        },
        "extraction": extraction,
        "kmeans": kmeans_rows,
        "pbt": pbt,
        "episode": episode,
    }
    for row in [extraction, *kmeans_rows]:
        if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
            raise SystemExit(f"a measurement came out non-finite: {row}")
    print_table(record)
    path = args.json or Path("benchmarks/results") / f"extract_kmeans-{device.type}.json"
    write_json(path, record)
    info(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
