"""Optimisation: AdamW parameter groups and learning-rate schedules precomputed per step.

The image tower gets its own groups so that its schedule can end early: from the LiT start on its
learning rate is 0 while the text tower keeps training.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from protoclip_cli.configs.train import OptimConfig
from protoclip_cli.errors import ProtoclipError

NO_DECAY_PREFIXES = ("image_head", "text_head")


def _skips_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    # Decay on gains, biases and norms only shrinks scales; on temperatures (and the sigmoid loss's
    # logit bias) it fights the loss; the reference recipe also leaves the projection heads undecayed.
    return parameter.ndim < 2 or "logit_scale" in name or "logit_bias" in name or name.startswith(NO_DECAY_PREFIXES)


def _visual_parameter_ids(model: nn.Module) -> set[int]:
    if hasattr(model, "visual_parameters"):
        return {id(parameter) for parameter in model.visual_parameters()}
    return {id(parameter) for name, parameter in model.named_parameters() if name.startswith("clip.visual.")}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters of ``model`` split by tower (visual or not) and by weight decay.

    Each group is a dict with ``params``, ``weight_decay``, ``name`` (``visual_decay``,
    ``visual_no_decay``, ``rest_decay``, ``rest_no_decay``) and ``visual`` (bool); empty groups
    are left out. Visual parameters are ``model.visual_parameters()`` when the model has it,
    else those named ``clip.visual.*``.
    """
    visual_ids = _visual_parameter_ids(model)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        key = (id(parameter) in visual_ids, not _skips_weight_decay(name, parameter))
        buckets.setdefault(key, []).append(parameter)
    groups = []
    for visual in (True, False):
        for decay in (True, False):
            params = buckets.get((visual, decay))
            if params:
                groups.append(
                    {
                        "params": params,
                        "weight_decay": weight_decay if decay else 0.0,
                        "name": f"{'visual' if visual else 'rest'}_{'decay' if decay else 'no_decay'}",
                        "visual": visual,
                    }
                )
    return groups


def cosine_schedule(base_lr: float, warmup_steps: int, total_steps: int, end_step: int | None = None,
                    positions: np.ndarray | None = None) -> np.ndarray:
    """One learning rate per step (length ``total_steps``, or one per entry of ``positions``).

    Linear warm-up ``base_lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps,
    then ``base_lr * (1 + cos(pi * (step - warmup_steps) / (end - warmup_steps))) / 2`` with
    ``end = end_step`` (default ``total_steps``), and 0 from ``end_step`` on. ``positions`` evaluates
    the same curve at other (fractional) steps: a run resumed on another number of ranks walks its
    first launch's schedule with steps of another size (``RunLayout.schedule_positions``).
    """
    if base_lr < 0 or warmup_steps < 0 or total_steps < 0:
        raise ProtoclipError(
            f"Learning-rate schedule needs non-negative values, got lr={base_lr}, warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}."
        )
    end = total_steps if end_step is None else end_step
    if end < 0:
        raise ProtoclipError(f"The schedule's end step must be non-negative, got {end}.")
    steps = np.arange(total_steps, dtype=np.float64) if positions is None else np.asarray(positions, dtype=np.float64)
    decay_length = max(end - warmup_steps, 1)
    cosine = 0.5 * (1.0 + np.cos(np.pi * (steps - warmup_steps) / decay_length)) * base_lr
    warmup = base_lr * (steps + 1) / max(warmup_steps, 1)
    lrs = np.where(steps < warmup_steps, warmup, cosine)
    return np.where(steps < end, lrs, 0.0)


def build_optimizer(groups: list[dict], cfg: OptimConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the recipe's lr, betas and epsilon.

    ``fused`` kernels exist on CUDA and on CPU (where they take about a third off a tiny model's step).
    """
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
    )


def set_learning_rates(
    optimizer: torch.optim.Optimizer, step: int, schedules: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Set every group's lr for ``step`` from ``schedules["visual"]`` or ``schedules["rest"]``.

    Steps past the end of a schedule keep its last value (an episode can stream a few more
    batches than estimated). Returns the applied rates by schedule name, for logging.
    """
    applied = {}
    for group in optimizer.param_groups:
        key = "visual" if group.get("visual", False) else "rest"
        schedule = schedules[key]
        if len(schedule) == 0:
            raise ProtoclipError(f"The {key} learning-rate schedule is empty; the run has no training steps.")
        lr = float(schedule[min(step, len(schedule) - 1)])
        group["lr"] = lr
        applied[key] = lr
    return applied
