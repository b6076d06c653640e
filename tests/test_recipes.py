"""Every shipped recipe validates against TrainConfig, and the reference recipes carry the paper's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from protoclip_cli import config as config_io
from protoclip_cli.recipes import TrainConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def test_the_expected_recipes_exist():
    assert {p.name for p in RECIPES} >= {"synthetic.toml", "synthetic-clip.toml", "cc3m.toml", "cc3m-clip.toml", "cc3m-8gpu.toml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_round_trips(path, tmp_path):
    config = config_io.load(TrainConfig, path)
    copy = tmp_path / "copy.toml"
    copy.write_text(config_io.dumps(config))
    assert config_io.load(TrainConfig, copy) == config
    if not config.proto.enabled:  # a CLIP baseline: no heads, one episode per pass, no LiT finish
        assert not config.model.heads and config.data.episode_size == 0 and not config.proto.teacher
        assert config.schedule.lit_start_episode >= config.schedule.episodes


def test_recipes_write_to_distinct_run_folders():
    names = [config_io.load(TrainConfig, p).name for p in RECIPES]
    assert len(set(names)) == len(names)


def test_reference_recipes_match_the_paper():
    single = config_io.load(TrainConfig, RECIPES[0].parent / "cc3m.toml")
    assert (single.model.arch, single.data.batch_size, single.optim.lr, single.schedule.warmup_steps) == ("RN50", 64, 5e-5, 2000)
    assert (single.optim.weight_decay, single.optim.grad_clip, single.proto.k, single.proto.iterations, single.proto.restarts) == (0.5, 10.0, 20000, 20, 3)
    assert (single.model.projection_dim, single.model.projection_hidden_dim, single.model.projection_n_layers) == (128, 2048, 1)
    assert (single.loss.target_temperature, single.loss.pbt, single.data.augmentation) == (0.01, True, "light")
    assert (single.schedule.episodes, single.data.episode_size, single.schedule.infonce_warmup_episodes, single.schedule.lit_start_episode) == (100, 200000, 1, -1)
    eight = config_io.load(TrainConfig, RECIPES[0].parent / "cc3m-8gpu.toml")
    assert (eight.data.batch_size, eight.optim.lr, eight.schedule.warmup_steps, eight.schedule.episodes) == (64, 5e-4, 15625, 400)
    clip = config_io.load(TrainConfig, RECIPES[0].parent / "cc3m-clip.toml")
    assert (clip.optim.lr, clip.data.batch_size, clip.data.augmentation, clip.schedule.episodes) == (5e-5, 64, "rrc", 8)
