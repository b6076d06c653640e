"""ProtoCLIP model: open_clip towers, projection heads, temperatures, tokenizer and tiny configs."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protoclip_cli.core.model import (
    MAX_LOGIT_SCALE,
    SIGLIP_INIT_LOGIT_BIAS,
    build_model,
    get_tokenizer,
    register_tiny_configs,
)
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.configs.train import ModelConfig

torch.set_num_threads(2)
TINY = ModelConfig(arch="protoclip-tiny", projection_hidden_dim=256, projection_dim=32)


def _batch(model, n: int = 8):
    images = torch.randn(n, 3, model.image_size, model.image_size)
    tokens = get_tokenizer("protoclip-tiny")([f"a photo of shape number {i}" for i in range(n)])
    return images, tokens


def test_tiny_config_is_registered_once_and_builds_through_open_clip():
    register_tiny_configs()
    register_tiny_configs()
    assert open_clip.list_models().count("protoclip-tiny") == 1
    clip = open_clip.create_model("protoclip-tiny")
    assert clip.visual.image_size == (64, 64) and clip.context_length == 32


def test_tokenizer_uses_the_arch_context_length():
    tokens = get_tokenizer("protoclip-tiny")(["a red circle", "two blue squares on grass"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 32)
    assert get_tokenizer("ViT-B-32")(["x"]).shape == (1, 77)


def test_forward_outputs_normalised_features_projections_and_scales():
    torch.manual_seed(0)
    model = build_model(TINY)
    assert model.image_size == 64 and model.embed_dim == 128
    assert model.image_mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert model.image_std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    images, tokens = _batch(model)
    out = model(images, tokens)
    assert out["image_features"].shape == (8, 128) and out["text_features"].shape == (8, 128)
    assert out["image_proj"].shape == (8, 32) and out["text_proj"].shape == (8, 32)
    for name in ("image_features", "text_features", "image_proj", "text_proj"):
        torch.testing.assert_close(out[name].norm(dim=-1), torch.ones(8))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["logit_scale_proto"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    torch.testing.assert_close(model.encode_image(images), out["image_features"])
    torch.testing.assert_close(model.encode_text(tokens), out["text_features"])


def test_heads_take_the_raw_tower_features():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    images, tokens = _batch(model)
    out = model(images, tokens)
    raw_image, raw_text = model.clip.encode_image(images), model.clip.encode_text(tokens)
    torch.testing.assert_close(out["image_proj"], F.normalize(model.image_head(raw_image), dim=-1))
    torch.testing.assert_close(out["text_proj"], F.normalize(model.text_head(raw_text), dim=-1))
    from_normalised = F.normalize(model.image_head(F.normalize(raw_image, dim=-1)), dim=-1)
    assert not torch.allclose(out["image_proj"], from_normalised, atol=1e-3)


def test_image_head_starts_as_a_copy_of_the_text_head():
    model = build_model(TINY)
    image_state, text_state = model.image_head.state_dict(), model.text_head.state_dict()
    assert image_state.keys() == text_state.keys()
    for key in text_state:
        assert torch.equal(image_state[key], text_state[key]), key
    with torch.no_grad():
        model.text_head[0].weight.add_(1.0)
    assert not torch.equal(model.image_head[0].weight, model.text_head[0].weight)


@pytest.mark.parametrize("n_layers,expected", [(0, [nn.Linear]), (2, [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear])])
def test_projection_head_layers(n_layers, expected):
    model = build_model(ModelConfig(projection_n_layers=n_layers, projection_hidden_dim=64, projection_dim=16))
    assert [type(layer) for layer in model.text_head] == expected
    assert model.text_head[0].in_features == 128 and model.text_head[-1].out_features == 16


def test_no_heads_gives_the_clip_baseline():
    model = build_model(ModelConfig(heads=False))
    assert model.image_head is None and model.text_head is None and model.logit_scale_proto is None
    out = model(*_batch(model, 4))
    assert out["image_proj"] is None and out["text_proj"] is None and out["logit_scale_proto"] is None
    names = [name for name, _ in model.named_parameters()]
    assert all(name.startswith("clip.") for name in names)


def test_sigmoid_model_has_open_clips_logit_bias_at_siglips_start(tmp_path):
    from protoclip_cli.core.optim import parameter_groups

    model = build_model(TINY, contrastive="sigmoid")
    assert model.logit_bias is model.clip.logit_bias and model.logit_bias.item() == -10.0 == SIGLIP_INIT_LOGIT_BIAS
    assert model.logit_scale.item() == pytest.approx(math.log(10))  # SigLIP's scale 10, not CLIP's 1/0.07
    assert model(*_batch(model, 4))["logit_bias"] is model.logit_bias
    assert [p for p in model.scalar_parameters()] == [model.logit_scale, model.logit_scale_proto, model.logit_bias]
    undecayed = {id(p) for group in parameter_groups(model, 0.5) if group["weight_decay"] == 0 for p in group["params"]}
    assert id(model.logit_bias) in undecayed
    # Saved and loaded through the state dict, under open_clip's own name.
    with torch.no_grad():
        model.logit_bias.fill_(-7.25)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = build_model(TINY, contrastive="sigmoid")
    loaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert loaded.logit_bias.item() == -7.25
    # An InfoNCE model has none, and its forward says so.
    plain = build_model(TINY)
    assert plain.logit_bias is None and plain(*_batch(plain, 2))["logit_bias"] is None
    assert len(plain.scalar_parameters()) == 2


def test_grad_checkpointing_recomputes_the_towers_with_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model(TINY)
    torch.manual_seed(0)
    checkpointed = build_model(ModelConfig(**{**vars(TINY), "grad_checkpointing": True}))
    assert checkpointed.clip.transformer.grad_checkpointing and checkpointed.clip.visual.transformer.grad_checkpointing
    assert not plain.clip.transformer.grad_checkpointing
    batch = _batch(plain, 4)
    for model in (plain, checkpointed):
        out = model(*batch)
        (out["image_features"] @ out["text_features"].T).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_clamp_temperatures_keeps_both_scales_in_range():
    model = build_model(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
        model.logit_scale_proto.fill_(-2.0)
    model.clamp_temperatures()
    assert model.logit_scale.item() == pytest.approx(math.log(100)) == MAX_LOGIT_SCALE
    assert model.logit_scale_proto.item() == 0.0
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
        model.logit_scale_proto.fill_(1.5)
    model.clamp_temperatures()
    assert model.logit_scale.item() == 3.0 and model.logit_scale_proto.item() == 1.5


def test_visual_parameters_are_exactly_the_image_tower():
    model = build_model(TINY)
    visual = {id(p) for p in model.visual_parameters()}
    assert visual == {id(p) for p in model.clip.visual.parameters()}
    assert id(model.clip.token_embedding.weight) not in visual
    assert not visual & {id(p) for p in model.image_head.parameters()}


def test_tiny_model_forward_backward_is_cheap_on_cpu():
    """Batch 64 forward+backward within 20 GFLOP: ~0.2 s on two free cores (FLOPs, not a flaky timer)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(ModelConfig())  # the default recipe's heads: 2048 hidden, 128 out
    images, tokens = _batch(model, 64)
    with FlopCounterMode(display=False) as counter:
        out = model(images, tokens)
        loss = sum(out[k].sum() for k in ("image_features", "text_features", "image_proj", "text_proj"))
        loss.backward()
    assert 1e9 < counter.get_total_flops() < 20e9
    assert model.clip.visual.conv1.weight.grad is not None
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


@pytest.mark.parametrize("arch,embed_dim", [("RN50", 1024), ("ViT-B-32", 512)])
def test_open_clip_architectures_build_without_weights(arch, embed_dim):
    model = build_model(ModelConfig(arch=arch, projection_hidden_dim=64, projection_dim=16))
    assert model.embed_dim == embed_dim and model.image_size == 224 and model.context_length == 77
    assert model.text_head[0].in_features == embed_dim
    head_out = model.image_head.eval()(torch.randn(2, embed_dim))
    assert head_out.shape == (2, 16)


def test_pretrained_checkpoint_initialises_the_towers(tmp_path):
    torch.manual_seed(0)
    source = build_model(TINY)
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": source.clip.state_dict()}, checkpoint)
    torch.manual_seed(1)
    loaded = build_model(ModelConfig(arch="protoclip-tiny", pretrained=str(checkpoint)))
    for name, tensor in source.clip.state_dict().items():
        assert torch.equal(loaded.clip.state_dict()[name], tensor), name


def test_bad_model_settings_raise_clear_errors(tmp_path):
    with pytest.raises(ProtoclipError, match="does not exist"):
        build_model(ModelConfig(pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ProtoclipError, match="Unknown model architecture 'ViT-Q-99'"):
        build_model(ModelConfig(arch="ViT-Q-99"))
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.nothing": torch.zeros(1)}, wrong)
    with pytest.raises(ProtoclipError, match="Could not load"):
        build_model(ModelConfig(pretrained=str(wrong)))
