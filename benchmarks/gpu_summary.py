"""One table of the GPU run (benchmarks/gpu.sh): the performance aims against what was measured.

Reads the JSON files gpu.sh writes into one folder and prints (and writes ``summary.md`` and
``summary.json`` beside them) the ratios the performance work aims at; a missing file leaves its
rows as ``n/a``.

    python benchmarks/gpu_summary.py benchmarks/results/gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _variant(record: dict | None, name: str, key: str):
    if not record:
        return None
    return next((r.get(key) for r in record.get("results", []) if r.get("variant") == name), None)


def rows(folder: Path) -> list[tuple[str, str, float | None, str]]:
    """(what, aim, measured value, how) for every aim."""
    e2e = _load(folder, "e2e.json")
    eager = _load(folder, "train_step-eager.json")
    compiled = _load(folder, "train_step-compiled.json")
    overhead = _load(folder, "extract_kmeans.json")
    rrc, light = _load(folder, "dataloader-rrc.json"), _load(folder, "dataloader-light.json")
    found: list[tuple[str, str, float | None, str]] = []

    def ratio(a, b):
        return a / b if a is not None and b else None

    found.append(("ProtoCLIP / CLIP wall time, faithful", "<= 1.30", _variant(e2e, "protoclip", "wall_ratio_to_clip"), "e2e.json"))
    found.append(("ProtoCLIP / CLIP wall time, single-pass", "<= 1.05",
                  _variant(e2e, "protoclip-single-pass", "wall_ratio_to_clip"), "e2e.json"))
    for name in ("clip", "protoclip", "protoclip-single-pass"):
        found.append((f"training-pass samples/s / step benchmark, {name}", ">= 0.95",
                      _variant(e2e, name, "ratio_to_step_benchmark"), "e2e.json"))
    found.append(("training loader alone, light / rrc (workers)", ">= 0.80",
                  ratio(light and light["samples_per_s"], rrc and rrc["samples_per_s"]), "dataloader-*.json"))
    extract_rate = None
    if e2e:
        faithful = next((r for r in e2e["results"] if r["variant"] == "protoclip"), None)
        if faithful and faithful["extract_seconds"] > 0:
            extracted = sum(1 for e in faithful["episodes"] if e["seconds"].get("extract", 0) > 0)
            episode_size = faithful["recipe"]["data"]["episode_size"]
            extract_rate = extracted * episode_size / faithful["extract_seconds"]
    in_memory = overhead and overhead["extraction"]["samples_per_s"]
    found.append(("extraction pass in the trainer / in-memory benchmark", ">= 0.90", ratio(extract_rate, in_memory),
                  "e2e.json, extract_kmeans.json"))
    share = None
    train_rate = _variant(e2e, "protoclip", "train_samples_per_s")
    if overhead and overhead.get("episode") and extract_rate and train_rate:
        n = overhead["config"]["n"]
        share = (n / extract_rate + overhead["episode"]["seconds"]) / (n / train_rate)
    found.append(("episode overhead at reference scale / training pass, faithful", "<= 0.30", share,
                  "extraction at the trainer's rate + clustering (extract_kmeans) over 200K samples trained"))
    for label, record in (("eager", eager), ("compiled", compiled)):
        for name in ("clip", "protoclip"):
            found.append((f"train step vs OpenCLIP ({label}), {name}", "~1.0", _variant(record, name, "ratio_to_openclip"),
                          f"train_step-{label}.json"))
    return found


def main(argv: list[str] | None = None) -> list:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else Path("benchmarks/results/gpu")
    found = rows(folder)
    lines = ["| what | aim | measured | from |", "|---|---|---|---|"]
    for what, aim, value, source in found:
        lines.append(f"| {what} | {aim} | {'n/a' if value is None else f'{value:.2f}'} | {source} |")
    steps = folder / "steps.tsv"
    if steps.is_file():
        lines += ["", "| step | status | seconds |", "|---|---|---|"]
        for line in steps.read_text().splitlines():
            name, status, seconds = line.split("\t")
            lines.append(f"| {name} | {status} | {seconds} |")
    text = "\n".join(lines) + "\n"
    (folder / "summary.md").write_text(text)
    (folder / "summary.json").write_text(json.dumps([dict(zip(("what", "aim", "measured", "from"), r)) for r in found], indent=2))
    print(text)
    return found


if __name__ == "__main__":
    main()
