"""``protoclip evaluate``'s config: the model, the task, the data set and the protocols."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from protoclip_cli.config import ConfigError, option, require
from protoclip_cli.names import is_valid_name, name_error

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
    export_wds: str = option(
        "",
        "Also write the zero-shot test split to this folder as a webdataset in CLIP_benchmark's layout (test/*.tar, "
        "classnames.txt, zeroshot_classification_templates.txt): `clip_benchmark eval --dataset wds/NAME "
        "--dataset_root FOLDER` then scores a model on the same images, class names and templates.",
    )
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
            self.task == "all" or supports(dataset, base_tasks[0]),
            f"Data set {dataset} has no data for the {base_tasks[0]} task; see docs/evaluation.md.",
        )
        if dataset in EXTERNAL:  # before any model is loaded
            require_root(self, dataset)
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
        require(
            not self.export_wds or "zeroshot" in base_tasks,
            f"--export-wds writes the zero-shot test split; use it with --task zeroshot, all or a *-zeroshot preset, not {self.task}.",
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


def supports(dataset: str, task: str) -> bool:
    if dataset in LABELLED:
        return task in ("zeroshot", "linear-probe", "clustering")
    if dataset in PAIRED:
        return task in ("retrieval", "modality-gap")
    return True  # a workspace data set: labelled pairs


def require_root(config: EvaluateConfig, dataset: str) -> None:
    if not config.root:
        flag = "--imagenet-root" if dataset == "imagenet" else "--root"
        raise ConfigError(f"Data set {dataset} needs {flag}: the folder that holds it (see docs/evaluation.md).")
