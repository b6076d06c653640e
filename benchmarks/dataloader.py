"""The training loader alone (no model): samples/s the data-loader workers deliver, per augmentation.

(``--pass extract``: the extraction pass's loader instead: one training view of each sample through
``--augmentation``, as the trainer's ``proto.extraction_transform = "train"``, or with
``--extraction-transform eval`` decoding only, the eval resize left to the device.)

The loader is the trainer's own (``protoclip_cli.data.pipeline.EpisodeStream``): one training pass
over the data set's shards (one episode of the whole data set), ``--workers`` processes decoding,
cropping to ``--image-size`` and, for ``light``, drawing each sample's photometric parameters.
Batches are taken as fast as they come after ``--warmup-batches`` (the workers' start-up), until
``--batches`` are timed; the pass restarts when the data set runs out.

Where part of the augmentation runs on the training device (``light``), the script also times it
there on real loader batches: the uint8 batch copied to ``--device``, augmented and normalised
(``data.transforms.to_model_input``), synchronised per batch: ``device_augment_ms_per_batch``.
``light-per-image`` is the whole light augmentation per image in the workers (torchvision v2 on
uint8, as the trainer did before the split), for comparison.

    .venv/bin/python benchmarks/dataloader.py --workspace protoclip-workspace --dataset synthetic \\
        --augmentation light --image-size 224 --workers 12 --batches 50 --device cuda --json light.json

Prints a table and writes JSON with a top-level ``samples_per_s``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

AUGMENTATIONS = ("none", "rrc", "light", "light-per-image")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True, help="workspace holding datasets/<name>")
    parser.add_argument("--dataset", default="synthetic", help="data set name")
    parser.add_argument("--augmentation", choices=AUGMENTATIONS, default="light")
    parser.add_argument("--pass", dest="pass_", choices=("train", "extract"), default="train",
                        help="the training pass or the extraction pass (--extraction-transform)")
    parser.add_argument("--extraction-transform", choices=("train", "eval"), default="train",
                        help="the extraction pass's images: a training view (--augmentation) or decode only (eval resize on the device)")
    parser.add_argument("--image-size", type=int, default=224, help="the model's input size (crop output)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader worker processes (0: in this process)")
    parser.add_argument("--batch", type=int, default=256, help="samples per batch")
    parser.add_argument("--batches", type=int, default=30, help="batches timed")
    parser.add_argument("--warmup-batches", type=int, default=None, help="batches before timing (default: one per worker)")
    parser.add_argument("--device", default="cpu", help="where the device part of the augmentation is timed (cpu, cuda)")
    parser.add_argument("--device-batches", type=int, default=10, help="loader batches the device augmentation is timed on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of this process (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="output (default benchmarks/results/dataloader-<augmentation>.json)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.batch < 1 or args.workers < 0:
        parser.error("--batches and --batch must be at least 1, --workers at least 0")
    return args


def make_stream(args: argparse.Namespace):
    from protoclip_cli.core.model import get_tokenizer  # noqa: F401 (the tokenizer the workers load)
    from protoclip_cli.data import pipeline
    from protoclip_cli.data.transforms import train_transform
    from protoclip_cli.data.shards import shard_sample_count
    from protoclip_cli.workspace import Workspace

    shards = Workspace.at(args.workspace).shards(args.dataset)
    counts = {p.name: shard_sample_count(p) for p in shards}
    per_image = args.augmentation == "light-per-image"
    config = pipeline.StreamConfig(
        episodes=[shards], counts=counts, batch_size=args.batch, extract_batch_size=args.batch,
        image_size=args.image_size, tokenizer_arch="protoclip-tiny",
        augmentation="light" if per_image else args.augmentation, seed=0, shuffle_buffer=1000, workers=args.workers,
        extraction_transform=args.extraction_transform,
    )
    stream = pipeline.EpisodeStream(config)
    if per_image:
        # The whole torchvision pipeline per image in the workers, nothing left for the device.
        dataset = stream.loader.dataset
        dataset._setup()
        dataset._crop = train_transform("light", args.image_size)
        dataset._device_augmentation = None
    return stream, sum(counts.values())


def time_loader(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    stream, total = make_stream(args)
    if total < args.batch:
        raise SystemExit(f"Data set '{args.dataset}' has {total} samples, fewer than one batch of {args.batch}.")
    warmup = args.warmup_batches if args.warmup_batches is not None else max(1, args.workers)
    kept: list[dict] = []
    samples = 0
    started = time.perf_counter()
    first_batch = None
    timed_from = started if warmup == 0 else None
    taken = 0
    while taken < warmup + args.batches:
        for batch in (stream.training(0) if args.pass_ == "train" else stream.extraction(0)):
            taken += 1
            if first_batch is None:
                first_batch = time.perf_counter() - started
            if taken == warmup:
                timed_from = time.perf_counter()
            elif taken > warmup:
                samples += len(batch["keys"])
            if len(kept) < args.device_batches:
                kept.append(batch)
            if taken >= warmup + args.batches:
                break
    seconds = time.perf_counter() - timed_from
    return {
        "samples_per_s": samples / seconds,
        "seconds": seconds,
        "samples": samples,
        "first_batch_seconds": first_batch,
        "data_set_samples": total,
    }, kept


def time_device_augmentation(args: argparse.Namespace, batches: list[dict]) -> dict | None:
    """The device's share of a batch: the light augmentation (training, training views) or the eval resize."""
    from protoclip_cli.data.transforms import device_augmentation, to_model_input

    augmentation = None
    views = args.pass_ == "train" or args.extraction_transform == "train"
    if views and args.augmentation != "light-per-image":
        augmentation = device_augmentation(args.augmentation, args.image_size)
    resizes = not views and bool(batches) and batches[0]["images"].shape[-1] != args.image_size
    if (augmentation is None and not resizes) or not batches:
        return None
    device = torch.device(args.device)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    staged = [(b["images"].pin_memory() if device.type == "cuda" else b["images"], b.get("augment")) for b in batches]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    size = args.image_size
    for images, params in staged[:2]:  # warm-up: kernels, allocator
        to_model_input(images, mean, std, device, augmentation, params, size=size)
    sync()
    times = []
    for images, params in staged:
        start = time.perf_counter()
        to_model_input(images, mean, std, device, augmentation, params, size=size)
        sync()
        times.append((time.perf_counter() - start) * 1000)
    # The plain path (copy + normalise) on the same batches: what the augmentation or resize adds on top.
    plain = []
    for images, _ in staged:
        start = time.perf_counter()
        to_model_input(images, mean, std, device)
        sync()
        plain.append((time.perf_counter() - start) * 1000)
    return {
        "device_augment_ms_per_batch": statistics.mean(times),
        "device_augment_ms_std": statistics.pstdev(times),
        "device_normalize_only_ms_per_batch": statistics.mean(plain),
        "device_batches": len(times),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from train_step import machine_info, prepare_device

    device = prepare_device(args)
    loader, batches = time_loader(args)
    device_part = time_device_augmentation(args, batches)
    record = {
        "benchmark": "dataloader",
        "machine": {**machine_info(device), "loader_workers": args.workers},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **loader,
        **(device_part or {}),
    }
    name = args.augmentation if args.pass_ == "train" else "extract"
    path = args.json or ROOT / "benchmarks" / "results" / f"dataloader-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))

    from rich.console import Console
    from rich.table import Table

    what = f"training pass, {args.augmentation}" if args.pass_ == "train" else "extraction pass"
    table = Table(title=f"Loader alone: {args.dataset}, {what}, {args.image_size} px, {args.workers} workers")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("samples/s (workers)", f"{record['samples_per_s']:,.0f}")
    table.add_row("first batch (s)", f"{record['first_batch_seconds']:.2f}")
    if device_part:
        share = "resize" if args.pass_ == "extract" and args.extraction_transform == "eval" else "augmentation"
        table.add_row(f"device {share} + normalise ms/batch ({device.type})", f"{record['device_augment_ms_per_batch']:.1f}")
        table.add_row(f"copy + normalise only ms/batch ({device.type})", f"{record['device_normalize_only_ms_per_batch']:.1f}")
    Console(width=120).print(table)
    print(f"JSON: {path}")
    return record


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
