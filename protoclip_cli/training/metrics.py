"""``runs/<run>/metrics.jsonl``: one JSON object per logged step and per episode.

Step lines: ``{"kind": "step", "step", "episode", "lr", "lr_visual", "samples_per_s", <loss terms and
diagnostics of core.losses: "total", "clip", "proto", "acc_*", "modality_gap", "feature_std_*",
"temperature*">, "logit_scale", "logit_scale_proto"}`` (prototype terms only in prototype episodes). Episode lines: ``{"kind": "episode", "episode", "step", "phase", "samples",
"steps", "clusters": {modality: {"nonempty", "max_size", "objective"}}, "seconds": {"extract",
"cluster", "train"}, "broken"}``. Only rank 0 writes; TensorBoard scalars mirror the step lines.

With ``logging.wandb`` every line also goes to Weights & Biases at ``step`` = the global step: a
step line's numbers under their own names, an episode line's under ``episode/`` with nested keys
joined by ``/`` (``episode/seconds/extract``); strings (``kind``, ``phase``) stay in the file. The
wandb run id is kept in the run folder (``RunDir.wandb_id_file``), so a resumed run continues the
same wandb run.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from protoclip_cli.artifacts import write_text
from protoclip_cli.config import to_dict
from protoclip_cli.console import warn
from protoclip_cli.errors import ProtoclipError, write_error
from protoclip_cli.runs import RunDir

if TYPE_CHECKING:
    from protoclip_cli.configs.train import TrainConfig


def batch_diagnostics(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Both logit scales of a batch (the losses report the temperatures, gap and spread)."""
    diagnostics = {"logit_scale": float(outputs["logit_scale"].detach().float().mean())}
    if outputs.get("logit_scale_proto") is not None:
        diagnostics["logit_scale_proto"] = float(outputs["logit_scale_proto"].detach().float().mean())
    return diagnostics


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def wandb_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record as wandb keys (see the module docstring)."""
    prefix = "episode/" if record.get("kind") == "episode" else ""
    values: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{name}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[name] = value

    for name, value in record.items():
        if name not in ("kind", "step"):
            add(prefix + name, value)
    return values


class WandbMirror:
    """One wandb run per training run: started (or resumed, by the id in the run folder) on rank 0."""

    def __init__(self, run: RunDir, config: "TrainConfig") -> None:
        try:
            import wandb
        except ImportError:
            raise ProtoclipError(
                "logging.wandb is on but wandb is not installed; `pip install wandb`, or set logging.wandb = false."
            ) from None

        logging = config.logging
        run_id = run.wandb_run_id() or secrets.token_hex(4)  # wandb's own ids are 8 lowercase alphanumerics
        try:
            self.run = wandb.init(
                project=logging.wandb_project, entity=logging.wandb_entity or None, name=logging.wandb_name or config.name,
                id=run_id, resume="allow", dir=str(run.path), config=to_dict(config),
            )
        except Exception as error:  # wandb raises its own errors (no API key, no network, ...)
            raise ProtoclipError(
                f"wandb could not start ({str(error).splitlines()[0] if str(error) else type(error).__name__}); run "
                "`wandb login`, or set WANDB_MODE=offline to log to the run folder and `wandb sync` later."
            ) from error
        run.record_wandb_run_id(run_id)

    def log(self, record: dict[str, Any]) -> None:
        values = wandb_values(record)
        if values:
            self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """Appends metric lines (rank 0 only) and mirrors them to TensorBoard and wandb when asked."""

    @classmethod
    def for_run(cls, run_dir: Path, config: "TrainConfig", enabled: bool) -> "MetricsLog":
        """The log of a training run, with the mirrors its recipe's ``logging`` section asks for."""
        log = cls(run_dir, enabled, tensorboard=config.logging.tensorboard)
        if enabled and config.logging.wandb:
            log._wandb = WandbMirror(RunDir(Path(run_dir)), config)
        return log

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.path = RunDir(Path(run_dir)).metrics_file
        self.enabled = enabled
        self._writer = None
        self._wandb: WandbMirror | None = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional

                warn("logging.tensorboard is on but tensorboard is not installed (pip install 'protoclip[tensorboard]').")
            else:
                self._writer = SummaryWriter(str(RunDir(Path(run_dir)).tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = _plain(record)
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        if self._writer is not None and record.get("kind") == "step":
            for name, value in record.items():
                if isinstance(value, (int, float)) and name not in ("step", "kind"):
                    self._writer.add_scalar(name, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(record)

    def truncate_after(self, global_step: int, episode: int) -> None:
        """Drop lines a killed run wrote past the checkpoint being resumed from."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if record.get("kind") == "episode" and record.get("episode", 0) >= episode:
                continue
            if record.get("step", 0) > global_step:
                continue
            kept.append(line)
        write_text(self.path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
