"""Gradient accumulation (``optim.accum_freq``, OpenCLIP's --accum-freq method): 4 micro-batches of 16
give the gradient and the update of one batch of 64, with plain CLIP, with the prototype and
external-teacher losses (labels looked up by key, or online from the cached features as in
single-pass mode), with the sigmoid loss; BatchNorm running statistics see each sample once."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from protoclip_cli.core.losses import Prototypes, ProtoCLIPLoss
from protoclip_cli.core.model import build_model, get_tokenizer
from protoclip_cli.core.optim import build_optimizer, parameter_groups
from protoclip_cli.configs.train import ModelConfig, OptimConfig
from protoclip_cli.training.episodes import Phase
from protoclip_cli.training.single_pass import nearest_centroid
from protoclip_cli.training.step import Stepper, micro_batches

torch.set_num_threads(2)
BATCH, MICRO, K, K_EXT, DIM = 64, 16, 6, 4, 16
PROTO = Phase("proto", use_proto=True, use_ext=True, lock_visual=False)
CLIP = Phase("clip", use_proto=False, use_ext=False, lock_visual=False)


def _data():
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(BATCH, 3, 64, 64, generator=generator)
    tokens = get_tokenizer("protoclip-tiny")([f"a {c} shape number {i}" for i, c in enumerate("rgbcmyk" * 10)][:BATCH])
    keys = torch.arange(BATCH) * 7 + 100
    teacher = F.normalize(torch.randn(BATCH, 8, generator=generator), dim=1)

    def unit(rows, dim):
        return F.normalize(torch.randn(rows, dim, generator=generator), dim=1)

    protos = Prototypes(unit(K, DIM), unit(K, DIM), 0.7 * unit(K, DIM), 0.7 * unit(K, DIM),
                        ext_centroids=unit(K_EXT, 8), ext_in_img=0.6 * unit(K_EXT, DIM), ext_in_txt=0.6 * unit(K_EXT, DIM))
    labels = {name: torch.randint(0, k, (BATCH,), generator=generator) for name, k in (("img", K), ("txt", K), ("ext", K_EXT))}
    batch = {"images": images, "tokens": tokens, "keys": keys, "teacher": teacher}
    return batch, protos, labels


def _split(batch: dict, size: int) -> list[dict]:
    return [{name: value[start : start + size] for name, value in batch.items()} for start in range(0, BATCH, size)]


def _stepper(contrastive: str, n_layers: int = 0, seed: int = 0, adamw: bool = False) -> Stepper:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(projection_dim=DIM, projection_hidden_dim=32, projection_n_layers=n_layers), contrastive)
    if adamw:
        optim = OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=0.0)
        optimizer = build_optimizer(parameter_groups(model, optim.weight_decay), optim, fused=False)
    else:
        # SGD: an update linear in the gradient, so "the same update" has a float tolerance. (A first
        # AdamW step is lr * sign(g) wherever |g| >> eps: gradients that are 0 up to float noise, such
        # as attention's key bias, would differ by +-lr.)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Stepper(model, model, optimizer, ProtoCLIPLoss(contrastive=contrastive), contextlib.nullcontext,
                   lambda b: (b["images"], b["tokens"]))


def _labeller(kind: str, labels: dict, protos: Prototypes, keys: torch.Tensor):
    """Labels as the trainer finds them: by key (faithful) or nearest prototypes (single-pass)."""
    row_of = {int(k): i for i, k in enumerate(keys)}

    def by_key(outputs, batches):
        rows = torch.tensor([row_of[int(k)] for b in batches for k in b["keys"]])
        return {name: value[rows] for name, value in labels.items()}

    def online(outputs, batches):
        teacher = torch.cat([b["teacher"] for b in batches])
        return {"img": nearest_centroid(outputs["image_proj"], protos.img_centroids),
                "txt": nearest_centroid(outputs["text_proj"], protos.txt_centroids),
                "ext": nearest_centroid(teacher, protos.ext_centroids)}

    return {"none": lambda outputs, batches: None, "by-key": by_key, "online": online}[kind]


def _gradients(stepper: Stepper, batches, phase, labeller, protos) -> tuple[dict, dict]:
    stepper.optimizer.zero_grad(set_to_none=True)
    terms, outputs = stepper.gradients(batches, phase, labeller, protos)
    grads = {name: p.grad.clone() for name, p in stepper.model.named_parameters() if p.grad is not None}
    return grads, {"terms": terms, "outputs": outputs}


CASES = [("infonce", "none"), ("infonce", "by-key"), ("sigmoid", "online")]


@pytest.mark.parametrize(("contrastive", "labels"), CASES)
def test_four_micro_batches_of_16_give_the_gradient_and_update_of_one_batch_of_64(contrastive, labels):
    batch, protos, all_labels = _data()
    phase = CLIP if labels == "none" else PROTO
    protos_used = None if labels == "none" else protos
    labeller = _labeller(labels, all_labels, protos, batch["keys"])
    whole, accumulated = _stepper(contrastive), _stepper(contrastive)
    expected, one = _gradients(whole, [batch], phase, labeller, protos_used)
    got, four = _gradients(accumulated, _split(batch, MICRO), phase, labeller, protos_used)

    assert got.keys() == expected.keys()
    scalars = {"clip.logit_scale"} | ({"clip.logit_bias"} if contrastive == "sigmoid" else set())
    scalars |= {"logit_scale_proto"} if phase.use_proto else set()
    assert scalars <= set(expected)  # the scalars' gradient is divided by the micro-batches: checked here
    for name, value in expected.items():
        scale = float(value.abs().max()) or 1.0
        torch.testing.assert_close(got[name], value, atol=2e-5 * scale, rtol=1e-4, msg=name)
    shared = ("proto_img2txt", "proto_txt2img", "acc_img2txt", "acc_txt2img", "ext_img", "ext_txt", "acc_img2ext",
              "acc_txt2ext") if phase.use_proto else ()
    for term in ("total", "clip", "proto", "ext", *shared):  # the loss of the whole batch, not of the last micro-batch
        torch.testing.assert_close(four["terms"][term], one["terms"][term], atol=1e-5, rtol=1e-5, msg=term)
    # The outputs of a step cover all its micro-batches, in order (recorded in single-pass mode).
    torch.testing.assert_close(four["outputs"]["image_proj"], one["outputs"]["image_proj"].detach(), atol=1e-5, rtol=0)

    # The update (SGD, lr 0.1) and the clamped temperatures, from the same state.
    for stepper in (whole, accumulated):
        stepper.optimizer.step()
        stepper.model.clamp_temperatures()
    for (name, a), (_, b) in zip(whole.model.named_parameters(), accumulated.model.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def test_each_micro_batch_scores_only_its_own_rows_against_the_prototypes(monkeypatch):
    """The (batch x k) prototype and teacher scores are computed once per step, not once per micro-batch."""
    from protoclip_cli.core import losses

    batch, protos, all_labels = _data()
    scored: list[int] = []
    original = losses._rows_of_batch

    def counting(image_proj, text_proj, labels, scale, rows):
        found = original(image_proj, text_proj, labels, scale, rows)
        scored.append(len(found[0]))
        return found

    monkeypatch.setattr(losses, "_rows_of_batch", counting)
    _gradients(_stepper("infonce"), _split(batch, MICRO), PROTO, _labeller("by-key", all_labels, protos, batch["keys"]),
               protos)
    assert scored == [MICRO, MICRO] * (BATCH // MICRO)  # the prototype and the teacher term of each micro-batch


def test_accumulation_keeps_batchnorm_statistics_of_each_sample_once_and_steps_once():
    batch, protos, all_labels = _data()
    micro = _split(batch, MICRO)[:2]
    stepper = _stepper("infonce", n_layers=1, adamw=True)  # a Linear-BatchNorm-ReLU block in each head
    expected = copy.deepcopy(stepper.model)
    with torch.no_grad():  # each micro-batch through the model once, in train mode
        for part in micro:
            expected(part["images"], part["tokens"])
    before = [p.detach().clone() for p in stepper.model.parameters()]
    steps_before = [s["step"].item() for s in stepper.optimizer.state.values()] if stepper.optimizer.state else []
    stepper.step(micro, PROTO, _labeller("by-key", all_labels, protos, batch["keys"]), protos)
    for head in ("image_head", "text_head"):
        got, want = getattr(stepper.model, head)[1], getattr(expected, head)[1]
        torch.testing.assert_close(got.running_mean, want.running_mean)
        torch.testing.assert_close(got.running_var, want.running_var)
        assert int(got.num_batches_tracked) == int(want.num_batches_tracked) == len(micro)
    assert not steps_before and {s["step"].item() for s in stepper.optimizer.state.values()} == {1.0}
    assert any(not torch.equal(a, b) for a, b in zip(before, stepper.model.parameters()))


def test_micro_batches_group_consecutive_batches_and_drop_an_incomplete_group():
    assert list(micro_batches(range(7), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(micro_batches(range(2), 1)) == [[0], [1]]
