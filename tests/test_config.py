"""The recipe loader: typed fields, unknown keys, wrong types, --set overrides, TOML round trip."""

from __future__ import annotations

import dataclasses

import pytest

from protoclip_cli import config
from protoclip_cli.config import ConfigError
from protoclip_cli.configs.train import TrainConfig


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
        ["optim.lr=3e-4", "data.dataset=cc3m", "model.heads=false", "proto.enabled=false", "name=my-run", "proto.k=7"],
    )
    assert cfg.optim.lr == 3e-4
    assert cfg.data.dataset == "cc3m"
    assert cfg.model.heads is False and cfg.proto.enabled is False
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


def test_binary_files_and_folders_as_recipes_are_one_sentence(tmp_path):
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\x14\x00\x00\x08\x08\x00\xa7\x9c\xff\xfe archive")
    with pytest.raises(ConfigError, match=r"model.pt is not a text file \(byte \d+ is not UTF-8\); pass a TOML recipe"):
        config.load(TrainConfig, binary)
    with pytest.raises(ConfigError, match="is a folder; pass a TOML file"):
        config.load(TrainConfig, tmp_path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", r"optim.lr is -1.0; it must be positive \(change it with --set optim.lr=...\)"),
        ("optim.lr=0", "optim.lr is 0.0; it must be positive"),
        ("optim.lr=nan", "optim.lr is nan; it must be positive"),
        ("optim.weight_decay=-0.1", "optim.weight_decay is -0.1; it must be 0 or more"),
        ("optim.beta2=1.0", r"optim.beta2 is 1.0; it must be in \[0, 1\)"),
        ("optim.grad_clip=-1", "optim.grad_clip is -1.0"),
        ("proto.k=0", "proto.k is 0; it must be positive"),
        ("proto.iterations=0", "proto.iterations is 0; it must be positive"),
        ("proto.restarts=0", "proto.restarts is 0"),
        ("proto.teacher_k=-1", "proto.teacher_k is -1; it must be 0 or more"),
        ("loss.target_temperature=-0.01", "loss.target_temperature is -0.01; it must be 0 or more"),
        ("loss.w_proto=-1", "loss.w_proto is -1.0"),
        ("data.episode_size=-5", "data.episode_size is -5"),
        ("schedule.warmup_steps=-1", "schedule.warmup_steps is -1"),
        ("model.projection_dim=0", "model.projection_dim is 0; it must be positive"),
    ],
)
def test_numeric_ranges_are_checked_when_the_recipe_is_loaded(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(TrainConfig, write(tmp_path, ""), [override])


def test_prototype_ranges_do_not_bind_a_clip_recipe(tmp_path):
    clip = config.load(TrainConfig, write(tmp_path, ""), ["proto.enabled=false", "proto.k=0", "model.heads=false"])
    assert clip.proto.k == 0


def test_configs_are_frozen():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_dump_round_trips(tmp_path):
    cfg = config.load(TrainConfig, write(tmp_path, ""), ["optim.lr=2e-3", "proto.teacher=all-MiniLM-L6-v2"])
    dumped = tmp_path / "resolved.toml"
    dumped.write_text(config.dumps(cfg))
    assert config.load(TrainConfig, dumped) == cfg


def test_training_options_load_from_a_recipe(tmp_path):
    path = write(tmp_path, '[loss]\ncontrastive = "sigmoid"\n[model]\ngrad_checkpointing = true\n[optim]\naccum_freq = 4\n')
    cfg = config.load(TrainConfig, path)
    assert cfg.loss.contrastive == "sigmoid" and cfg.model.grad_checkpointing is True and cfg.optim.accum_freq == 4
    defaults = TrainConfig()
    assert defaults.loss.contrastive == "infonce" and defaults.model.grad_checkpointing is False
    assert defaults.optim.accum_freq == 1
    with pytest.raises(ConfigError, match="loss.contrastive: 'siglip' is not one of 'infonce', 'sigmoid'"):
        config.load(TrainConfig, path, ["loss.contrastive=siglip"])


def test_training_md_lists_every_recipe_field_as_explain_does():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    for key, type_name, default, help_text in config.explain(TrainConfig):
        assert f"| `{key}` | {type_name} | `{default}` | {help_text} |" in doc, key


def test_every_field_has_help():
    rows = config.explain(TrainConfig)
    assert {row[0] for row in rows} >= {"optim.lr", "proto.k", "data.episode_size", "loss.target_temperature"}
    assert all(row[3] for row in rows), [row[0] for row in rows if not row[3]]


# -- every config checks itself when it is built -----------------------------------------------------


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TrainConfig(model=dataclasses.replace(TrainConfig().model, heads=False)), "proto.enabled needs projection heads"),
        (lambda: TrainConfig(precision="fp16"), "precision 'fp16' is not one of auto, fp32, bf16"),
        (lambda: TrainConfig(data=dataclasses.replace(TrainConfig().data, augmentation="heavy")),
         "data.augmentation 'heavy' is not one of none, rrc, light"),
        (lambda: TrainConfig(schedule=dataclasses.replace(TrainConfig().schedule, episodes=0)), "schedule.episodes is 0"),
        (lambda: TrainConfig(loss=dataclasses.replace(TrainConfig().loss, contrastive="softmax")),
         "loss.contrastive 'softmax' is not one of infonce, sigmoid"),
        (lambda: TrainConfig(optim=dataclasses.replace(TrainConfig().optim, accum_freq=0)), "optim.accum_freq is 0"),
    ],
)
def test_train_config_rejects_what_types_cannot(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_recipe_inconsistency_fails_when_loaded(tmp_path):
    path = write(tmp_path, "[model]\nheads = false\n")
    with pytest.raises(ConfigError, match="proto.enabled needs projection heads; set model.heads = true"):
        config.load(TrainConfig, path)


def test_stage_configs_name_the_option_to_change():
    from protoclip_cli.configs.cluster import ClusterConfig
    from protoclip_cli.configs.download import DownloadConfig
    from protoclip_cli.configs.evaluate import EvaluateConfig
    from protoclip_cli.configs.export import ExportConfig
    from protoclip_cli.configs.teacher import TeacherConfig

    cases = [
        (lambda: DownloadConfig(resize_mode="stretch"), "--resize-mode 'stretch' is not one of border, keep_ratio"),
        (lambda: DownloadConfig(timeout=0), "--timeout must be at least 1, got 0"),
        (lambda: DownloadConfig(source="cc3m"), "Source 'cc3m' needs a URL list file"),
        (lambda: DownloadConfig(source="url_list", url_list="x.tsv", extra_cols=("status",)), "Extra column 'status' clashes"),
        (lambda: TeacherConfig(chunk_size=0), "--chunk-size must be positive, got 0"),
        (lambda: TeacherConfig(pca_dim=-1), "--pca-dim must be 0"),
        (lambda: TeacherConfig(pca_normalise=True), "--pca-normalise re-normalises PCA's output; pass --pca-dim"),
        (lambda: ClusterConfig(features="f.h5"), "--features needs --k"),
        (lambda: ClusterConfig(backend="sklearn"), "--backend 'sklearn' is not one of auto, torch, faiss"),
        (lambda: ClusterConfig(episode="first"), "--episode first is neither 'last' nor a number"),
        (lambda: EvaluateConfig(task="nonsense"), "Unknown task 'nonsense'"),
        (lambda: EvaluateConfig(probe_method="sgd"), "--probe-method sgd is not lbfgs or adam"),
        (lambda: EvaluateConfig(task="retrieval", dataset="cifar10", root="/data"), "has no data for the retrieval task"),
        (lambda: EvaluateConfig(dataset="imagenet"), "Data set imagenet needs --imagenet-root"),
        (lambda: EvaluateConfig(pretrained="x.pt"), "--pretrained needs --open-clip ARCH"),
        (lambda: ExportConfig(format="onnx"), "Unknown export format 'onnx'; choose one of open_clip"),
    ]
    for build, message in cases:
        with pytest.raises(ConfigError, match=message):
            build()
    # The defaults are valid configs.
    for cls in (ClusterConfig, DownloadConfig, EvaluateConfig, ExportConfig, TeacherConfig, TrainConfig):
        cls()
