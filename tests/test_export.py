"""`export --format open_clip`: open_clip loads the file and gives this project's embeddings."""

from __future__ import annotations

import json

import pytest
import torch

from protoclip_cli.artifacts import file_sha256
from helpers import RUN

torch.set_num_threads(2)
ATOL = 1e-5  # float32 CPU: the same weights and ops, so only summation-order noise is allowed


def test_export_round_trip_through_open_clip(trained_run, synthetic_workspace, tmp_path):
    import open_clip
    from typer.testing import CliRunner

    from protoclip_cli.cli import app
    from protoclip_cli.core.model import get_tokenizer, register_tiny_configs
    from protoclip_cli.data.shards import iter_samples
    from protoclip_cli.data.transforms import decode_image, eval_transform, normalize
    from protoclip_cli.core.run_model import load_run_model

    out = tmp_path / "tiny.pt"
    result = CliRunner().invoke(app, ["export", RUN, "--format", "open_clip", "--out", str(out),
                                      "-w", str(synthetic_workspace.root)])
    assert result.exit_code == 0, result.output
    assert "register_tiny_configs" in result.output

    register_tiny_configs()
    clip, _, preprocess = open_clip.create_model_and_transforms("protoclip-tiny", pretrained=str(out))
    clip.eval()
    model, _, _ = load_run_model(trained_run)
    assert set(torch.load(out, weights_only=True)) == set(model.clip.state_dict())  # towers only, no heads

    samples = [s for _, s in zip(range(8), iter_samples(synthetic_workspace.shards("synthetic", "heldout")))]
    transform = eval_transform(model.image_size)
    images = normalize(torch.stack([transform(decode_image(s.image)) for s in samples]), model.image_mean,
                       model.image_std, "cpu")
    tokens = get_tokenizer("protoclip-tiny")([s.caption for s in samples])
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images, normalize=True), model.encode_image(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(clip.encode_text(tokens, normalize=True), model.encode_text(tokens), atol=ATOL, rtol=0)
    # The manifest is named after the export, so several exports can share a folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt", "tiny.pt.manifest.json"]
    manifest = json.loads((tmp_path / "tiny.pt.manifest.json").read_text())
    assert manifest["file"] == str(out) and manifest["sha256"] == file_sha256(out)
    assert manifest["arch"] == "protoclip-tiny" and manifest["round_trip_max_abs_difference"] <= ATOL
    assert manifest["needs_registration"] is True


def test_export_rejects_unknown_format(trained_run, synthetic_workspace):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    result = CliRunner().invoke(app, ["export", RUN, "--format", "onnx", "-w", str(synthetic_workspace.root)])
    assert result.exit_code == 1 and "Unknown export format 'onnx'" in result.output


# -- --format hf: the folder open_clip.push_to_hf_hub uploads --------------------------------------

LOAD_IN_A_FRESH_PROCESS = """
import sys, torch, open_clip
folder, inputs, output = sys.argv[1:]
# Nothing of this package is imported: the folder's config must be self-contained.
assert "protoclip-tiny" not in open_clip.list_models()
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
data = torch.load(inputs, weights_only=False)
model.eval()
with torch.no_grad():
    images = model.encode_image(data["images"], normalize=True)
    texts = model.encode_text(tokenizer(data["captions"]), normalize=True)
torch.save({"images": images, "texts": texts, "tokens": tokenizer(data["captions"]),
            "preprocess": repr(preprocess)}, output)
"""


@pytest.fixture(scope="module")
def hub_folder(trained_run, synthetic_workspace, tmp_path_factory):
    """The hub folder of the shared run, exported after one evaluation of its checkpoint."""
    from typer.testing import CliRunner

    from protoclip_cli.cli import app
    from protoclip_cli.configs.evaluate import EvaluateConfig
    from protoclip_cli.stages.evaluate import run

    run(EvaluateConfig(task="synthetic-zeroshot", model=RUN, workers=0, device="cpu"), synthetic_workspace)
    # A result of another checkpoint must stay out of the card.
    stale = json.loads((trained_run / "eval" / "synthetic-zeroshot.json").read_text())
    stale["name"], stale["model"]["path"] = "stale-result", str(trained_run / "checkpoints" / "step-00000001.pt")
    (trained_run / "eval" / "stale-result.json").write_text(json.dumps(stale))
    out = tmp_path_factory.mktemp("hub") / "tiny-hf"
    try:
        result = CliRunner().invoke(app, ["export", RUN, "--format", "hf", "--out", str(out), "--license", "apache-2.0",
                                          "-w", str(synthetic_workspace.root)])
    finally:
        (trained_run / "eval" / "stale-result.json").unlink()
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout and "local-dir:" in result.output
    return out


def test_hub_folder_loads_through_open_clip_without_registration(hub_folder, trained_run, synthetic_workspace, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from protoclip_cli.core.model import TINY_CONFIG_DIR, get_tokenizer
    from protoclip_cli.data.shards import iter_samples
    from protoclip_cli.data.transforms import decode_image, eval_transform, normalize
    from protoclip_cli.core.run_model import load_run_model

    assert sorted(p.name for p in hub_folder.iterdir()) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((hub_folder / "open_clip_config.json").read_text())
    assert config["model_cfg"] == json.loads((TINY_CONFIG_DIR / "protoclip-tiny.json").read_text())
    model, _, _ = load_run_model(trained_run)
    assert config["preprocess_cfg"]["mean"] == list(model.image_mean) and config["preprocess_cfg"]["std"] == list(model.image_std)
    weights = load_file(hub_folder / "open_clip_model.safetensors")
    assert set(weights) == set(model.clip.state_dict())  # the towers, no projection heads
    assert all(torch.equal(weights[k], v) for k, v in model.clip.state_dict().items())

    samples = [s for _, s in zip(range(8), iter_samples(synthetic_workspace.shards("synthetic", "heldout")))]
    transform = eval_transform(model.image_size)
    images = normalize(torch.stack([transform(decode_image(s.image)) for s in samples]), model.image_mean,
                       model.image_std, "cpu")
    captions = [s.caption for s in samples]
    torch.save({"images": images, "captions": captions}, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_IN_A_FRESH_PROCESS)
    done = subprocess.run([sys.executable, str(script), str(hub_folder), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt", weights_only=False)
    assert torch.equal(theirs["tokens"], get_tokenizer("protoclip-tiny")(captions))
    assert "Resize(size=64" in theirs["preprocess"] and "CenterCrop(size=(64, 64))" in theirs["preprocess"]
    with torch.no_grad():
        torch.testing.assert_close(theirs["images"], model.encode_image(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs["texts"], model.encode_text(get_tokenizer("protoclip-tiny")(captions)),
                                   atol=ATOL, rtol=0)
    manifest = json.loads((hub_folder.parent / f"{hub_folder.name}.manifest.json").read_text())
    assert manifest["format"] == "hf" and manifest["round_trip_max_abs_difference"] <= ATOL
    assert manifest["needs_registration"] is False and manifest["pushed_to"] is None


def test_model_card_has_the_recipe_data_and_results_of_the_checkpoint(hub_folder, trained_run):
    card = (hub_folder / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert front.splitlines() == ["tags:", "- clip", "- protoclip", "library_name: open_clip",
                                  "pipeline_tag: zero-shot-image-classification", "license: apache-2.0",
                                  "datasets:", "- synthetic"]
    result = json.loads((trained_run / "eval" / "synthetic-zeroshot.json").read_text())
    assert f"| synthetic-zeroshot | synthetic-heldout | top1 | {result['metrics']['top1']:.4f} |" in body
    assert "stale-result" not in body and "1 result(s) of other checkpoints of the run are left out" in body
    manifest = json.loads((hub_folder.parent / f"{hub_folder.name}.manifest.json").read_text())
    assert "synthetic-zeroshot" in manifest["results_in_card"] and "stale-result" not in manifest["results_in_card"]
    recipe = (trained_run / "config.toml").read_text().strip()
    assert "```toml\n" + recipe + "\n```" in body  # the whole resolved recipe
    assert "`synthetic`, split `train`: source `synthetic`, 512 image-text pairs downloaded (0 failed)." in body
    assert f'open_clip.create_model_and_transforms(\'local-dir:{hub_folder}\')' in body
    assert "Prototypical Contrastive Language Image Pretraining" in body  # the citation


def test_push_offline_fails_in_one_sentence_and_keeps_the_folder(trained_run, synthetic_workspace, tmp_path):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    assert __import__("os").environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: no test reaches the Hub
    out = tmp_path / "pushed"
    result = CliRunner().invoke(app, ["export", RUN, "--format", "hf", "--out", str(out), "--push", "me/tiny-protoclip",
                                      "-w", str(synthetic_workspace.root)])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "Could not push" in message and "me/tiny-protoclip" in message and "hf upload me/tiny-protoclip" in message
    assert "Traceback" not in result.output
    assert (out / "open_clip_config.json").is_file() and (out / "open_clip_model.safetensors").is_file()
    assert "hf-hub:me/tiny-protoclip" in (out / "README.md").read_text()  # the card tells how to load the pushed repo
    assert json.loads((tmp_path / "pushed.manifest.json").read_text())["pushed_to"] is None


@pytest.mark.parametrize("args, message", [
    (["--push", "me/x"], "--push uploads an OpenCLIP hub folder; add --format hf."),
    (["--format", "hf", "--push", "justaname"], "--push justaname is not a Hub repo id; use USER/NAME."),
])
def test_export_option_errors_are_one_sentence(trained_run, synthetic_workspace, args, message):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    result = CliRunner().invoke(app, ["export", RUN, *args, "-w", str(synthetic_workspace.root)])
    assert result.exit_code == 1 and message in " ".join(result.output.split())


def test_hf_export_refuses_to_replace_a_folder_that_is_not_one(trained_run, synthetic_workspace, tmp_path):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    (tmp_path / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["export", RUN, "--format", "hf", "--out", str(tmp_path), "-w", str(synthetic_workspace.root)])
    assert result.exit_code == 1 and "is not an OpenCLIP hub folder" in result.output
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_sigmoid_runs_hub_folder_carries_its_logit_bias(tmp_path):
    """open_clip builds logit_bias only when the config asks; the folder's config must, or the
    bias of a sigmoid-loss run would not load (strict state dict) or be lost."""
    from protoclip_cli.core.hub_folder import load_hub_folder, write_hub_folder
    from protoclip_cli.core.model import build_model
    from protoclip_cli.configs.train import ModelConfig
    from protoclip_cli.stages.export import round_trip_difference

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="protoclip-tiny"), contrastive="sigmoid")
    with torch.no_grad():
        model.logit_bias.fill_(-3.25)
    write_hub_folder(model.clip, "protoclip-tiny", tmp_path / "hub", "card")
    config = json.loads((tmp_path / "hub" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["init_logit_bias"] == -10.0
    reloaded = load_hub_folder(tmp_path / "hub")[0]
    assert reloaded.logit_bias.item() == -3.25
    assert round_trip_difference(model, "protoclip-tiny", lambda: reloaded) <= 1e-5


def test_a_protoclip_recipe_without_a_prototype_episode_is_said_at_start_and_in_its_model_card(
        synthetic_workspace, tmp_path, capsys):
    """Two episodes of the ProtoCLIP recipe are its InfoNCE warm-up and its LiT finish: nothing
    trains with prototypes, and neither the start of training nor the card may pretend otherwise."""
    from typer.testing import CliRunner

    from conftest import linked_workspace
    from protoclip_cli.cli import app
    from protoclip_cli.stages.train import run
    from test_train import small_config

    workspace = linked_workspace(synthetic_workspace, tmp_path / "ws")
    config = small_config("schedule.episodes=2", "name='warmup-and-lit'")
    assert config.proto.enabled
    run(config, workspace)
    said = " ".join(capsys.readouterr().err.split())
    assert ("warning: proto.enabled is on, but none of the 2 episodes trains with prototypes (1 InfoNCE warm-up by "
            "schedule.infonce_warmup_episodes, 1 LiT by schedule.lit_start_episode)") in said

    out = tmp_path / "warmup-and-lit-hf"
    result = CliRunner().invoke(app, ["export", "warmup-and-lit", "--format", "hf", "--out", str(out),
                                      "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    card = " ".join((out / "README.md").read_text().split())
    assert ("CLIP (InfoNCE) only: a ProtoCLIP recipe, but none of the 2 episode(s) up to this checkpoint trained "
            "with prototypes (1 InfoNCE warm-up, 1 LiT)") in card
    assert "episodic prototypes" not in card and "2 episodes (1 InfoNCE warm-up, 1 LiT)" in card


def test_the_model_card_counts_the_episodes_that_trained_with_prototypes(hub_folder):
    card = " ".join((hub_folder / "README.md").read_text().split())
    assert "ProtoCLIP: episodic prototypes (k = 12) in 10 of 12 episodes, Prototypical Back Translation" in card
    assert "12 episodes (1 InfoNCE warm-up, 10 prototype, 1 LiT)" in card
