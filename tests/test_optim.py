"""Parameter groups, cosine schedules and learning-rate application."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from protoclip_cli.core.optim import build_optimizer, cosine_schedule, parameter_groups, set_learning_rates
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.configs.train import OptimConfig


class TinyClip(nn.Module):
    """Mimics the naming of open_clip's CLIP inside ProtoCLIP."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4))
        self.transformer = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.token_embedding = nn.Embedding(10, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))


class TinyProtoClip(nn.Module):
    def __init__(self, with_visual_parameters: bool):
        super().__init__()
        self.clip = TinyClip()
        self.image_head = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
        self.text_head = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
        self.logit_scale_proto = nn.Parameter(torch.tensor(2.0))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        if with_visual_parameters:
            # Declare only the conv as the image tower, to show the method wins over the name rule.
            self.visual_parameters = lambda: self.clip.visual[0].parameters()


def names_by_group(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    name_of = {id(parameter): name for name, parameter in model.named_parameters()}
    return {group["name"]: {name_of[id(parameter)] for parameter in group["params"]} for group in groups}


def test_groups_split_tower_and_decay_by_name():
    model = TinyProtoClip(with_visual_parameters=False)
    groups = parameter_groups(model, weight_decay=0.3)
    assert [set(group) for group in groups] == [{"params", "weight_decay", "name", "visual"}] * 4
    by_name = {group["name"]: group for group in groups}
    assert {name: (group["weight_decay"], group["visual"]) for name, group in by_name.items()} == {
        "visual_decay": (0.3, True),
        "visual_no_decay": (0.0, True),
        "rest_decay": (0.3, False),
        "rest_no_decay": (0.0, False),
    }
    names = names_by_group(model, groups)
    assert names["visual_decay"] == {"clip.visual.0.weight"}
    assert names["visual_no_decay"] == {"clip.visual.0.bias", "clip.visual.1.weight", "clip.visual.1.bias"}
    assert names["rest_decay"] == {"clip.transformer.0.weight", "clip.token_embedding.weight"}
    head_names = {name for name, _ in model.named_parameters() if name.startswith(("image_head", "text_head"))}
    assert names["rest_no_decay"] == {
        "clip.transformer.0.bias",
        "clip.transformer.1.weight",
        "clip.transformer.1.bias",
        "clip.logit_scale",
        "logit_scale_proto",
    } | head_names
    assert "frozen" not in set().union(*names.values())


def test_visual_parameters_method_decides_the_tower():
    model = TinyProtoClip(with_visual_parameters=True)
    names = names_by_group(model, parameter_groups(model, weight_decay=0.1))
    assert names["visual_decay"] == {"clip.visual.0.weight"}
    assert names["visual_no_decay"] == {"clip.visual.0.bias"}
    assert {"clip.visual.1.weight", "clip.visual.1.bias"} <= names["rest_no_decay"]


def formula(base_lr: float, warmup: int, end: int, step: int) -> float:
    if step >= end:
        return 0.0
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (end - warmup))) * base_lr


@pytest.mark.parametrize(("warmup", "total", "end"), [(10, 100, None), (0, 50, None), (5, 60, 40), (8, 30, 8)])
def test_cosine_schedule_follows_the_formula(warmup, total, end):
    base_lr = 3e-4
    schedule = cosine_schedule(base_lr, warmup, total, end)
    assert isinstance(schedule, np.ndarray) and schedule.shape == (total,)
    expected = [formula(base_lr, warmup, total if end is None else end, step) for step in range(total)]
    assert np.allclose(schedule, expected, rtol=1e-12, atol=0)


def test_schedule_landmarks_and_end_step_zeros():
    schedule = cosine_schedule(1.0, 4, 20, end_step=12)
    assert schedule[0] == pytest.approx(0.25) and schedule[3] == pytest.approx(1.0)
    assert schedule[4] == pytest.approx(1.0)  # the cosine starts at the peak
    assert schedule[8] == pytest.approx(0.5)  # half-way between warm-up end (4) and end_step (12)
    assert np.all(schedule[12:] == 0.0) and np.all(schedule[:12] > 0.0)
    with pytest.raises(ProtoclipError, match="non-negative"):
        cosine_schedule(1.0, -1, 10)


def test_optimizer_and_learning_rates_follow_the_schedules():
    model = TinyProtoClip(with_visual_parameters=False)
    cfg = OptimConfig(lr=2e-3, weight_decay=0.2, beta1=0.8, beta2=0.95, eps=1e-6)
    optimizer = build_optimizer(parameter_groups(model, cfg.weight_decay), cfg, fused=False)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {group["name"]: group["weight_decay"] for group in optimizer.param_groups} == {
        "visual_decay": 0.2,
        "visual_no_decay": 0.0,
        "rest_decay": 0.2,
        "rest_no_decay": 0.0,
    }
    assert all(group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 for group in optimizer.param_groups)
    schedules = {"visual": cosine_schedule(cfg.lr, 2, 10, end_step=6), "rest": cosine_schedule(cfg.lr, 2, 10)}
    for step in (0, 3, 7, 25):
        applied = set_learning_rates(optimizer, step, schedules)
        index = min(step, 9)
        assert applied == {"visual": schedules["visual"][index], "rest": schedules["rest"][index]}
        for group in optimizer.param_groups:
            assert group["lr"] == schedules["visual" if group["visual"] else "rest"][index]
    set_learning_rates(optimizer, 7, schedules)
    assert all(group["lr"] == 0.0 for group in optimizer.param_groups if group["visual"])  # locked (LiT)
    assert all(group["lr"] > 0.0 for group in optimizer.param_groups if not group["visual"])
