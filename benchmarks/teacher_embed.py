"""Captions/s of `teacher-embed` with the offline all-MiniLM-L6-v2 on the embedded data set's captions.

Two measurements on this machine's device:
- encoder: `SentenceTransformer.encode` alone on the captions held in memory, per batch size
  (after one warm-up batch), which is the model's steady-state throughput;
- stage: the whole `teacher-embed` stage (shard streaming, chunked HDF5 writes, sorting, atomic
  rename) on a freshly downloaded embedded data set, as its manifest reports it (skipped with
  ``--no-stage``).

    .venv/bin/python benchmarks/teacher_embed.py --count 2048 --batch-sizes 32,128,256

Prints a table and writes the numbers as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2048, help="train captions of the embedded data set")
    parser.add_argument("--batch-sizes", default="32,128,256", help="comma-separated batch sizes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per batch size (best is kept)")
    parser.add_argument("--no-stage", action="store_true", help="measure the encoder only (no download)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/teacher_embed.json"))
    return parser.parse_args()


def download_embedded(root: Path, count: int):
    from protoclip_cli.configs.download import DownloadConfig
    from protoclip_cli.stages.download import run
    from protoclip_cli.workspace import Workspace

    workspace = Workspace.at(root)
    run(
        DownloadConfig(
            name="synthetic", source="synthetic", synthetic_train_size=count, synthetic_heldout_size=64
        ),
        workspace,
    )
    return workspace


def encoder_rate(encoder, captions: list[str], batch_size: int, device: str, repeats: int) -> float:
    encoder.encode(captions[:batch_size], batch_size=batch_size, device=device, show_progress_bar=False)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        encoder.encode(
            captions, batch_size=batch_size, device=device, normalize_embeddings=True, show_progress_bar=False
        )
        best = min(best, time.perf_counter() - started)
    return len(captions) / best


def main() -> None:
    args = parse_args()
    import torch
    from rich.table import Table

    from protoclip_cli.console import out
    from protoclip_cli.data import synthetic
    from protoclip_cli.configs.teacher import TeacherConfig
    from protoclip_cli.stages.teacher_embed import load_encoder, offline_minilm_path, resolve_model, run

    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    # The train captions the embedded data set's download writes into its shards.
    captions = [scene.caption for scene in synthetic.scenes(args.count, split="train")]
    encoder = load_encoder(resolve_model(str(offline_minilm_path())), args.device)
    for batch_size in batch_sizes:
        rate = encoder_rate(encoder, captions, batch_size, args.device, args.repeats)
        rows.append({
            "what": "encoder", "batch_size": batch_size, "captions": len(captions),
            "captions_per_s": round(rate, 1),
        })  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="teacher-bench-") as tmp:
        workspace = None if args.no_stage else download_embedded(Path(tmp), args.count)
        for batch_size in batch_sizes if workspace is not None else []:
            manifest = run(
                TeacherConfig(dataset="synthetic", batch_size=batch_size, device=args.device, force=True), workspace
            )
            rows.append({
                "what": "stage", "batch_size": batch_size, "captions": manifest["count"],
                "captions_per_s": manifest["captions_per_s"], "seconds": manifest["seconds"],
            })  # fmt: skip

    mean_words = sum(len(c.split()) for c in captions) / len(captions)
    record = {
        "benchmark": "teacher_embed",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (offline copy)",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "mean_caption_words": round(mean_words, 2),
        "results": rows,
    }
    table = Table(title=f"teacher-embed, all-MiniLM-L6-v2 on {args.device} ({record['torch_threads']} threads)")
    for column in ("what", "batch size", "captions", "captions/s"):
        table.add_column(column, justify="right" if column != "what" else "left")
    for row in rows:
        table.add_row(row["what"], str(row["batch_size"]), str(row["captions"]), f"{row['captions_per_s']:,.0f}")
    out.print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    out.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
