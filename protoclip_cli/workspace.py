"""The workspace layout (see docs/architecture.md) and name resolution.

```
<workspace>/datasets/<name>/manifest.json             download's record: source, counts, splits
<workspace>/datasets/<name>/shards/00000.tar ...      webdataset shards of the train split
<workspace>/datasets/<name>/<split>/00000.tar ...     other splits (the embedded set has 'heldout')
<workspace>/datasets/<name>/teacher/<slug>.h5          teacher-embed's caption features
<workspace>/datasets/<name>/shards-at.json            where the shards live when not in this folder
<workspace>/runs/<run>/...                             a training run (layout: protoclip_cli.runs.RunDir)
<workspace>/eval/<model>/...                           evaluate's results for an OpenCLIP checkpoint
<workspace>/compare/<name>/...                         compare's table, curves and plot
<workspace>/cache/<name>/...                           download's inputs for img2dataset (renderings, URL list)
```
Where a data set or run is not named, commands take the workspace's only or latest one and say
which they took. :func:`resolve` is the one way every stage turns a target (a run name, a run
folder or a checkpoint file) into a :class:`ResolvedRun`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from protoclip_cli.artifacts import MANIFEST, read_manifest, write_json
from protoclip_cli.console import info
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.names import check_name, is_valid_name, slugify
from protoclip_cli.runs import CHECKPOINTS, CONFIG_FILE, RunDir

DEFAULT_WORKSPACE = "protoclip-workspace"
WORKSPACE_ENV = "PROTOCLIP_WORKSPACE"


SHARDS_AT = "shards-at.json"


def default_workspace() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV, DEFAULT_WORKSPACE))


def split_folder(split: str) -> str:
    """The folder of a split's shards: ``shards`` for train (as since the first version), else the split."""
    return "shards" if split == "train" else split


def shard_location(location: str, split: str, shard: str) -> str:
    """Where shard ``shard`` of ``split`` is under a data set's location: a folder or URL below which
    the split folders lie (``s3://bucket/cc3m`` -> ``s3://bucket/cc3m/shards/00000.tar``), or a
    template naming both (``pipe:aws s3 cp s3://bucket/cc3m/{folder}/{shard} -``)."""
    folder = split_folder(split)
    if "{shard}" in location:
        return location.replace("{folder}", folder).replace("{shard}", shard)
    return f"{location.rstrip('/')}/{folder}/{shard}"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path | None = None) -> "Workspace":
        return cls(Path(root) if root is not None else default_workspace())

    # -- data sets -----------------------------------------------------------------------------
    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    def dataset_dir(self, name: str) -> Path:
        # Configs check their names with the option to change; this is the last line of defence.
        return self.datasets_dir / check_name(name, "Data set name", "protoclip download NAME")

    def split_dir(self, name: str, split: str = "train") -> Path:
        return self.dataset_dir(name) / split_folder(split)

    def shards_at_file(self, name: str) -> Path:
        """Where the shards of data set ``name`` live when they are not in its folder (a URL or another
        folder) and how many samples each holds: ``{"location": ..., "counts": {split: {shard: n}}}``."""
        return self.dataset_dir(name) / SHARDS_AT

    def shards_at(self, name: str) -> dict | None:
        path = self.shards_at_file(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def record_shards_at(self, name: str, location: str, counts: dict[str, dict[str, int]]) -> Path:
        """Record that the shards of ``name`` live at ``location`` (the manifest, the data set's
        version, does not change: the same shards elsewhere are the same data)."""
        return write_json(self.shards_at_file(name), {"location": location, "counts": counts})

    def teacher_dir(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "teacher"

    def teacher_file(self, dataset: str, model: str) -> Path:
        return self.teacher_dir(dataset) / f"{slugify(model)}.h5"

    def download_settings_file(self, name: str) -> Path:
        """The data settings of the last download, which an incremental rerun must match."""
        return self.dataset_dir(name) / "download-settings.json"

    def download_log(self, name: str, split: str) -> Path:
        """img2dataset's own output for one split."""
        return self.dataset_dir(name) / "logs" / f"{split}.log"

    def cache_dir(self, name: str) -> Path:
        """Inputs prepared for img2dataset: the embedded set's renderings, a checked URL list."""
        return self.root / "cache" / name

    def dataset_manifest(self, name: str) -> dict:
        return read_manifest(
            self.dataset_dir(name), what=f"data set '{name}'", command=f"protoclip download {name}"
        )

    def shard_files(self, name: str, split: str = "train") -> dict[str, Path | str]:
        """Shard file name -> where it is (a path in the data set's folder, or a URL or path under the
        location of ``shards-at.json``), in the manifest's order."""
        manifest = self.dataset_manifest(name)
        splits = manifest.get("splits", {})
        if split not in splits:
            raise ProtoclipError(
                f"Data set '{name}' has no split '{split}' (it has: {', '.join(splits) or 'none'})."
            )
        elsewhere = self.shards_at(name)
        if elsewhere is not None:
            return {shard: shard_location(elsewhere["location"], split, shard) for shard in splits[split]["shards"]}
        folder = self.split_dir(name, split)
        return {shard: folder / shard for shard in splits[split]["shards"]}

    def shards(self, name: str, split: str = "train") -> list[Path | str]:
        """The shards of a downloaded split, in order, as the manifest lists them: paths, or URLs
        (``s3://``, ``gs://``, ``http(s)://``, ``pipe:``) for a data set whose shards live elsewhere."""
        return list(self.shard_files(name, split).values())

    def shard_counts(self, name: str, split: str = "train") -> dict[str, int] | None:
        """Samples per shard file of a data set whose shards live elsewhere (None: read them from the
        shards' folder, ``data.shards.shard_sample_count``)."""
        elsewhere = self.shards_at(name)
        return None if elsewhere is None else {k: int(v) for k, v in elsewhere["counts"].get(split, {}).items()}

    def datasets(self) -> list[str]:
        """Downloaded data sets (those with a manifest), oldest first."""
        return _complete_children(self.datasets_dir)

    def resolve_dataset(self, name: str | None) -> str:
        """``name`` if given, else the only or latest downloaded data set (and say which)."""
        return _resolve(name, self.datasets(), "data set", self.datasets_dir, "protoclip download synthetic")

    # -- runs ----------------------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / check_name(name, "Run name", "--set name=NAME")

    def eval_dir(self, model: str) -> Path:
        """Results of evaluating a model that is not a run of this workspace (an OpenCLIP checkpoint)."""
        return self.root / "eval" / slugify(model)

    def compare_dir(self, name: str) -> Path:
        """Results of `protoclip compare` (its runs are ordinary runs under runs/)."""
        return self.root / "compare" / slugify(name)

    def runs(self) -> list[str]:
        """Training runs (see :class:`protoclip_cli.runs.RunDir`), oldest first."""
        if not self.runs_dir.is_dir():
            return []
        runs = [RunDir(p) for p in self.runs_dir.iterdir() if RunDir(p).exists()]
        return [run.name for run in sorted(runs, key=lambda run: run.config_file.stat().st_mtime)]

    def resolve_run(self, name: str | None) -> str:
        """``name`` if given, else the latest run (and say which); :func:`resolve` also takes run
        folders and checkpoint files."""
        return _resolve(name, self.runs(), "run", self.runs_dir, "protoclip train recipes/synthetic.toml")


def _complete_children(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    children = [p for p in folder.iterdir() if (p / MANIFEST).is_file()]
    return [p.name for p in sorted(children, key=lambda p: (p / MANIFEST).stat().st_mtime)]


def _resolve(name: str | None, existing: list[str], what: str, folder: Path, command: str) -> str:
    if name:
        return name
    if not existing:
        raise MissingInputError(f"No {what} in {folder}. Run `{command}` first, or name one.")
    chosen = existing[-1]
    info(f"Using {what} '{chosen}' ({'the only one' if len(existing) == 1 else 'the latest'} in {folder}).")
    return chosen


# -- finding a run from what the user typed -------------------------------------------------------


@dataclass(frozen=True)
class ResolvedRun:
    """What a stage works on: the run, the checkpoint the user named (None: the newest) and the
    workspace the run belongs to (whose data sets it was trained on)."""

    run: RunDir
    checkpoint: Path | None
    workspace: Workspace


def resolve(workspace: Workspace, target: str | Path | None, checkpoint: str | Path | None = None) -> ResolvedRun:
    """The run ``target`` names, for every stage that reads a run (cluster, evaluate, export).

    ``target`` is, in this order:
    - empty: the workspace's latest run (the console says which);
    - an existing path, as given or relative to the workspace (``runs/NAME``): a checkpoint file
      (its run is the folder above ``checkpoints/``) or a run folder;
    - otherwise a run name: ``<workspace>/runs/<target>``.

    A run folder inside ``<ws>/runs/`` brings its workspace along, so ``protoclip evaluate
    WS/runs/NAME`` finds the data sets of WS from anywhere. ``checkpoint`` (``--checkpoint``)
    overrides the checkpoint a target names. The run must exist (its ``config.toml``).
    """
    chosen = Path(checkpoint) if checkpoint else None
    if not target:
        run = RunDir(workspace.run_dir(workspace.resolve_run(None))).require()
        _say_if_running(run)
        return ResolvedRun(run, chosen, workspace)
    path = next((p for p in (Path(target), workspace.root / target) if p.exists()), None)
    if path is None:
        if not is_valid_name(str(target)):
            raise MissingInputError(
                f"{target} is neither a file, a folder nor a run name of {workspace.runs_dir}; pass a run name, "
                "a run folder or a checkpoint file."
            )
        run = RunDir(workspace.run_dir(str(target))).require()
        _say_if_running(run)
        return ResolvedRun(run, chosen, workspace)
    if path.is_file():
        run = RunDir(path.parent.parent if path.parent.name == CHECKPOINTS else path.parent)
        if not run.exists():
            raise ProtoclipError(
                f"Checkpoint {path} is not inside a run folder (no {CONFIG_FILE} in {run.path}); for an OpenCLIP "
                "checkpoint use `protoclip evaluate --open-clip ARCH --pretrained FILE`."
            )
        chosen = chosen or path
    else:
        run = RunDir(path).require()
    _say_if_running(run)
    owner = workspace
    if run.path.resolve().parent.name == "runs":
        owner = Workspace(run.path.resolve().parent.parent)
        if owner.root.resolve() != workspace.root.resolve():
            info(f"Run {run.path} belongs to the workspace {owner.root}; reading its data sets there.")
    return ResolvedRun(run, chosen, owner)


def _say_if_running(run: RunDir) -> None:
    writer = run.writer()
    if writer is not None:
        info(f"Run {run.name} is being trained now (process {writer.get('pid', '?')} on {writer.get('host', '?')}); "
             "reading its latest checkpoint, which later ones will supersede.")
