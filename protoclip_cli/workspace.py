"""The workspace layout (see docs/architecture.md) and name resolution.

```
<workspace>/datasets/<name>/manifest.json             download's record: source, counts, splits
<workspace>/datasets/<name>/shards/00000.tar ...      webdataset shards of the train split
<workspace>/datasets/<name>/<split>/00000.tar ...     other splits (the embedded set has 'heldout')
<workspace>/datasets/<name>/teacher/<slug>.h5          teacher-embed's caption features
<workspace>/runs/<run>/...                             a training run (layout: protoclip_cli.runs.RunDir)
<workspace>/eval/<model>/...                           evaluate's results for an OpenCLIP checkpoint
<workspace>/compare/<name>/...                         compare's table, curves and plot
<workspace>/cache/<name>/...                           download's inputs for img2dataset (renderings, URL list)
```
Where a data set or run is not named, commands take the workspace's only or latest one and say
which they took.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from protoclip_cli.artifacts import MANIFEST, read_manifest
from protoclip_cli.errors import MissingInputError, ProtoclipError

DEFAULT_WORKSPACE = "protoclip-workspace"
WORKSPACE_ENV = "PROTOCLIP_WORKSPACE"


def default_workspace() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV, DEFAULT_WORKSPACE))


# Names of data sets, runs and teacher slugs become folder and file names inside the workspace: one
# path component of portable characters, so a name can neither leave the workspace ('../x') nor nest
# folders ('a/b'), and it survives shells, URLs and other file systems.
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def is_valid_name(name: str) -> bool:
    """True for a name that is one safe path component (see :data:`NAME_RULE`)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def name_error(what: str, name: str, setting: str) -> str:
    """The one sentence refusing ``name`` as ``what`` (e.g. 'run name'), naming the ``setting`` to change."""
    return f"{what} {name!r} is not a valid name: use {NAME_RULE} (one folder name, no '/'), e.g. {setting}."


def check_name(name: str, what: str, setting: str) -> str:
    if not is_valid_name(name):
        raise ProtoclipError(name_error(what, name, setting))
    return name


def slugify(name: str) -> str:
    """A file-name-safe slug, always a valid name: 'sentence-transformers/all-MiniLM-L6-v2' -> 'all-MiniLM-L6-v2'."""
    base = name.rstrip("/").split("/")[-1]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).lstrip("-._")[:100].rstrip("-.")
    return slug if is_valid_name(slug) else "model"


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
        return self.dataset_dir(name) / ("shards" if split == "train" else split)

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

    def shards(self, name: str, split: str = "train") -> list[Path]:
        """The shard files of a downloaded split, in order, as the manifest lists them."""
        manifest = self.dataset_manifest(name)
        splits = manifest.get("splits", {})
        if split not in splits:
            raise ProtoclipError(
                f"Data set '{name}' has no split '{split}' (it has: {', '.join(splits) or 'none'})."
            )
        folder = self.split_dir(name, split)
        return [folder / shard for shard in splits[split]["shards"]]

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
        from protoclip_cli.runs import RunDir

        if not self.runs_dir.is_dir():
            return []
        runs = [RunDir(p) for p in self.runs_dir.iterdir() if RunDir(p).exists()]
        return [run.name for run in sorted(runs, key=lambda run: run.config_file.stat().st_mtime)]

    def resolve_run(self, name: str | None) -> str:
        """``name`` if given, else the latest run (and say which); :func:`protoclip_cli.runs.resolve`
        also takes run folders and checkpoint files."""
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
    from protoclip_cli.console import info

    info(f"Using {what} '{chosen}' ({'the only one' if len(existing) == 1 else 'the latest'} in {folder}).")
    return chosen
