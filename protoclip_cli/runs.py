"""Reading a training run back: its recipe and a model with a checkpoint's weights.

Layout of ``runs/<run>/`` (see docs/training.md): ``config.toml`` (the resolved recipe),
``manifest.json``, ``checkpoints/step-<8 digits>.pt``, ``episodes/plan.json``,
``episodes/<n>/prototypes.h5``, ``metrics.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protoclip_cli.errors import MissingInputError
from protoclip_cli.recipes import TrainConfig

__all__ = ["latest_checkpoint", "load_run_config", "load_run_model"]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (``checkpoints/step-*.pt``), or None."""
    from protoclip_cli.training.checkpoint import latest_checkpoint as _latest

    return _latest(run_dir)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved recipe a run was trained with (``runs/<run>/config.toml``)."""
    from protoclip_cli import config as config_io

    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise MissingInputError(
            f"No training run at {run_dir} (config.toml is missing). Run `protoclip train recipes/synthetic.toml` first."
        )
    return config_io.load(TrainConfig, path)


def load_run_model(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"):
    """Rebuild a run's model with a checkpoint's weights (the latest when ``checkpoint`` is None).

    Returns ``(model, config, info)``: the :class:`~protoclip_cli.core.model.ProtoCLIP` in eval mode
    on ``device``, the run's :class:`TrainConfig`, and ``info`` = ``{"path", "episode",
    "batches_done", "steps_in_episode", "global_step", "total_steps", "complete"}`` (``complete``:
    the checkpoint closes the whole run).
    """
    from protoclip_cli.core.model import build_model
    from protoclip_cli.training.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise MissingInputError(
            f"Run {run_dir} has no checkpoint yet; run `protoclip train {run_dir / 'config.toml'}` to train it."
        )
    if not path.is_file():
        raise MissingInputError(f"Checkpoint {path} does not exist; `ls {run_dir / 'checkpoints'}` lists the run's.")
    state = load_checkpoint(path)
    model = build_model(config.model)
    model.load_state_dict(state["model"])
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
