"""A run's checkpoint, ``runs/<run>/checkpoints/step-<global step, 8 digits>.pt``: the one place that
says what it holds. The trainer saves a :class:`TrainState` and resumes from one; every stage that
reads a run loads one (:mod:`protoclip_cli.core.run_model`). Where the files lie is
:class:`~protoclip_cli.runs.RunDir`'s.

Each file is one ``torch.save`` dict of tensors and plain types only, so it loads with
``torch.load(weights_only=True)``: ``format`` and the fields of :class:`TrainState`. Files are
written through :func:`protoclip_cli.artifacts.atomic_path`: a process killed while writing leaves
only a hidden ``.step-*.pt.*.tmp`` file, which :meth:`RunDir.checkpoints` never returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protoclip_cli.artifacts import atomic_path
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.runs import RunDir

FORMAT = 1


@dataclass
class TrainState:
    """What a checkpoint holds: the weights, the optimiser and where the run stands."""

    model: dict[str, torch.Tensor]  # ProtoCLIP's state dict, without DDP or compile prefixes
    optimizer: dict[str, Any]
    episode: int  # the episode in progress, or just finished
    batches_done: int  # steps done in that episode
    steps_in_episode: int
    global_step: int
    total_steps: int
    world_size: int
    workers: int  # data-loader workers per process
    config: dict[str, Any]  # the resolved recipe as plain data
    rng: dict[str, Any]  # torch's CPU state and the CUDA states, as uint8 tensors
    loader: list[dict] | None = None  # per rank, per worker: records read and batches given in the episode
    recorded: dict[str, torch.Tensor] | None = None  # single-pass, mid-episode: every rank's recorded keys and features
    steps_per_episode: list[int] | None = None  # the run's layout (None: as its plan gives it on world_size ranks)
    schedule_steps: list[int] | None = None  # the layout the learning-rate schedule is laid out on (None: the run's)
    preprocess: dict[str, Any] | None = None  # the towers' preprocessing config (None: the architecture's default)

    @property
    def complete(self) -> bool:
        """The checkpoint closes the whole run."""
        return self.global_step >= self.total_steps

    @property
    def episode_done(self) -> bool:
        return self.batches_done >= self.steps_in_episode

    def position(self, path: Path) -> dict[str, Any]:
        """Where the checkpoint at ``path`` stands, as stages report it (evaluate's records, export's manifest)."""
        return {"path": str(path), "episode": self.episode, "batches_done": self.batches_done,
                "steps_in_episode": self.steps_in_episode, "global_step": self.global_step,
                "total_steps": self.total_steps, "complete": self.complete}  # fmt: skip


_REQUIRED = tuple(f.name for f in dataclasses.fields(TrainState) if f.default is dataclasses.MISSING)


def save_checkpoint(run: RunDir, state: TrainState, keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of its global step; keep the newest ``keep``."""
    path = run.checkpoint_file(state.global_step)
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if getattr(state, f.name) is not None}
    # Through a file object: a failed write then carries its OSError (full disk, ...) for the message.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **fields}, f)
    for old in run.checkpoints()[: -max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path, advice: str) -> None:
    """Load a checkpoint's ``weights`` into ``model``; a checkpoint of another model (tensors of other
    shapes, missing or extra tensors) is one sentence naming ``path`` and the first difference, then
    ``advice``, instead of torch's list of every mismatch."""
    own = model.state_dict()
    differences = [
        f"{name} is {_shape(tensor)} in the checkpoint and {_shape(own[name])} in the run's model"
        for name, tensor in weights.items() if name in own and tensor.shape != own[name].shape
    ]
    differences += [f"the checkpoint has no {name}" for name in own if name not in weights]
    differences += [f"the checkpoint's {name} is not in the run's model" for name in weights if name not in own]
    if differences:
        more = f" (and {len(differences) - 1} more tensor(s) differ)" if len(differences) > 1 else ""
        raise ProtoclipError(
            f"Checkpoint {path} does not fit the model of its run's config.toml: {differences[0]}{more}; it was "
            f"written for another model, so {advice}."
        )
    model.load_state_dict(weights)


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(size) for size in tensor.shape) or "a scalar"


def restore_training_state(path: Path, state: TrainState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           workers: int) -> None:
    """Resume training from ``state`` (read from ``path``): the weights, the optimiser and the random
    generators; a checkpoint of another model, optimiser or number of data workers is one sentence."""
    if state.workers != workers:
        raise ProtoclipError(
            f"Checkpoint {path.name} was written with {state.workers} data worker(s) per process; resume with "
            f"data.workers = {state.workers}, or start over with --no-resume."
        )
    advice = "move it away to resume from the previous checkpoint, or start over with --no-resume"
    load_weights(model, state.model, path, advice)
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError) as exc:  # torch's sentence on parameter groups of other sizes
        raise ProtoclipError(f"Checkpoint {path} holds the optimiser state of another model ({exc}); {advice}.") from exc
    restore_rng_state(state.rng)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> TrainState:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only); ``mmap``
    maps the tensors instead of reading them (to read where a run stands)."""
    path = Path(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # a truncated or foreign file
        raise ProtoclipError(
            f"Checkpoint {path} cannot be read ({type(exc).__name__}); delete it to fall back to the previous one."
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or any(k not in data for k in _REQUIRED):
        raise ProtoclipError(f"{path} is not a protoclip checkpoint (format {FORMAT}); pass a step-*.pt of a run.")
    return TrainState(**{f.name: data[f.name] for f in dataclasses.fields(TrainState) if f.name in data})


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])
