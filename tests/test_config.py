"""The recipe loader: typed fields, unknown keys, wrong types, --set overrides, TOML round trip."""

from __future__ import annotations

import dataclasses

import pytest

from protoclip_cli import config
from protoclip_cli.config import ConfigError
from protoclip_cli.recipes import TrainConfig


def write(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_loads_sections_and_coerces_ints_to_floats(tmp_path):
    path = write(tmp_path, 'name = "x"\n[optim]\nlr = 1\n[data]\nbatch_size = 32\n')
    cfg = config.load(TrainConfig, path)
    assert cfg.name == "x"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 32
    # untouched fields keep their defaults
    assert cfg.proto == TrainConfig().proto


def test_unknown_key_names_file_key_and_allowed_names(tmp_path):
    path = write(tmp_path, "[optim]\nlearning_rate = 1e-4\n")
    with pytest.raises(ConfigError) as err:
        config.load(TrainConfig, path)
    message = str(err.value)
    assert str(path) in message
    assert "optim.learning_rate" in message
    assert "lr" in message and "weight_decay" in message


def test_unknown_section(tmp_path):
    path = write(tmp_path, "[optimiser]\nlr = 1e-4\n")
    with pytest.raises(ConfigError, match="unknown key 'optimiser'.*the top level.*optim"):
        config.load(TrainConfig, path)


def test_wrong_type_is_rejected(tmp_path):
    path = write(tmp_path, '[data]\nbatch_size = "large"\n')
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int, got str 'large'"):
        config.load(TrainConfig, path)
    path = write(tmp_path, "[data]\nbatch_size = 1.5\n")
    with pytest.raises(ConfigError, match="expected int"):
        config.load(TrainConfig, path)
    path = write(tmp_path, "[model]\nheads = 1\n")
    with pytest.raises(ConfigError, match="model.heads: expected bool"):
        config.load(TrainConfig, path)


def test_literal_values_are_checked(tmp_path):
    path = write(tmp_path, '[proto]\nbackend = "sklearn"\n')
    with pytest.raises(ConfigError, match="proto.backend: 'sklearn' is not one of 'auto', 'torch', 'faiss'"):
        config.load(TrainConfig, path)


def test_set_overrides_any_field(tmp_path):
    path = write(tmp_path, "[optim]\nlr = 1e-4\n")
    cfg = config.load(
        TrainConfig,
        path,
        ["optim.lr=3e-4", "data.dataset=cc3m", "model.heads=false", "name=my-run", "proto.k=7"],
    )
    assert cfg.optim.lr == 3e-4
    assert cfg.data.dataset == "cc3m"
    assert cfg.model.heads is False
    assert cfg.name == "my-run"
    assert cfg.proto.k == 7


def test_set_is_validated_like_the_file(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        config.load(TrainConfig, path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        config.load(TrainConfig, path, ["optim.lr"])
    with pytest.raises(ConfigError, match="expected int"):
        config.load(TrainConfig, path, ["data.batch_size=big"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(TrainConfig, tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        config.load(TrainConfig, write(tmp_path, "[optim\n"))


def test_configs_are_frozen():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_dump_round_trips(tmp_path):
    cfg = config.load(TrainConfig, write(tmp_path, ""), ["optim.lr=2e-3", "proto.teacher=all-MiniLM-L6-v2"])
    dumped = tmp_path / "resolved.toml"
    dumped.write_text(config.dumps(cfg))
    assert config.load(TrainConfig, dumped) == cfg


def test_every_field_has_help():
    rows = config.explain(TrainConfig)
    assert {row[0] for row in rows} >= {"optim.lr", "proto.k", "data.episode_size", "loss.target_temperature"}
    assert all(row[3] for row in rows), [row[0] for row in rows if not row[3]]
