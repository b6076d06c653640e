"""A training run's folder: its layout, and how a stage finds a run from what the user typed.

:class:`RunDir` is the only code that spells the paths inside ``runs/<run>/`` (see
docs/training.md); the formats of the files are their writers' (``training/checkpoint.py``,
``training/prototypes.py``, ``training/metrics.py``, the stages)::

    config.toml                    the resolved recipe (a folder is a run when it has one)
    manifest.json                  train's record: status, inputs, steps
    checkpoints/step-<8 digits>.pt model, optimiser, position, RNG states
    episodes/plan.json             the shards of every episode
    episodes/<n>/prototypes.h5     labels, centroids and PBT centroids of episode n
    metrics.jsonl, tensorboard/    per-step and per-episode metrics
    wandb-run.txt, wandb/          the run's wandb id (a resumed run continues it), wandb's own files
    eval/<task>.json, eval/*.png   evaluate's results and their plots; eval/cache/ its cached features
    cluster/episode-<n>/           cluster's report on episode n
    export/<run>-<arch>.pt         export's OpenCLIP checkpoint
    export/<run>-<arch>-hf/        export's OpenCLIP hub folder (open_clip_config.json, weights, README.md)
    train.lock                     present while a train process writes the run (pid, host, command)

One process writes a run at a time: ``train`` holds :meth:`RunDir.lock` (an OS lock on
``train.lock``, which the kernel releases when the process ends, however it ends). A second writer
is refused naming the holder; a lock file left by a process that died is stale and taken over
(:mod:`protoclip_cli.run_lock`). Readers (evaluate, cluster, export) take no lock: every file train
writes is renamed into place whole, so they read a running run's latest checkpoint as it is.

RunDir knows paths: loading a run's model is :mod:`protoclip_cli.core.run_model`'s, and finding a
run from what the user typed is :func:`protoclip_cli.workspace.resolve`'s.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protoclip_cli import config as config_io
from protoclip_cli.artifacts import write_text
from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.run_lock import RunLock

CONFIG_FILE = "config.toml"
CHECKPOINTS = "checkpoints"
_CHECKPOINT = re.compile(r"^step-(\d{8})\.pt$")
EPISODES = "episodes"
LOCK_FILE = "train.lock"
TRAIN_COMMAND = "protoclip train recipes/synthetic.toml"


@dataclass(frozen=True)
class RunDir:
    """The folder ``runs/<run>/`` of one training run."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        """A folder is a run once train has written its resolved recipe."""
        return self.config_file.is_file()

    # -- layout ------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def manifest_file(self) -> Path:
        return self.path / "manifest.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def episodes_dir(self) -> Path:
        return self.path / EPISODES

    @property
    def plan_file(self) -> Path:
        return self.episodes_dir / "plan.json"

    def episode_dir(self, episode: int) -> Path:
        return self.episodes_dir / str(episode)

    def prototypes_file(self, episode: int) -> Path:
        return self.episode_dir(episode) / "prototypes.h5"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def wandb_id_file(self) -> Path:
        return self.path / "wandb-run.txt"

    @property
    def wandb_dir(self) -> Path:
        """wandb's own folder (offline runs to ``wandb sync``); ``wandb.init(dir=run.path)`` creates it."""
        return self.path / "wandb"

    def wandb_run_id(self) -> str | None:
        """The id of the wandb run this run logs to, once it has started one."""
        if not self.wandb_id_file.is_file():
            return None
        return self.wandb_id_file.read_text().strip() or None

    def record_wandb_run_id(self, run_id: str) -> None:
        write_text(self.wandb_id_file, run_id + "\n")

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def cluster_dir(self, episode: int) -> Path:
        return self.path / "cluster" / f"episode-{episode}"

    def export_file(self, arch: str) -> Path:
        return self.path / "export" / f"{self.name}-{arch}.pt"

    def hub_export_dir(self, arch: str) -> Path:
        """export's OpenCLIP hub folder (``--format hf``)."""
        return self.path / "export" / f"{self.name}-{arch}-hf"

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    def training_state(self) -> list[Path]:
        """What a fresh start of the run deletes: checkpoints, episodes, metrics, TensorBoard events and
        the wandb id (a fresh start is a new wandb run; wandb's own folder, with offline runs not yet
        synced, stays)."""
        return [self.checkpoints_dir, self.episodes_dir, self.tensorboard_dir, self.metrics_file, self.wandb_id_file]

    # -- the writer's lock ---------------------------------------------------------------------------
    def lock(self, command: str = "train") -> "RunLock":
        """Claim the run for this process (see :class:`RunLock`); a :class:`RunLocked` error names the
        process that holds it. Release with ``.release()`` or use it as a context manager."""
        return RunLock(self.lock_file, self.name).acquire(command)

    def writer(self) -> dict[str, Any] | None:
        """The process writing this run now (``pid``, ``host``, ``command``, ``started_at``), or None.
        It opens the lock file read-only, so it works on a read-only workspace."""
        return RunLock(self.lock_file, self.name).holder()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files a killed writer left (``.step-*.pt.*.tmp``, ``.prototypes.h5.*.tmp``,
        ...). Only the lock holder may call this: a live writer's temporaries look the same."""
        folders = [self.path, self.checkpoints_dir, *(p for p in self.episodes_dir.glob("*") if p.is_dir())]
        removed = []
        for folder in folders:
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
                removed.append(tmp)
        return removed

    # -- contents ----------------------------------------------------------------------------------
    def require(self) -> "RunDir":
        """This run, or a :class:`MissingInputError` when the folder holds no run."""
        if not self.exists():
            raise MissingInputError(
                f"No training run at {self.path} ({CONFIG_FILE} is missing); pass a run of {self.path.parent}, "
                f"or train one with `{TRAIN_COMMAND}`."
            )
        return self

    def config(self) -> TrainConfig:
        """The resolved recipe the run was trained with."""
        return config_io.load(TrainConfig, self.require().config_file)

    def checkpoint_file(self, global_step: int) -> Path:
        return self.checkpoints_dir / f"step-{global_step:08d}.pt"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest (lowest step) first; a killed writer's temporaries are not."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir() if (m := _CHECKPOINT.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def checkpoint(self, chosen: str | Path | None = None) -> Path:
        """``chosen`` (a checkpoint file) or the newest checkpoint; an error when there is none."""
        if chosen:
            path = Path(chosen)
            if not path.is_file():
                raise MissingInputError(f"Checkpoint {path} does not exist; `ls {self.checkpoints_dir}` lists the run's.")
            return path
        path = self.latest_checkpoint()
        if path is None:
            raise MissingInputError(
                f"Run {self.path} has no checkpoint yet; train it first with `protoclip train {self.config_file}`."
            )
        return path

    def episodes(self) -> dict[int, Path]:
        """The episodes that have prototypes, episode number -> ``prototypes.h5``."""
        if not self.episodes_dir.is_dir():
            return {}
        numbers = [int(p.name) for p in self.episodes_dir.iterdir() if p.name.isdigit()]
        return {n: self.prototypes_file(n) for n in sorted(numbers) if self.prototypes_file(n).is_file()}

    def pick_episode(self, episode: str) -> tuple[int, Path]:
        """(number, prototypes.h5) for ``episode`` = ``last`` or a number."""
        found = self.episodes()
        if not found:
            raise MissingInputError(
                f"Run {self.path} has no episodes/<n>/prototypes.h5 (a CLIP baseline has none, or training has not "
                "clustered an episode yet); train a ProtoCLIP recipe first."
            )
        if episode == "last":
            number = max(found)
        else:
            try:
                number = int(episode)
            except ValueError:
                raise ProtoclipError(f"--episode {episode} is neither 'last' nor a number.") from None
            if number not in found:
                raise MissingInputError(
                    f"Run {self.path} has no episode {number}; it has {', '.join(map(str, sorted(found)))}."
                )
        return number, found[number]
