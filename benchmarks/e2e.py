"""End to end: the real trainer, CLIP against ProtoCLIP on the same samples, wall time and its parts.

Each variant is one `protoclip train` process on a generated data set, as a user starts it; the
script reads the run's metrics.jsonl back. Every variant sees the same number of samples:

- ``clip``: the CLIP baseline recipe (no heads, no clustering, ``rrc`` augmentation), episodes
  that are epochs of the data set (``--samples`` x 2 samples in 2 epochs);
- ``open_clip_train``: OpenCLIP's own trainer with the ``clip`` recipe's settings on the same shards
  (``protoclip_cli.training.open_clip_peer``, which also works around open_clip_train 3.3's
  ``KeyError: 'fname'`` on webdataset >= 0.2.96 by reading shards without webdataset's end-of-shard
  marker); its training seconds are the time inside its ``train_one_epoch`` calls. It gives each
  loader worker whole shards and stops every worker after the same number of batches, so it trains
  the same samples only when the shards split evenly: ``--samples`` must fill a multiple of
  ``--workers`` shards of 1024, each worker's share a whole number of batches (e.g. 12288 samples for
  12 workers and batch 256);
- ``protoclip``: the reference ProtoCLIP recipe (``light`` augmentation, heads, an extraction pass
  of training views (``proto.extraction_transform = "train"``), k-means of image, text and teacher
  features with 3 restarts, PBT), ``--episodes`` episodes of ``2 x samples / episodes``, k = episode
  size / 10 (the reference's 200K / 20K), an InfoNCE warm-up episode and no LiT finish, so every
  episode but the first clusters;
- ``protoclip-single-pass``: the same with ``proto.single_pass = true``: one extraction pass, in the
  first prototype episode (``proto.single_pass_start = "extract"``), then none;
- ``protoclip-rrc`` (not run by default): ProtoCLIP with ``rrc``, to separate the augmentation's cost.

The data set is the embedded generator's scenes rendered at ``--image-size`` (256 px by default,
like img2dataset's downloads of real data) straight into webdataset shards (no img2dataset: the
GPU machines this runs on do not have it), with a bag-of-words caption embedding as the external
teacher (no model download; the trainer's cost of a teacher does not depend on where its features
come from). Both are made once per workspace and reused.

Reported per variant: wall time of the process; per-episode extract / cluster / train seconds
(``cluster`` includes single-pass's clustering of the recording); the rest (start-up, model
build, checkpoints); training-pass throughput (samples trained / training seconds) and its ratio
to this machine's train-step benchmark (``train_step.py``'s in-memory step, same arch and batch);
and the wall-time ratio of each variant to ``clip``. The JSON is rewritten after each variant, so a
benchmark stopped part way keeps the variants that finished.

    .venv/bin/python benchmarks/e2e.py --device cuda --arch RN50 --samples 12288 --workers 12
    .venv/bin/python benchmarks/e2e.py --device cpu --arch protoclip-tiny --samples 512 --image-size 64 --batch 32 \\
        --workers 1 --episodes 2 --no-step-benchmark
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEER = "open_clip_train"
VARIANTS = ("clip", PEER, "protoclip", "protoclip-single-pass", "protoclip-rrc")
DEFAULT_VARIANTS = ("clip", PEER, "protoclip", "protoclip-single-pass")
DATASET = "e2e"
SHARD_SIZE = 1024
TEACHER = "bow"


class VariantFailed(Exception):
    """A variant's training failed; the message says why (the others still run)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--arch", default="RN50", help="open_clip architecture or protoclip-tiny")
    parser.add_argument("--samples", type=int, default=12288, help="samples in the generated data set")
    parser.add_argument("--image-size", type=int, default=256, help="side of the stored images (the model crops its own size)")
    parser.add_argument("--batch", type=int, default=256, help="training batch size")
    parser.add_argument("--extract-batch", type=int, default=512, help="extraction batch size")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)), help="data-loader workers")
    parser.add_argument("--episodes", type=int, default=4, help="ProtoCLIP episodes over 2 x --samples samples")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument("--step-benchmark", action=argparse.BooleanOptionalAction, default=True,
                        help="also time train_step.py's in-memory step for the same arch and batch")
    parser.add_argument("--step-steps", type=int, default=20, help="timed steps of the step benchmark")
    parser.add_argument("--teacher-dim", type=int, default=384, help="dimensions of the bag-of-words teacher")
    parser.add_argument("--workspace", type=Path, default=ROOT / "benchmarks" / "results" / "e2e-workspace")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="processes rendering the data set")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads of each run (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="output (default benchmarks/results/e2e-<device>.json)")
    parser.add_argument("--prepare-only", action="store_true", help="make the data set and its teacher, then stop")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.samples < 2 * args.batch or args.episodes < 2:
        parser.error("--samples must hold two batches and --episodes must be at least 2")
    if PEER in args.variants.split(",") and not peer_splits_evenly(args.samples, args.workers, args.batch):
        parser.error(f"{PEER} trains the same samples only when --samples fills a multiple of --workers shards of "
                     f"{SHARD_SIZE}, each worker's share a whole number of batches (e.g. --samples 12288 for 12 workers "
                     f"and batch 256)")
    return args


def peer_splits_evenly(samples: int, workers: int, batch: int) -> bool:
    """Whether open_clip_train's loader workers (whole shards each, the same batches each) read every sample once."""
    shards, workers = -(-samples // SHARD_SIZE), max(1, workers)
    whole_shards = shards == 1 or samples % SHARD_SIZE == 0
    return whole_shards and shards % workers == 0 and (samples // workers) % batch == 0


# -- the data set ----------------------------------------------------------------------------------


def _render_shard(job: tuple[Path, int, int, int, int]) -> tuple[str, int]:
    """Write shard ``shard_id`` (samples ``start .. stop - 1``) as img2dataset lays shards out."""
    from protoclip_cli.data import synthetic

    folder, shard_id, start, stop, image_size = job
    return synthetic.write_shard(folder, shard_id, (synthetic.scene(i, 0, "train") for i in range(start, stop)), image_size)


def make_dataset(args: argparse.Namespace):
    """The generated data set and its teacher in ``args.workspace`` (reused when made with the same settings)."""
    from protoclip_cli.artifacts import write_manifest
    from protoclip_cli.workspace import Workspace

    workspace = Workspace.at(args.workspace)
    folder = workspace.dataset_dir(DATASET)
    settings = {"samples": args.samples, "image_size": args.image_size, "shard_size": SHARD_SIZE, "generator": "synthetic-v1"}
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("config") == settings:
        return workspace
    shards = workspace.split_dir(DATASET)
    shards.mkdir(parents=True, exist_ok=True)
    jobs = [(shards, i, start, min(start + SHARD_SIZE, args.samples), args.image_size)
            for i, start in enumerate(range(0, args.samples, SHARD_SIZE))]
    started = time.perf_counter()
    with get_context("spawn").Pool(max(1, min(args.processes, len(jobs)))) as pool:
        written = pool.map(_render_shard, jobs)
    write_manifest(
        folder, "download", config=settings, name=DATASET, source="synthetic-e2e", count_ok=args.samples,
        count_failed=0, splits={"train": {"shards": [n for n, _ in written], "count_ok": args.samples, "count_failed": 0}},
    )
    make_teacher(workspace, args.teacher_dim)
    print(f"rendered {args.samples} images at {args.image_size} px in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return workspace


def bag_of_words(caption: str, dim: int) -> np.ndarray:
    """The normalised sum of a fixed random unit vector per lower-cased word."""
    total = np.zeros(dim, dtype=np.float64)
    for word in caption.lower().replace(",", " ").replace(".", " ").split():
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        total += np.random.default_rng(seed).standard_normal(dim)
    return (total / max(np.linalg.norm(total), 1e-12)).astype(np.float32)


def make_teacher(workspace, dim: int) -> Path:
    import h5py

    from protoclip_cli.artifacts import atomic_path, file_sha256
    from protoclip_cli.data.shards import iter_captions

    keys, embeddings = [], []
    for key, caption in iter_captions(workspace.shards(DATASET)):
        keys.append(key)
        embeddings.append(bag_of_words(caption, dim))
    order = np.argsort(np.asarray(keys, dtype=np.int64))
    path = workspace.teacher_file(DATASET, TEACHER)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("keys", data=np.asarray(keys, dtype=np.int64)[order])
        f.create_dataset("embeddings", data=np.stack(embeddings)[order])
        f.attrs["model"] = "bag-of-words"
        f.attrs["dim"] = dim
        f.attrs["count"] = len(keys)
        f.attrs["dataset_manifest_sha256"] = file_sha256(workspace.dataset_dir(DATASET) / "manifest.json")
    return path


# -- the runs --------------------------------------------------------------------------------------


def recipe(variant: str, args: argparse.Namespace, device: str) -> dict:
    """The variant's recipe as plain data (a TrainConfig table)."""
    samples_seen = 2 * args.samples
    common = {
        "name": f"e2e-{variant}", "seed": 0, "device": device,
        "data": {"dataset": DATASET, "batch_size": args.batch, "workers": args.workers, "shuffle_buffer": 2000,
                 "extract_batch_size": args.extract_batch},
        "model": {"arch": args.arch, "compile": args.compile},
        "optim": {"lr": 5e-4, "weight_decay": 0.5, "grad_clip": 10.0},
        "logging": {"log_every_steps": 10, "checkpoint_every_steps": 0, "keep_checkpoints": 1},
    }
    if variant == "clip":
        return {**common, "data": {**common["data"], "episode_size": 0, "augmentation": "rrc"},
                "model": {**common["model"], "heads": False}, "proto": {"enabled": False},
                "schedule": {"episodes": 2, "warmup_steps": 50, "infonce_warmup_episodes": 0, "lit_start_episode": 99}}
    episode_size = samples_seen // args.episodes
    k = max(2, episode_size // 10)
    return {
        **common,
        "data": {**common["data"], "episode_size": episode_size, "augmentation": "rrc" if variant == "protoclip-rrc" else "light"},
        "proto": {"enabled": True, "k": k, "teacher_k": k, "iterations": 20, "restarts": 3, "teacher": TEACHER,
                  "extraction_transform": "train", "single_pass": variant == "protoclip-single-pass",
                  "single_pass_start": "extract"},
        "schedule": {"episodes": args.episodes, "warmup_steps": 50, "infonce_warmup_episodes": 1, "lit_start_episode": 99},
    }


def run_peer(args: argparse.Namespace, device: str, workspace) -> dict:
    """open_clip_train with the ``clip`` recipe's settings on the same shards, trained afresh."""
    from protoclip_cli import config as config_io
    from protoclip_cli.errors import ProtoclipError
    from protoclip_cli.configs.train import TrainConfig
    from protoclip_cli.training.open_clip_peer import train_peer

    data = recipe("clip", args, device)
    folder = workspace.root / "open_clip_train"
    shutil.rmtree(folder, ignore_errors=True)  # train_peer reuses a finished run: a benchmark trains again
    started = time.perf_counter()
    try:
        trained = train_peer(config_io.from_dict(TrainConfig, data), workspace.shards(DATASET), args.samples,
                             2 * args.samples, folder, device)
    except ProtoclipError as error:
        raise VariantFailed(f"{PEER} failed: {error}") from None
    wall = time.perf_counter() - started
    return {
        "variant": PEER,
        "wall_seconds": wall,
        "train_seconds": trained["train_seconds"],
        "extract_seconds": 0.0,
        "cluster_seconds": 0.0,
        "other_seconds": wall - trained["train_seconds"],
        "samples_trained": trained["samples_seen"],
        "train_samples_per_s": trained["samples_seen"] / max(trained["train_seconds"], 1e-9),
        "logged_samples_per_s_median": None,
        "episodes": [],
        "recipe": data,
        "arguments": trained["arguments"],
    }


def run_variant(variant: str, args: argparse.Namespace, device: str, workspace) -> dict:
    import tomli_w

    if variant == PEER:
        return run_peer(args, device, workspace)

    data = recipe(variant, args, device)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(tomli_w.dumps(data))
        recipe_path = f.name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, "-m", "protoclip_cli", "train", recipe_path, "--no-resume", "--workspace", str(workspace.root)]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    os.unlink(recipe_path)
    if finished.returncode != 0:
        raise VariantFailed(f"{variant} failed:\n{finished.stderr[-4000:]}")
    lines = [json.loads(l) for l in (workspace.run_dir(data["name"]) / "metrics.jsonl").read_text().splitlines()]
    episodes = [l for l in lines if l["kind"] == "episode"]
    parts = {name: sum(e["seconds"].get(name, 0.0) for e in episodes) for name in ("extract", "cluster", "cluster_next", "train")}
    cluster = parts["cluster"] + parts["cluster_next"]
    trained = sum(e["steps"] for e in episodes) * args.batch
    steady = [l["samples_per_s"] for l in lines if l["kind"] == "step"]
    return {
        "variant": variant,
        "wall_seconds": wall,
        "train_seconds": parts["train"],
        "extract_seconds": parts["extract"],
        "cluster_seconds": cluster,
        "other_seconds": wall - parts["train"] - parts["extract"] - cluster,
        "samples_trained": trained,
        "train_samples_per_s": trained / max(parts["train"], 1e-9),
        "logged_samples_per_s_median": float(np.median(steady)) if steady else None,
        "episodes": [{"episode": e["episode"], "phase": e["phase"], "seconds": e["seconds"], "broken": e.get("broken", 0)}
                     for e in episodes],
        "recipe": data,
    }


def step_benchmark(args: argparse.Namespace, device: str) -> dict[str, float]:
    """train_step.py's in-memory img/s for the same arch and batch (openclip, clip and protoclip variants)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "step.json"
        command = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", device, "--arch", args.arch,
                   "--batch", str(args.batch), "--steps", str(args.step_steps), "--warmup-steps", str(min(5, args.step_steps)),
                   "--variants", "openclip,clip,protoclip", "--k", str(max(2, (2 * args.samples // args.episodes) // 10)),
                   "--json", str(out)]
        if args.compile:
            command.append("--compile")
        if args.threads:
            command += ["--threads", str(args.threads)]
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if finished.returncode != 0:
            raise SystemExit(f"train_step.py failed:\n{finished.stderr[-4000:]}")
        record = json.loads(out.read_text())
    return {r["variant"]: r["img_per_s"] for r in record["results"]}


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"The trainer end to end: {record['config']['arch']}, {record['config']['samples_seen']} samples seen "
                        f"({record['machine']['device_name']})")
    for column in ("variant", "wall s", "vs CLIP", "train s", "extract s", "cluster s", "other s", "train samples/s", "vs step"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for r in record["results"]:
        vs_step = f"{r['ratio_to_step_benchmark']:.2f}" if r.get("ratio_to_step_benchmark") else "n/a"
        table.add_row(r["variant"], f"{r['wall_seconds']:.1f}", f"{r['wall_ratio_to_clip']:.2f}" if r.get("wall_ratio_to_clip") else "n/a",
                      f"{r['train_seconds']:.1f}", f"{r['extract_seconds']:.1f}", f"{r['cluster_seconds']:.1f}",
                      f"{r['other_seconds']:.1f}", f"{r['train_samples_per_s']:.0f}", vs_step)
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from train_step import machine_info, prepare_device

    device = prepare_device(args)
    device_name = "cuda" if device.type == "cuda" else "cpu"
    workspace = make_dataset(args)
    if args.prepare_only:
        print(f"data set: {workspace.dataset_dir(DATASET)}")
        return {}
    steps = step_benchmark(args, device_name) if args.step_benchmark else {}
    record = {
        "benchmark": "e2e",
        "machine": machine_info(device),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "samples_seen": 2 * args.samples},
        "step_benchmark": steps,
        "results": [],
    }
    del torch
    path = args.json or ROOT / "benchmarks" / "results" / f"e2e-{device_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results, failed = record["results"], []
    for variant in args.variants.split(","):
        try:
            results.append(run_variant(variant, args, device_name, workspace))
        except VariantFailed as error:
            print(error, file=sys.stderr)
            failed.append(variant)
            continue
        clip = next((r for r in results if r["variant"] == "clip"), None)
        for r in results:
            r["wall_ratio_to_clip"] = r["wall_seconds"] / clip["wall_seconds"] if clip else None
            step_rate = steps.get({"clip": "clip", PEER: "openclip"}.get(r["variant"], "protoclip"))
            r["step_benchmark_img_per_s"] = step_rate
            r["ratio_to_step_benchmark"] = r["train_samples_per_s"] / step_rate if step_rate else None
        # After each variant, whole (a stopped benchmark keeps the variants that finished).
        path.with_suffix(".tmp").write_text(json.dumps(record, indent=2))
        path.with_suffix(".tmp").replace(path)
    print_table(record)
    print(f"JSON: {path}")
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed (see above); {path} holds the other variants.")
    return record


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
