"""``runs/<run>/metrics.jsonl``: one JSON object per logged step and per episode.

Step lines: ``{"kind": "step", "step", "episode", "lr", "lr_visual", "samples_per_s", <loss terms and
diagnostics of core.losses: "total", "clip", "proto", "acc_*", "modality_gap", "feature_std_*",
"temperature*">, "logit_scale", "logit_scale_proto"}`` (prototype terms only in prototype episodes). Episode lines: ``{"kind": "episode", "episode", "step", "phase", "samples",
"steps", "clusters": {modality: {"nonempty", "max_size", "objective"}}, "seconds": {"extract",
"cluster", "train"}, "broken"}``. Only rank 0 writes; TensorBoard scalars mirror the step lines.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from protoclip_cli.artifacts import write_text
from protoclip_cli.errors import write_error
from protoclip_cli.runs import RunDir


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


class MetricsLog:
    """Appends metric lines (rank 0 only) and mirrors step scalars to TensorBoard when asked."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.path = RunDir(Path(run_dir)).metrics_file
        self.enabled = enabled
        self._writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                from protoclip_cli.console import warn

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


