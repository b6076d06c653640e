"""Every shipped recipe validates against TrainConfig, and the reference recipes carry the paper's values."""

from __future__ import annotations

from pathlib import Path

import pytest

import numpy as np

from protoclip_cli import config as config_io
from protoclip_cli.configs.train import TrainConfig

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
    assert (single.model.arch, single.data.batch_size, single.optim.lr, single.schedule.warmup_steps) == ("RN50-quickgelu", 64, 5e-5, 2000)
    assert (single.optim.weight_decay, single.optim.grad_clip, single.proto.k, single.proto.iterations, single.proto.restarts) == (0.5, 10.0, 20000, 20, 3)
    assert (single.model.projection_dim, single.model.projection_hidden_dim, single.model.projection_n_layers) == (128, 2048, 1)
    assert (single.loss.target_temperature, single.loss.pbt, single.data.augmentation) == (0.01, True, "light")
    assert (single.schedule.episodes, single.data.episode_size, single.schedule.infonce_warmup_episodes, single.schedule.lit_start_episode) == (100, 200000, 1, -2)
    eight = config_io.load(TrainConfig, RECIPES[0].parent / "cc3m-8gpu.toml")
    assert (eight.data.batch_size, eight.optim.lr, eight.schedule.warmup_steps, eight.schedule.episodes) == (64, 5e-4, 15625, 400)
    clip = config_io.load(TrainConfig, RECIPES[0].parent / "cc3m-clip.toml")
    assert (clip.optim.lr, clip.data.batch_size, clip.data.augmentation, clip.schedule.episodes) == (5e-5, 64, "rrc", 8)


def _reference_phase(epoch: int, epochs: int, infonce_warmup_epoch: int) -> str:
    """What megvii-research/protoclip trains epoch ``epoch`` with when run as its README says
    (``--epochs E --lit-start-epoch E-1``): src/training/train.py uses the CLIP loss only when
    ``lit_start_epoch > 0 and epoch >= lit_start_epoch - 1`` (LiT) or ``epoch < infonce_warmup_epoch``."""
    lit_start_epoch = epochs - 1
    if lit_start_epoch > 0 and epoch >= lit_start_epoch - 1:
        return "lit"
    return "warmup" if epoch < infonce_warmup_epoch else "proto"


def _reference_visual_lr(steps: np.ndarray, lr: float, warmup: int, visual_steps: int) -> np.ndarray:
    """src/training/scheduler.py ``protoclip_cosine_lr``, visual part, with ``visual_steps =
    num_batches * (lit_start_epoch - 1)`` from src/training/main.py."""
    cosine = 0.5 * (1 + np.cos(np.pi * (steps - warmup) / (visual_steps - warmup))) * lr
    lrs = np.where(steps < warmup, lr * (steps + 1) / warmup, cosine)
    return np.where(steps > visual_steps, 0.0, lrs)


@pytest.mark.parametrize("name, samples_per_step", [("cc3m.toml", 64), ("cc3m-8gpu.toml", 512)])
def test_reference_recipes_end_with_the_references_two_lit_episodes(name, samples_per_step):
    from protoclip_cli.core.optim import cosine_schedule
    from protoclip_cli.stages.train import use_teacher
    from protoclip_cli.training.episodes import RunLayout, episode_phase, lit_start_episode

    config = config_io.load(TrainConfig, RECIPES[0].parent / name)
    episodes = config.schedule.episodes
    phases = [episode_phase(config, e, use_teacher(config)).name for e in range(episodes)]
    expected = [_reference_phase(e, episodes, config.schedule.infonce_warmup_episodes) for e in range(episodes)]
    assert phases == expected
    assert phases[-3:] == ["proto", "lit", "lit"] and phases[0] == "warmup"
    assert all(episode_phase(config, e, True).lock_visual == (e >= episodes - 2) for e in range(episodes))

    # The image tower's cosine schedule ends where the reference's does: at the first LiT step.
    per_episode = config.data.episode_size // samples_per_step
    layout = RunLayout([per_episode] * episodes, lit_start_episode(config))
    lit_step = layout.first_step(layout.lit_start)
    ours = cosine_schedule(config.optim.lr, config.schedule.warmup_steps, layout.total_steps, end_step=lit_step)
    steps = np.arange(layout.total_steps, dtype=np.float64)
    reference = _reference_visual_lr(steps, config.optim.lr, config.schedule.warmup_steps, per_episode * (episodes - 2))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12 * config.optim.lr)
    assert lit_step == per_episode * (episodes - 2) and ours[lit_step - 1] > 0 and not ours[lit_step:].any()


def test_reference_recipes_build_the_references_quickgelu_rn50_and_it_exports(tmp_path):
    """The reference's CLIP class forces QuickGELU; open_clip 3.x names that text tower RN50-quickgelu.
    A run of it exports and evaluates under that name, while "RN50" (nn.GELU) gives other embeddings."""
    import torch
    from open_clip.transformer import QuickGELU

    from protoclip_cli.core.model import build_model
    from protoclip_cli.evaluation.tasks.model import load_open_clip
    from protoclip_cli.stages.export import ROUND_TRIP_ATOL, load_open_clip_file, round_trip_difference

    configs = [config_io.load(TrainConfig, RECIPES[0].parent / n) for n in ("cc3m.toml", "cc3m-8gpu.toml", "cc3m-clip.toml")]
    assert {c.model.arch for c in configs} == {"RN50-quickgelu"}
    torch.manual_seed(0)
    model = build_model(configs[0].model)
    activations = [m for m in model.clip.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))]
    assert len(activations) == 12 and all(isinstance(m, QuickGELU) for m in activations)  # one per text block
    assert not any(isinstance(m, (QuickGELU, torch.nn.GELU)) for m in model.clip.visual.modules())

    path = tmp_path / "rn50-quickgelu.pt"
    torch.save(model.clip.state_dict(), path)
    reload = lambda: load_open_clip_file("RN50-quickgelu", path)  # noqa: E731
    assert round_trip_difference(model, "RN50-quickgelu", reload) <= ROUND_TRIP_ATOL  # the export's own check

    evaluated = load_open_clip("RN50-quickgelu", str(path), "cpu")  # evaluate --open-clip
    gelu = load_open_clip("RN50", str(path), "cpu")  # the same weights under open_clip 3.x's RN50
    tokens = evaluated.tokenizer(["a photo of a dog", "a black and white photo of the big truck."])
    with torch.no_grad():
        ours = model.eval().encode_text(tokens)
        faithful = torch.nn.functional.normalize(evaluated.clip.encode_text(tokens), dim=-1)
        other = torch.nn.functional.normalize(gelu.clip.encode_text(tokens), dim=-1)
    torch.testing.assert_close(faithful, ours, atol=ROUND_TRIP_ATOL, rtol=0)
    assert (other - ours).abs().max() > 100 * ROUND_TRIP_ATOL


def test_the_finetune_recipe_starts_from_a_released_tag_of_its_architecture():
    """finetune-vit-b-32.toml: a pretrained tag open_clip knows for its architecture (with the activation
    the weights were trained with), and the fine-tune choices docs/training.md justifies."""
    import open_clip

    recipe = config_io.load(TrainConfig, RECIPES[0].parent / "finetune-vit-b-32.toml")
    released = open_clip.get_pretrained_cfg(recipe.model.arch, recipe.model.pretrained)
    assert released and bool(released.get("quick_gelu")) == bool(open_clip.get_model_config(recipe.model.arch).get("quick_gelu"))
    assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.schedule.warmup_steps) == (1e-5, 0.1, 100)
    assert (recipe.optim.beta2, recipe.optim.eps, recipe.data.augmentation) == (0.98, 1e-6, "rrc")
    assert (recipe.schedule.infonce_warmup_episodes, recipe.schedule.lit_start_episode) == (0, -1)
