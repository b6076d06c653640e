"""The tables of the GPU run (benchmarks/gpu.sh): the performance aims against what was measured.

A source is either the work folder of one ``gpu.sh`` command (the benchmarks' JSON files and
``steps.tsv``) or a summary this script wrote (``step.json``, ``trainer.json``). It prints, as
markdown, the aims with their measured ratios (``n/a`` where a figure is missing: an aim can need
both commands), the trainer end to end with each prototype episode's split, the other figures,
and each step's status; ``--write FILE`` also writes the summary as JSON with every benchmark's
record in it.

    python benchmarks/gpu_summary.py /tmp/protoclip-gpu-step.X --command step --write OUT/step.json
    python benchmarks/gpu_summary.py OUT/step.json OUT/trainer.json    # both commands: every aim
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Names of the records (the JSON files a command writes into its work folder, without ".json").
E2E, OVERHEAD = "e2e", "extract_kmeans"
LOADERS = ("dataloader-rrc", "dataloader-light", "dataloader-extract")
PEER = "open_clip_train"
TRAINERS = ("clip", PEER, "protoclip", "protoclip-single-pass")
STEP_VARIANT = {"clip": "clip", PEER: "openclip"}  # train_step.py's variant for each trainer (else protoclip)


def load(source: Path) -> dict:
    """``{"records": {name: record}, "steps": [{"step", "status", "seconds"}], "commands": {...}}`` of a source."""
    if source.is_file():
        summary = json.loads(source.read_text())
        return {"records": summary["records"], "steps": summary["steps"], "commands": summary["commands"]}
    records = {}
    for path in sorted(source.glob("*.json")):
        try:
            records[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError:
            print(f"{path.name} is not whole (its step was stopped while writing it): left out")
    steps_file = source / "steps.tsv"
    rows = [line.split("\t") for line in steps_file.read_text().splitlines()] if steps_file.is_file() else []
    steps = [{"step": name, "status": status, "seconds": int(seconds)} for name, status, seconds in rows]
    return {"records": records, "steps": steps, "commands": {}}


def _variant(records: dict, name: str) -> dict | None:
    found = [r for r in records.get(E2E, {}).get("results", []) if r["variant"] == name]
    return found[0] if found else None


def _get(record: dict | None, key: str):
    return record.get(key) if record else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def extraction_rate(variant: dict | None) -> float | None:
    """Samples per second of the trainer's extraction passes (every extracting episode reads one episode)."""
    if not variant or not variant["extract_seconds"]:
        return None
    extracted = sum(1 for e in variant["episodes"] if e["seconds"].get("extract", 0) > 0)
    return extracted * variant["recipe"]["data"]["episode_size"] / variant["extract_seconds"]


def aims(records: dict) -> list[tuple[str, str, float | None, str]]:
    """(what, aim, measured, how) for every aim of the performance work."""
    clip, peer, faithful, single = (_variant(records, name) for name in TRAINERS)
    overhead = records.get(OVERHEAD)
    rrc, light = records.get("dataloader-rrc"), records.get("dataloader-light")
    found = [
        ("ProtoCLIP / CLIP wall time, faithful", "<= 1.30", _get(faithful, "wall_ratio_to_clip"), "e2e"),
        ("ProtoCLIP / CLIP wall time, single-pass", "<= 1.05", _get(single, "wall_ratio_to_clip"),
         "e2e; one extraction pass, in the first prototype episode (proto.single_pass_start = extract)"),
        ("this project's CLIP / open_clip_train wall time", "<= 1.00", _ratio(_get(clip, "wall_seconds"), _get(peer, "wall_seconds")),
         "e2e; open_clip_train: protoclip_cli.training.open_clip_peer"),
    ]
    for name, variant in zip(TRAINERS, (clip, peer, faithful, single)):
        found.append((f"training-pass samples/s / step benchmark, {name}", ">= 0.95", _get(variant, "ratio_to_step_benchmark"),
                      f"e2e; against train_step {STEP_VARIANT.get(name, 'protoclip')}, same arch and batch"))
    found.append(("training loader alone, light / rrc (workers)", ">= 0.80",
                  _ratio(_get(light, "samples_per_s"), _get(rrc, "samples_per_s")), "dataloader-light, dataloader-rrc"))
    in_trainer = extraction_rate(faithful)
    in_memory = overhead["extraction"]["samples_per_s"] if overhead else None
    found.append(("extraction pass in the trainer / in-memory benchmark", ">= 0.90", _ratio(in_trainer, in_memory),
                  "e2e (faithful; training views: light's device half included), extract_kmeans (no augmentation)"))
    share = None
    train_rate = _get(faithful, "train_samples_per_s")
    if overhead and overhead.get("episode") and in_trainer and train_rate:
        n = overhead["config"]["n"]
        share = (n / in_trainer + overhead["episode"]["seconds"]) / (n / train_rate)
    found.append(("episode overhead at reference scale / training pass, faithful", "<= 0.30", share,
                  "extraction at the trainer's rate + clustering (extract_kmeans) over n samples trained"))
    for label in ("eager", "compiled"):
        record = records.get(f"train_step-{label}")
        for name in ("clip", "protoclip"):
            ratio = next((r["ratio_to_openclip"] for r in (record or {}).get("results", []) if r["variant"] == name), None)
            found.append((f"train step vs OpenCLIP ({label}), {name}", "~1.0", ratio, f"train_step-{label}"))
    return found


def figures(records: dict) -> list[tuple[str, str]]:
    """The measured figures behind the ratios, one line each."""
    found = []
    for label in ("eager", "compiled"):
        record = records.get(f"train_step-{label}")
        if record:
            rates = " / ".join(f"{r['variant']} {r['img_per_s']:.0f}" for r in record["results"])
            found.append((f"train step {label}, {record['config']['arch']} batch {record['config']['batch']}, img/s", rates))
    if E2E in records:
        found.append(("e2e's step benchmark, img/s", " / ".join(f"{k} {v:.0f}" for k, v in records[E2E]["step_benchmark"].items())))
    overhead = records.get(OVERHEAD)
    if overhead:
        found.append(("extraction in memory, samples/s", f"{overhead['extraction']['samples_per_s']:.0f}"))
        for row in overhead["kmeans"]:
            found.append((f"k-means {row['backend']} {overhead['config']['n']} x {overhead['config']['d']}, k = "
                          f"{overhead['config']['k']}, s", f"{row['seconds']:.2f}"))
        if overhead.get("episode"):
            found.append(("one episode's clustering (image, text, teacher, PBT), s", f"{overhead['episode']['seconds']:.2f}"))
    for name in LOADERS:
        record = records.get(name)
        if record:
            device = record.get("device_augment_ms_per_batch")
            found.append((f"{name}, samples/s (workers)" + ("; device ms/batch" if device else ""),
                          f"{record['samples_per_s']:.0f}" + (f"; {device:.1f}" if device else "")))
    return found


def _cell(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(merged: dict) -> str:
    records = merged["records"]
    lines = ["| what | aim | measured | from |", "|---|---|---|---|"]
    lines += [f"| {what} | {aim} | {_cell(value)} | {source} |" for what, aim, value, source in aims(records)]
    results = records.get(E2E, {}).get("results", [])
    if results:
        lines += ["", "| trainer | wall s | vs CLIP | train s | extract s | cluster s | other s | train samples/s | vs step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            lines.append(f"| {r['variant']} | {r['wall_seconds']:.1f} | {_cell(r['wall_ratio_to_clip'])} | {r['train_seconds']:.1f} "
                         f"| {r['extract_seconds']:.1f} | {r['cluster_seconds']:.1f} | {r['other_seconds']:.1f} "
                         f"| {r['train_samples_per_s']:.0f} | {_cell(r['ratio_to_step_benchmark'])} |")
        lines += ["", "| trainer | episode | phase | extract s | cluster s | train s |", "|---|---|---|---|---|---|"]
        for r in results:
            for e in r["episodes"] if r["variant"] != "clip" else []:
                s = e["seconds"]
                cluster = s.get("cluster", 0) + s.get("cluster_next", 0)
                lines.append(f"| {r['variant']} | {e['episode']} | {e['phase']} | {s.get('extract', 0):.1f} | {cluster:.1f} "
                             f"| {s.get('train', 0):.1f} |")
    found = figures(records)
    if found:
        lines += ["", "| figure | measured |", "|---|---|"] + [f"| {what} | {value} |" for what, value in found]
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in merged["steps"]]
    lines += ["", "commands: " + (", ".join(f"{name} {seconds} s" for name, seconds in merged["commands"].items()) or "n/a")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", type=Path, nargs="+", help="work folders of gpu.sh commands or summaries written by --write")
    parser.add_argument("--command", default=None, help="the gpu.sh command a work folder belongs to (step, trainer)")
    parser.add_argument("--seconds", type=int, default=None, help="the command's own time in seconds")
    parser.add_argument("--write", type=Path, default=None, help="write the summary as JSON (records, steps, aims, table)")
    args = parser.parse_args(argv)
    missing = [str(s) for s in args.sources if not s.exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    merged: dict = {"records": {}, "steps": [], "commands": {}}
    for source in args.sources:
        found = load(source)
        merged["records"].update(found["records"])
        merged["steps"] += found["steps"]
        merged["commands"].update(found["commands"])
    if args.command:
        merged["commands"][args.command] = args.seconds
    table = markdown(merged)
    if args.write:  # before printing: the summary stays even when nobody reads the output
        found = [dict(zip(("what", "aim", "measured", "from"), row)) for row in aims(merged["records"])]
        args.write.write_text(json.dumps({**merged, "aims": found, "table": table}, indent=2))
    print(table)
    return merged


if __name__ == "__main__":
    main()
