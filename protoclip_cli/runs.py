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
is refused naming the holder; a lock file left by a process that died is stale and taken over.
(:mod:`protoclip_cli.run_lock`). Readers (evaluate, cluster, export) take no lock: every file train writes is renamed into place
whole, so they read a running run's latest checkpoint as it is.

:func:`resolve` is the one way every stage turns a target (a run name, a run folder or a
checkpoint file) into a :class:`ResolvedRun`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protoclip_cli.errors import MissingInputError, ProtoclipError
from protoclip_cli.run_lock import RunLock

if TYPE_CHECKING:
    from protoclip_cli.recipes import TrainConfig
    from protoclip_cli.workspace import Workspace

__all__ = ["RunDir", "ResolvedRun", "resolve", "latest_checkpoint", "load_run_config", "load_run_model"]

CONFIG_FILE = "config.toml"
CHECKPOINTS = "checkpoints"
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
        from protoclip_cli.artifacts import write_text

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

    def config(self) -> "TrainConfig":
        """The resolved recipe the run was trained with."""
        from protoclip_cli import config as config_io
        from protoclip_cli.recipes import TrainConfig

        return config_io.load(TrainConfig, self.require().config_file)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        from protoclip_cli.training.checkpoint import latest_checkpoint as newest

        return newest(self.path)

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

    def load_model(self, checkpoint: str | Path | None = None, device: str = "cpu"):
        """Rebuild the run's model with a checkpoint's weights (the newest when ``checkpoint`` is None).

        Returns ``(model, config, info)``: the :class:`~protoclip_cli.core.model.ProtoCLIP` in eval
        mode on ``device``, the run's :class:`TrainConfig`, and ``info`` = ``{"path", "episode",
        "batches_done", "steps_in_episode", "global_step", "total_steps", "complete"}``
        (``complete``: the checkpoint closes the whole run).
        """
        from protoclip_cli.core.model import build_model
        from protoclip_cli.training.checkpoint import load_checkpoint, load_weights

        config = self.config()
        for attempt in range(3):
            path = self.checkpoint(checkpoint)
            try:
                state = load_checkpoint(path)
                break
            except ProtoclipError:
                # A running train deletes its older checkpoints: the newest of a moment ago may be
                # gone by the time it is opened, so look for the newest again.
                if checkpoint or path.exists() or attempt == 2:
                    raise
        model = build_model(config.model, contrastive=config.loss.contrastive)
        load_weights(model, state["model"], path, "pass a checkpoint of this run (--checkpoint), or move this one away "
                     "to read the run's previous one")
        model.to(device).eval()
        info: dict[str, Any] = {
            "path": str(path),
            "episode": int(state["episode"]),
            "batches_done": int(state["batches_done"]),
            "steps_in_episode": int(state["steps_in_episode"]),
            "global_step": int(state["global_step"]),
            "total_steps": int(state["total_steps"]),
            "complete": int(state["global_step"]) >= int(state["total_steps"]),
        }
        return model, config, info


@dataclass(frozen=True)
class ResolvedRun:
    """What a stage works on: the run, the checkpoint the user named (None: the newest) and the
    workspace the run belongs to (whose data sets it was trained on)."""

    run: RunDir
    checkpoint: Path | None
    workspace: "Workspace"


def resolve(workspace: "Workspace", target: str | Path | None, checkpoint: str | Path | None = None) -> ResolvedRun:
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
    from protoclip_cli.workspace import Workspace

    chosen = Path(checkpoint) if checkpoint else None
    if not target:
        run = RunDir(workspace.run_dir(workspace.resolve_run(None))).require()
        _say_if_running(run)
        return ResolvedRun(run, chosen, workspace)
    path = next((p for p in (Path(target), workspace.root / target) if p.exists()), None)
    if path is None:
        from protoclip_cli.workspace import is_valid_name

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
            from protoclip_cli.console import info

            info(f"Run {run.path} belongs to the workspace {owner.root}; reading its data sets there.")
    return ResolvedRun(run, chosen, owner)


def _say_if_running(run: RunDir) -> None:
    writer = run.writer()
    if writer is not None:
        from protoclip_cli.console import info

        info(f"Run {run.name} is being trained now (process {writer.get('pid', '?')} on {writer.get('host', '?')}); "
             "reading its latest checkpoint, which later ones will supersede.")


# -- the same for a folder path ----------------------------------------------------------------------


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (``checkpoints/step-*.pt``), or None."""
    return RunDir(Path(run_dir)).latest_checkpoint()


def load_run_config(run_dir: str | Path) -> "TrainConfig":
    """The resolved recipe a run was trained with (``runs/<run>/config.toml``)."""
    return RunDir(Path(run_dir)).config()


def load_run_model(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"):
    """:meth:`RunDir.load_model` of the run folder ``run_dir``."""
    return RunDir(Path(run_dir)).load_model(checkpoint, device)
