"""`export --format open_clip`: open_clip loads the file and gives this project's embeddings."""

from __future__ import annotations

import json

import pytest
import torch

from test_evaluate import RUN, train_shared_run

torch.set_num_threads(2)
ATOL = 1e-5  # float32 CPU: the same weights and ops, so only summation-order noise is allowed


@pytest.fixture(scope="module")
def trained_run(synthetic_workspace, synthetic_teacher):
    return train_shared_run(synthetic_workspace, synthetic_teacher)


def test_export_round_trip_through_open_clip(trained_run, synthetic_workspace, tmp_path):
    import open_clip
    from typer.testing import CliRunner

    from protoclip_cli.cli import app
    from protoclip_cli.core.model import get_tokenizer, register_tiny_configs
    from protoclip_cli.data.shards import iter_samples
    from protoclip_cli.data.transforms import decode_image, eval_transform, normalize
    from protoclip_cli.runs import load_run_model

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
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["arch"] == "protoclip-tiny" and manifest["round_trip_max_abs_difference"] <= ATOL
    assert manifest["needs_registration"] is True


def test_export_rejects_unknown_format(trained_run, synthetic_workspace):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    result = CliRunner().invoke(app, ["export", RUN, "--format", "onnx", "-w", str(synthetic_workspace.root)])
    assert result.exit_code == 1 and "Unknown export format 'onnx'" in result.output
