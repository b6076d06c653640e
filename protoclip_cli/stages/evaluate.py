"""`evaluate`: zero-shot, linear probe, retrieval, clustering and modality gap of a CLIP model.

The model is a run of this project (its latest or a named checkpoint) or an OpenCLIP checkpoint.
Results go to ``runs/<run>/eval/<name>.json`` (``<workspace>/eval/<model>/`` for OpenCLIP
checkpoints), one file per task, and ``eval/manifest.json`` lists them all. ``<name>`` is the task
as given (``zeroshot``, ``imagenet-zeroshot``), with ``-<dataset>`` added when ``--dataset`` names
another data set than the default one. Every result is also written in CLIP_benchmark's schema to
``eval/clip_benchmark/`` (``evaluation/reports/results.py``), which ``clip_benchmark build`` collects.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from protoclip_cli import __version__
from protoclip_cli.artifacts import MANIFEST, write_manifest
from protoclip_cli.config import to_dict
from protoclip_cli.configs.evaluate import EXTERNAL, PROTOCOL_TASKS, SUITE_TASK, EvaluateConfig, parse_task, supports
from protoclip_cli.console import info
from protoclip_cli.data.sources import run_datasets
from protoclip_cli.errors import write_error
from protoclip_cli.evaluation.data.benchmark_wds import write_benchmark_wds
from protoclip_cli.evaluation.data.prompts import read_templates
from protoclip_cli.evaluation.data.registry import DataSets
from protoclip_cli.evaluation.reports.result_plots import ResultPlots
from protoclip_cli.evaluation.reports.results import write_result
from protoclip_cli.evaluation.tasks import clustering, linear_probe, modality_gap, retrieval, suite, zeroshot
from protoclip_cli.evaluation.tasks.model import from_run, load_open_clip
from protoclip_cli.names import slugify
from protoclip_cli.runs import RunDir
from protoclip_cli.workspace import Workspace, resolve


def _load_model(config: EvaluateConfig, workspace: Workspace):
    """(model, the workspace whose data sets the default evaluation reads)."""
    if config.open_clip:
        return load_open_clip(config.open_clip, config.pretrained, config.device), workspace

    resolved = resolve(workspace, config.model, config.checkpoint)
    return from_run(resolved.run, resolved.checkpoint, config.device), resolved.workspace


def _default_dataset(model, workspace: Workspace) -> str:
    if model.run_dir is not None:
        names = run_datasets(RunDir(model.run_dir).config().data).names
        if len(names) > 1:
            info(f"Run {Path(model.run_dir).name} was trained on {', '.join(names)}; evaluating on the first, {names[0]} "
                 f"(pass --dataset NAME for another).")
        return names[0]
    return workspace.resolve_dataset(None)


def _run_task(
    task: str, dataset: str, model, data: DataSets, config: EvaluateConfig, cache_dir: Path | None, figures: dict | None
) -> dict:
    common = dict(cache_dir=cache_dir, batch_size=config.batch_size, workers=config.workers)
    if task == SUITE_TASK:
        return suite.evaluate(model, config.root, config.suite_datasets, **common)
    if task == "zeroshot":
        templates = read_templates(config.templates) if config.templates else None
        result = zeroshot.evaluate(model, data.get(dataset), templates, figures=figures, **common)
        if config.export_wds:
            result["clip_benchmark_wds"] = _export_wds(model, data.get(dataset), templates, Path(config.export_wds))
        return result
    if task == "linear-probe":
        return linear_probe.evaluate(
            model, data.get(dataset, "train"), data.get(dataset), method=config.probe_method,
            weight_decays=config.probe_weight_decays, seed=config.seed, protocol=config.protocol, **common,
        )
    if task == "retrieval":
        return retrieval.evaluate(model, data.get(dataset), figures=figures, **common)
    if task == "modality-gap":
        return modality_gap.evaluate(model, data.get(dataset), **common)
    return clustering.evaluate(model, data.get(dataset), config.clusters, seed=config.seed, protocol=config.protocol,
                            figures=figures, **common)


def _export_wds(model, data, templates, out: Path) -> dict:
    """The zero-shot split as CLIP_benchmark's webdataset, and the command that scores the model on it."""
    export = write_benchmark_wds(data, zeroshot.templates_for(data, templates)[0], out)
    if model.run_dir is not None:
        folder = RunDir(model.run_dir).hub_export_dir(model.info["arch"])
        what = f"--model local-dir:{folder}"
        first = f"`protoclip export {model.run_dir} --checkpoint {model.info['path']} --format hf` (writes {folder}), then "
    else:
        what, first = f"--model {model.info['arch']} --pretrained {model.info['path']}", ""
    # evaluate runs fp32 off CUDA, where CLIP_benchmark's autocast would run bf16 unless told not to.
    precision = "" if model.device.type == "cuda" else " --no_amp"
    export["command"] = (f"clip_benchmark eval --model_type open_clip {what} --dataset wds/{slugify(data.name)} "
                         f"--dataset_root {out} --task zeroshot_classification{precision}")
    info(f"Wrote {export['images']} images of {data.name} for CLIP_benchmark to {out}; to score this model there, run "
         f"{first}`{export['command']}`.")
    return export


def run(config: EvaluateConfig, workspace: Workspace) -> dict[str, Any]:
    """Evaluate one model on the requested task(s); returns the eval manifest (``results`` by name)."""
    base_tasks, dataset, preset = parse_task(config.task, config.dataset)  # checked by EvaluateConfig
    if config.task == "all":
        base_tasks = [t for t in base_tasks if supports(dataset, t)]
    model, workspace = _load_model(config, workspace)
    info(f"Evaluating {model.name} on {model.device}.")
    eval_dir = RunDir(model.run_dir).eval_dir if model.run_dir else workspace.eval_dir(model.name.replace("@", "-"))
    cache_dir = eval_dir / "cache" if config.cache else None
    external = dataset in EXTERNAL or config.task == SUITE_TASK  # the suite reads only --root
    default_dataset = dataset if external else (dataset or _default_dataset(model, workspace))
    data = DataSets(config, workspace, default_dataset)

    drawer = None
    if config.plots:
        drawer = ResultPlots(model.name, model.image_size, config.tsne_points, config.seed)
    written: dict[str, dict] = {}
    for task in base_tasks:
        name = _result_name(task, preset, config)
        figures: dict = {}
        result = _run_task(task, dataset, model, data, config, cache_dir, figures)
        if task == SUITE_TASK:
            described, test_set = f"{len(result['members'])} data sets under {config.root}", SUITE_TASK
        else:
            test_set = data.get(dataset).name
            described = test_set if task != "linear-probe" else f"{data.get(dataset, 'train').name} -> {test_set}"
        record = {
            "task": task,
            "name": name,
            "dataset": described,
            "data": test_set,
            "model": {"name": model.name, **{k: v for k, v in model.info.items()}},
            "protoclip_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **result,
        }
        path = _result_path(config, eval_dir, name)
        if drawer is not None:
            _make_folder_of(path)  # a result that cannot be written is named before its plots are drawn
            test_data = None if task == SUITE_TASK else data.get(dataset)
            record["plots"] = [str(p) for p in drawer.write(path.with_suffix(""), task, record, test_data, figures)]
        benchmark_files = write_result(path, record)
        written[name] = {"path": str(path), "clip_benchmark": [str(p) for p in benchmark_files], **record}
    if config.out:
        # The results are where the user asked; the run's folder (perhaps read-only) is not touched.
        return {"stage": "evaluate", "results": {n: r["metrics"] for n, r in written.items()}, "written": written}
    return _record_manifest(eval_dir, config, model, written)


def _make_folder_of(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from exc


def _result_name(task: str, preset: str, config: EvaluateConfig) -> str:
    """``<task>`` or the preset, ``-reference`` under the reference protocol, ``-<dataset>`` for --dataset."""
    name = preset or task
    if config.protocol == "reference" and task in PROTOCOL_TASKS:
        name += "-reference"
    if config.dataset and not preset:
        name += f"-{slugify(config.dataset)}"
    return name


def _result_path(config: EvaluateConfig, eval_dir: Path, name: str) -> Path:
    if not config.out:
        return eval_dir / f"{name}.json"
    out = Path(config.out)
    return out / f"{name}.json" if config.task == "all" or out.is_dir() else out


def _record_manifest(eval_dir: Path, config: EvaluateConfig, model, written: dict[str, dict]) -> dict[str, Any]:
    """Merge this call's results into ``eval/manifest.json`` (other tasks' results stay listed)."""
    import json

    previous = {}
    if (eval_dir / MANIFEST).is_file():
        previous = json.loads((eval_dir / MANIFEST).read_text()).get("results", {})
    results = {**previous, **{n: {"path": r["path"], "metrics": r["metrics"], "dataset": r["dataset"],
                                  "model": r["model"]["name"]} for n, r in written.items()}}
    manifest = write_manifest(
        eval_dir, "evaluate", config=to_dict(config), inputs={"checkpoint": model.info["path"]}, results=results
    )
    manifest["written"] = written
    return manifest
