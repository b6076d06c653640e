"""`evaluate`: zero-shot, linear probe, retrieval, clustering and modality gap of a CLIP model.

The model is a run of this project (its latest or a named checkpoint) or an OpenCLIP checkpoint.
Results go to ``runs/<run>/eval/<name>.json`` (``<workspace>/eval/<model>/`` for OpenCLIP
checkpoints), one file per task, and ``eval/manifest.json`` lists them all. ``<name>`` is the task
as given (``zeroshot``, ``imagenet-zeroshot``), with ``-<dataset>`` added when ``--dataset`` names
another data set than the default one. Every result is also written in CLIP_benchmark's schema to
``eval/clip_benchmark/`` (``evaluation/results.py``), which ``clip_benchmark build`` collects.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from protoclip_cli import __version__
from protoclip_cli.artifacts import MANIFEST, write_manifest
from protoclip_cli.config import ConfigError, option, require, to_dict
from protoclip_cli.console import info
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.evaluation.results import write_result
from protoclip_cli.workspace import Workspace, is_valid_name, name_error, slugify

BASE_TASKS = ("zeroshot", "linear-probe", "retrieval", "clustering", "modality-gap")
SUITE_TASK = "zeroshot-suite"  # the reference's ten zero-shot data sets and COCO retrieval, under --root
TASKS = BASE_TASKS + ("all", SUITE_TASK)
SUITE_DATASETS = ("imagenet", "cifar10", "cifar100", "stl10", "birdsnap", "country211", "flowers102", "gtsrb",
                  "stanford_cars", "ucf101", "coco")  # fmt: skip
# Data sets a preset task name may start with ("imagenet-zeroshot"); "synthetic" = the default one.
PRESET_DATASETS = ("imagenet", "cifar10", "cifar100", "stl10", "coco", "flickr30k", "synthetic")
EXTERNAL = ("imagenet", "cifar10", "cifar100", "stl10", "coco", "flickr30k", "folder", "webdataset")
LABELLED = ("imagenet", "cifar10", "cifar100", "stl10", "folder")
PAIRED = ("coco", "flickr30k", "webdataset")
PROTOCOLS = ("default", "reference")
# Tasks whose protocol --protocol chooses; their results carry it in their name.
PROTOCOL_TASKS = ("linear-probe", "clustering")


@dataclass(frozen=True)
class EvaluateConfig:
    task: str = option("all", f"Task: {', '.join(TASKS)}, or a preset such as imagenet-zeroshot or synthetic-zeroshot.")
    model: str = option("", "Run name, run folder or checkpoint file of this project ('' = the workspace's latest run).")
    checkpoint: str = option("", "Checkpoint of the run to evaluate ('' = its latest).")
    open_clip: str = option("", "Evaluate an OpenCLIP architecture instead of a run (with `pretrained`).")
    pretrained: str = option("", "OpenCLIP checkpoint file for `open_clip`.")
    dataset: str = option(
        "", "Data: imagenet, cifar10, cifar100, stl10, coco, flickr30k, folder, webdataset, or a workspace data set "
        "('' = the run's training data set, evaluated on its held-out split)."
    )
    root: str = option("", "Folder of the data set (a glob of .tar shards for webdataset).")
    classnames: str = option("", "Class-names file for an ImageFolder: one name per line in sorted folder order.")
    templates: str = option("", "Prompt templates file, one per line with '{}' ('' = the data set's own or OpenAI's 80).")
    captions: str = option("", "COCO captions JSON or the Flickr30k Karpathy split file.")
    split: str = option("test", "Flickr30k Karpathy split to evaluate.")
    heldout_split: str = option("heldout", "Split of a workspace data set used as the test set.")
    out: str = option("", "Result file (a folder with task 'all'); '' = <run>/eval/.")
    batch_size: int = option(256, "Images per extraction batch.")
    workers: int = option(2, "Data-loader worker processes for image decoding.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    cache: bool = option(True, "Reuse and store extracted features under <run>/eval/cache.")
    clusters: int = option(0, "k of the clustering task (0 = the number of classes).")
    probe_method: str = option("lbfgs", "Linear-probe optimiser: lbfgs (full batch) or adam (mini-batch).")
    probe_weight_decays: tuple[float, ...] = option(
        (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1), "Weight decays tried on the linear probe's validation split."
    )
    seed: int = option(0, "Seed of the validation split and of k-means.")
    protocol: Literal["default", "reference"] = option(
        "default",
        "Protocol of the linear probe and the clustering task. default: L-BFGS (or --probe-method) on "
        "normalised features, weight decay chosen on a 20% validation split, scored once on test; k-means "
        "with 50 iterations and 3 restarts. reference: the ProtoCLIP reference's, to compare with the "
        "paper: SGD for 100 epochs on the raw features reporting the best test top-1 over the epochs; faiss "
        "k-means with 100 iterations and 5 restarts. Results are named <task>-reference.",
    )
    plots: bool = option(True, "Write PNG plots next to each result (curves, t-SNE maps, sample grids) and print their paths.")
    tsne_points: int = option(1000, "Image features in each t-SNE map (a seeded sample; 0 = no t-SNE).")
    suite_datasets: tuple[str, ...] = option(
        (), f"Data sets of --task {SUITE_TASK} (default: every one found under --root): {', '.join(SUITE_DATASETS)}."
    )

    def __post_init__(self) -> None:
        if self.task == SUITE_TASK:
            require(bool(self.root), f"--task {SUITE_TASK} needs --root: the folder holding its data sets (see docs/evaluation.md).")
            require(not self.dataset, f"--task {SUITE_TASK} finds its data sets under --root; drop --dataset {self.dataset}.")
        unknown = [name for name in self.suite_datasets if name not in SUITE_DATASETS]
        require(not unknown, f"--suite-datasets {unknown[0] if unknown else ''} is not one of {', '.join(SUITE_DATASETS)}.")
        require(not self.suite_datasets or self.task == SUITE_TASK, f"--suite-datasets applies to --task {SUITE_TASK} only.")
        base_tasks, dataset, _ = parse_task(self.task, self.dataset)
        require(self.probe_method in ("lbfgs", "adam"), f"--probe-method {self.probe_method} is not lbfgs or adam.")
        require(self.protocol in PROTOCOLS, f"--protocol {self.protocol} is not {' or '.join(PROTOCOLS)}.")
        require(
            self.task == "all" or _supports(dataset, base_tasks[0]),
            f"Data set {dataset} has no data for the {base_tasks[0]} task; see docs/evaluation.md.",
        )
        if dataset in EXTERNAL:  # before any model is loaded
            _require_root(self, dataset)
        else:
            require(not dataset or is_valid_name(dataset), name_error("--dataset", dataset, "--dataset synthetic"))
        require(
            not self.pretrained or bool(self.open_clip),
            "--pretrained needs --open-clip ARCH (the OpenCLIP architecture of the checkpoint).",
        )
        require(
            not self.classnames or dataset == "folder",
            "--classnames applies to --dataset folder only; other data sets name their classes.",
        )
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}.")
        require(self.workers >= 0, f"--workers must be 0 (decode in this process) or more, got {self.workers}.")
        require(self.clusters >= 0, f"--clusters must be 0 (the number of classes) or more, got {self.clusters}.")
        require(self.tsne_points >= 0, f"--tsne-points must be 0 (no t-SNE) or more, got {self.tsne_points}.")


def parse_task(task: str, dataset: str) -> tuple[list[str], str, str]:
    """(base tasks to run, data set, result-name prefix) for a task name and ``--dataset``."""
    if task in TASKS:
        tasks = list(BASE_TASKS) if task == "all" else [task]
        return tasks, dataset, ""
    prefix, _, base = task.partition("-")
    if prefix in PRESET_DATASETS and base in BASE_TASKS:
        if dataset and dataset != prefix and not (prefix == "synthetic"):
            raise ConfigError(f"Task {task} already names its data set; drop --dataset {dataset}.")
        return [base], ("" if prefix == "synthetic" else prefix), task
    raise ConfigError(
        f"Unknown task '{task}'; choose one of {', '.join(TASKS)}, or a preset <dataset>-<task> such as "
        "imagenet-zeroshot, cifar10-zeroshot, coco-retrieval or synthetic-zeroshot."
    )


def _supports(dataset: str, task: str) -> bool:
    if dataset in LABELLED:
        return task in ("zeroshot", "linear-probe", "clustering")
    if dataset in PAIRED:
        return task in ("retrieval", "modality-gap")
    return True  # a workspace data set: labelled pairs


def _require_root(config: EvaluateConfig, dataset: str) -> None:
    if not config.root:
        flag = "--imagenet-root" if dataset == "imagenet" else "--root"
        raise ConfigError(f"Data set {dataset} needs {flag}: the folder that holds it (see docs/evaluation.md).")


class _Data:
    """Loads each data set once per stage run (the shard metadata pass is not free)."""

    def __init__(self, config: EvaluateConfig, workspace: Workspace, default_dataset: str) -> None:
        self.config, self.workspace, self.default_dataset = config, workspace, default_dataset
        self._sets: dict[tuple[str, str], Any] = {}

    def _root(self, dataset: str) -> Path:
        _require_root(self.config, dataset)
        return Path(self.config.root)

    def _load(self, dataset: str, role: str):
        from protoclip_cli.evaluation import datasets as ds

        c = self.config
        if dataset not in EXTERNAL:
            split = "train" if role == "train" else c.heldout_split
            return ds.embedded(self.workspace, dataset or self.default_dataset, split)
        root = self._root(dataset)
        if dataset == "imagenet":
            return ds.imagenet(root, "train" if role == "train" else "val")
        if dataset in ds.TORCHVISION_SETS:
            return ds.torchvision_set(dataset, root, train=role == "train")
        if dataset == "folder":
            has_splits = (root / "train").is_dir() and (root / "test").is_dir()
            if role == "train" and not has_splits:
                raise ProtoclipError(f"The linear probe needs {root}/train/<class>/ and {root}/test/<class>/ folders.")
            folder = root / ("train" if role == "train" else "test") if has_splits else root
            return ds.image_folder(folder, c.classnames or None, name=f"{root.name}-{folder.name}")
        if dataset == "coco":
            return ds.coco(root, c.captions or None)
        if dataset == "flickr30k":
            return ds.flickr30k(root, c.captions or None, c.split)
        return ds.webdataset_pairs(c.root)

    def get(self, dataset: str, role: str = "test"):
        if (dataset, role) not in self._sets:
            self._sets[(dataset, role)] = self._load(dataset, role)
        return self._sets[(dataset, role)]


def _load_model(config: EvaluateConfig, workspace: Workspace):
    """(model, the workspace whose data sets the default evaluation reads)."""
    from protoclip_cli.evaluation import models

    if config.open_clip:
        return models.load_open_clip(config.open_clip, config.pretrained, config.device), workspace
    from protoclip_cli.runs import resolve

    resolved = resolve(workspace, config.model, config.checkpoint)
    return models.from_run(resolved.run, resolved.checkpoint, config.device), resolved.workspace


def _default_dataset(model, workspace: Workspace) -> str:
    if model.run_dir is not None:
        from protoclip_cli.runs import RunDir

        from protoclip_cli.data.sources import run_datasets

        names = run_datasets(RunDir(model.run_dir).config().data).names
        if len(names) > 1:
            info(f"Run {Path(model.run_dir).name} was trained on {', '.join(names)}; evaluating on the first, {names[0]} "
                 f"(pass --dataset NAME for another).")
        return names[0]
    return workspace.resolve_dataset(None)


def _run_task(
    task: str, dataset: str, model, data: _Data, config: EvaluateConfig, cache_dir: Path | None, figures: dict | None
) -> dict:
    from protoclip_cli.evaluation import tasks
    from protoclip_cli.evaluation.datasets import read_templates

    common = dict(cache_dir=cache_dir, batch_size=config.batch_size, workers=config.workers)
    if task == SUITE_TASK:
        from protoclip_cli.evaluation.suite import run_suite

        return run_suite(model, config.root, config.suite_datasets, **common)
    if task == "zeroshot":
        templates = read_templates(config.templates) if config.templates else None
        return tasks.zeroshot(model, data.get(dataset), templates, figures=figures, **common)
    if task == "linear-probe":
        return tasks.linear_probe(
            model, data.get(dataset, "train"), data.get(dataset), method=config.probe_method,
            weight_decays=config.probe_weight_decays, seed=config.seed, protocol=config.protocol, **common,
        )
    if task == "retrieval":
        return tasks.retrieval(model, data.get(dataset), figures=figures, **common)
    if task == "modality-gap":
        return tasks.modality_gap(model, data.get(dataset), **common)
    return tasks.clustering(model, data.get(dataset), config.clusters, seed=config.seed, protocol=config.protocol,
                            figures=figures, **common)


def run(config: EvaluateConfig, workspace: Workspace) -> dict[str, Any]:
    """Evaluate one model on the requested task(s); returns the eval manifest (``results`` by name)."""
    from protoclip_cli.runs import RunDir

    base_tasks, dataset, preset = parse_task(config.task, config.dataset)  # checked by EvaluateConfig
    if config.task == "all":
        base_tasks = [t for t in base_tasks if _supports(dataset, t)]
    model, workspace = _load_model(config, workspace)
    info(f"Evaluating {model.name} on {model.device}.")
    eval_dir = RunDir(model.run_dir).eval_dir if model.run_dir else workspace.eval_dir(model.name.replace("@", "-"))
    cache_dir = eval_dir / "cache" if config.cache else None
    external = dataset in EXTERNAL or config.task == SUITE_TASK  # the suite reads only --root
    default_dataset = dataset if external else (dataset or _default_dataset(model, workspace))
    data = _Data(config, workspace, default_dataset)

    drawer = None
    if config.plots:
        from protoclip_cli.evaluation.result_plots import ResultPlots

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
    from protoclip_cli.errors import write_error

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
