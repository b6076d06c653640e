"""Checkpoints of a run: ``runs/<run>/checkpoints/step-<global step, 8 digits>.pt``.

Each file is one ``torch.save`` dict of tensors and plain types only, so it loads with
``torch.load(weights_only=True)``:

``format`` (int), ``model`` (state dict without DDP/compile prefixes), ``optimizer``, ``episode``
(the episode in progress or just finished), ``batches_done`` (steps done in that episode),
``steps_in_episode``, ``global_step``, ``total_steps``, ``world_size``, ``workers``, ``config``
(the resolved recipe as plain data), ``rng`` (``torch`` CPU state, ``cuda`` states, as uint8 tensors).

Files are written through :func:`protoclip_cli.artifacts.atomic_path`: a process killed while
writing leaves only a hidden ``.step-*.pt.*.tmp`` file, which :func:`list_checkpoints` never returns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from protoclip_cli.artifacts import atomic_path
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.runs import RunDir

FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return RunDir(Path(run_dir)).checkpoints_dir


def checkpoint_path(run_dir: str | Path, global_step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{global_step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest (lowest step) first; temporary files are ignored."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``state['global_step']``; keep the newest ``keep``."""
    path = checkpoint_path(run_dir, int(state["global_step"]))
    # Through a file object: a failed write then carries its OSError (full disk, ...) for the message.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
    for old in list_checkpoints(run_dir)[: -max(1, keep)]:
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ProtoclipError(
            f"Checkpoint {path} cannot be read ({type(exc).__name__}); delete it to fall back to the previous one."
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise ProtoclipError(f"{path} is not a protoclip checkpoint (format {FORMAT}); pass a step-*.pt of a run.")
    return state
