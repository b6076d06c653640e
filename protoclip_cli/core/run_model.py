"""A trained run's model: its recipe's architecture with a checkpoint's weights.

evaluate, cluster and export read runs through :func:`load_run_model`; the run's layout is
:class:`~protoclip_cli.runs.RunDir`'s and the checkpoint's contents :mod:`protoclip_cli.core.checkpoint`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protoclip_cli.configs.train import TrainConfig
from protoclip_cli.core.checkpoint import TrainState, load_checkpoint, load_weights
from protoclip_cli.core.model import ProtoCLIP, build_model
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.runs import RunDir


def load_run_state(run: RunDir, checkpoint: str | Path | None = None) -> tuple[Path, TrainState]:
    """(path, state) of ``checkpoint`` or of the run's newest one. A running train deletes its older
    checkpoints: the newest of a moment ago may be gone when it is opened, so look again."""
    for attempt in range(3):
        path = run.checkpoint(checkpoint)
        try:
            return path, load_checkpoint(path)
        except ProtoclipError:
            if checkpoint or path.exists() or attempt == 2:
                raise
    raise AssertionError("unreachable")


def load_run_model(run: RunDir | str | Path, checkpoint: str | Path | None = None,
                   device: str = "cpu") -> tuple[ProtoCLIP, TrainConfig, dict[str, Any]]:
    """Rebuild the run's model with a checkpoint's weights (the newest when ``checkpoint`` is None).

    Returns ``(model, config, info)``: the :class:`ProtoCLIP` in eval mode on ``device``, the run's
    :class:`TrainConfig`, and ``info`` = :meth:`TrainState.position` (``path``, ``episode``,
    ``batches_done``, ``steps_in_episode``, ``global_step``, ``total_steps``, ``complete``).
    """
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    config = run.config()
    path, state = load_run_state(run, checkpoint)
    # The checkpoint holds every weight: the run's starting weights (a file, a tag, a hub repository)
    # are not needed to read it, only the preprocessing they came with.
    model = build_model(config.model, contrastive=config.loss.contrastive, weights=False, preprocess=state.preprocess)
    load_weights(model, state.model, path, "pass a checkpoint of this run (--checkpoint), or move this one away "
                 "to read the run's previous one")
    model.to(device).eval()
    return model, config, state.position(path)
