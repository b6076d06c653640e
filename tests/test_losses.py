"""Losses against float64 re-computations of method.md's formulas, gradients, and 2-rank gloo runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from protoclip_cli.core.losses import ClipLoss, ExternalTeacherLoss, ProtoCLIPLoss, ProtoLoss, Prototypes, SigLipLoss
from protoclip_cli.errors import ProtoclipError

torch.set_num_threads(1)
N, D, K, K_EXT = 12, 16, 7, 5


# ---- float64 references, written from the formulas -------------------------------------------


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    top = scores.max(axis=1, keepdims=True)
    return scores - top - np.log(np.exp(scores - top).sum(axis=1, keepdims=True))


def _ce(scores: np.ndarray, target: np.ndarray) -> float:
    """Mean cross-entropy; ``target`` is labels (1-d) or probabilities (2-d)."""
    log_p = _log_softmax(scores)
    if target.ndim == 1:
        return float(-log_p[np.arange(len(target)), target].mean())
    return float(-(target * log_p).sum(axis=1).mean())


def _ref_clip(img, txt, scale) -> float:
    n = len(img)
    total = 0.0
    for i in range(n):
        row = np.array([scale * img[i] @ txt[j] for j in range(n)])
        col = np.array([scale * txt[i] @ img[j] for j in range(n)])
        total += -(row[i] - np.log(np.exp(row).sum())) - (col[i] - np.log(np.exp(col).sum()))
    return total / (2 * n)


def _ref_sigmoid(img, txt, scale, bias) -> tuple[float, float]:
    """SigLIP: ``-1/n sum_ij log sigmoid(z_ij (scale i.t + bias))``, and its derivative in the bias."""
    n = len(img)
    total = bias_gradient = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * img[i] @ txt[j] + bias
            total += np.log1p(np.exp(-z * logit))  # -log sigmoid(z * logit)
            bias_gradient += -z / (1 + np.exp(z * logit))
    return total / n, bias_gradient / n


def _ref_targets(centroids, labels, tau):
    if tau <= 0:
        return labels
    logits = centroids[labels] @ centroids.T / tau
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ref_proto(img, txt, scale, img_lbl, txt_lbl, p: dict, tau, pbt):
    image_students = p["txt_in_img"] if pbt else p["txt_centroids"]
    text_students = p["img_in_txt"] if pbt else p["img_centroids"]
    i2t = _ce(scale * img @ image_students.T, _ref_targets(p["txt_centroids"], txt_lbl, tau))
    t2i = _ce(scale * txt @ text_students.T, _ref_targets(p["img_centroids"], img_lbl, tau))
    acc_i2t = float(np.mean((img @ image_students.T).argmax(1) == txt_lbl))
    acc_t2i = float(np.mean((txt @ text_students.T).argmax(1) == img_lbl))
    return (i2t + t2i) / 2, i2t, t2i, acc_i2t, acc_t2i


def _ref_ext(img, txt, scale, ext_lbl, p):
    return (_ce(scale * img @ p["ext_in_img"].T, ext_lbl) + _ce(scale * txt @ p["ext_in_txt"].T, ext_lbl)) / 2


# ---- random inputs ------------------------------------------------------------------------------


def _unit(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)


def _inputs(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    protos = Prototypes(
        img_centroids=_unit(K, D, g),
        txt_centroids=_unit(K, D, g),
        img_in_txt=0.7 * _unit(K, D, g),  # PBT centroids are means of unit vectors: shorter than 1
        txt_in_img=0.7 * _unit(K, D, g),
        ext_centroids=_unit(K_EXT, 8, g),
        ext_in_img=0.6 * _unit(K_EXT, D, g),
        ext_in_txt=0.6 * _unit(K_EXT, D, g),
    )
    return {
        "img": _unit(n, D, g),
        "txt": _unit(n, D, g),
        "img_lbl": torch.randint(0, K, (n,), generator=g),
        "txt_lbl": torch.randint(0, K, (n,), generator=g),
        "ext_lbl": torch.randint(0, K_EXT, (n,), generator=g),
        "scale": torch.tensor(8.5),
        "protos": protos,
    }


def _np_protos(protos: Prototypes) -> dict:
    return {k: v.double().numpy() for k, v in vars(protos).items() if v is not None}


# ---- single-process formula checks ---------------------------------------------------------------


def test_clip_loss_matches_the_formula():
    x = _inputs()
    got = ClipLoss()(x["img"], x["txt"], x["scale"])["clip"]
    expected = _ref_clip(x["img"].double().numpy(), x["txt"].double().numpy(), 8.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_sigmoid_loss_matches_the_formula_and_open_clip():
    from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

    x = _inputs(seed=12)
    bias = torch.tensor(-4.0, requires_grad=True)
    got = SigLipLoss()(x["img"], x["txt"], x["scale"], bias)["clip"]
    got.backward()
    expected, bias_gradient = _ref_sigmoid(x["img"].double().numpy(), x["txt"].double().numpy(), 8.5, -4.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert bias.grad.item() == pytest.approx(bias_gradient, rel=1e-5)
    theirs = OpenClipSigLipLoss()(x["img"], x["txt"], x["scale"], torch.tensor(-4.0))
    assert got.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_protoclip_loss_with_the_sigmoid_term_keeps_the_prototype_terms():
    x = _inputs(seed=13)
    outputs = {**_outputs(x), "logit_bias": torch.tensor(-6.0)}
    labels = {"img": x["img_lbl"], "txt": x["txt_lbl"], "ext": x["ext_lbl"]}
    got = ProtoCLIPLoss(w_clip=0.5, w_proto=2.0, w_ext=0.25, contrastive="sigmoid")(
        outputs, labels, x["protos"], use_proto=True, use_ext=True
    )
    img_t, txt_t = outputs["image_features"].double().numpy(), outputs["text_features"].double().numpy()
    sigmoid = _ref_sigmoid(img_t, txt_t, 14.0, -6.0)[0]
    img, txt = x["img"].double().numpy(), x["txt"].double().numpy()
    p = _np_protos(x["protos"])
    proto = _ref_proto(img, txt, 8.5, x["img_lbl"].numpy(), x["txt_lbl"].numpy(), p, 0.01, True)[0]
    ext = _ref_ext(img, txt, 8.5, x["ext_lbl"].numpy(), p)
    assert got["clip"].item() == pytest.approx(sigmoid, rel=1e-5)
    assert got["total"].item() == pytest.approx(0.5 * sigmoid + 2.0 * proto + 0.25 * ext, rel=1e-5)
    assert got["logit_bias"].item() == -6.0
    with pytest.raises(ValueError, match="logit_bias"):
        ProtoCLIPLoss(contrastive="sigmoid")(_outputs(x))
    with pytest.raises(ValueError, match="contrastive"):
        ProtoCLIPLoss(contrastive="softmax")


@pytest.mark.parametrize("tau", [0.01, 0.3, 0.0])
@pytest.mark.parametrize("pbt", [True, False])
def test_proto_loss_matches_the_formula(tau, pbt):
    x = _inputs(seed=1)
    got = ProtoLoss(target_temperature=tau, pbt=pbt)(
        x["img"], x["txt"], x["scale"], x["img_lbl"], x["txt_lbl"], x["protos"]
    )
    proto, i2t, t2i, acc_i2t, acc_t2i = _ref_proto(
        x["img"].double().numpy(), x["txt"].double().numpy(), 8.5,
        x["img_lbl"].numpy(), x["txt_lbl"].numpy(), _np_protos(x["protos"]), tau, pbt,
    )
    assert got["proto"].item() == pytest.approx(proto, rel=1e-5)
    assert got["proto_img2txt"].item() == pytest.approx(i2t, rel=1e-5)
    assert got["proto_txt2img"].item() == pytest.approx(t2i, rel=1e-5)
    assert got["acc_img2txt"].item() == pytest.approx(acc_i2t)
    assert got["acc_txt2img"].item() == pytest.approx(acc_t2i)


def test_pbt_changes_the_student_centroids():
    x = _inputs(seed=2)
    args = (x["img"], x["txt"], x["scale"], x["img_lbl"], x["txt_lbl"], x["protos"])
    assert ProtoLoss(0.0, pbt=True)(*args)["proto"].item() != pytest.approx(ProtoLoss(0.0, pbt=False)(*args)["proto"].item())


def test_soft_targets_approach_one_hot_as_tau_goes_to_zero():
    x = _inputs(seed=3)
    args = (x["img"], x["txt"], x["scale"], x["img_lbl"], x["txt_lbl"], x["protos"])
    one_hot = ProtoLoss(0.0)(*args)["proto"].item()
    gaps = [abs(ProtoLoss(tau)(*args)["proto"].item() - one_hot) for tau in (0.5, 0.1, 0.02, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[-1] < 1e-5


def test_external_teacher_loss_matches_the_formula():
    x = _inputs(seed=4)
    got = ExternalTeacherLoss()(x["img"], x["txt"], x["scale"], x["ext_lbl"], x["protos"])
    p = _np_protos(x["protos"])
    img, txt, lbl = x["img"].double().numpy(), x["txt"].double().numpy(), x["ext_lbl"].numpy()
    assert got["ext"].item() == pytest.approx(_ref_ext(img, txt, 8.5, lbl, p), rel=1e-5)
    assert got["acc_img2ext"].item() == pytest.approx(np.mean((img @ p["ext_in_img"].T).argmax(1) == lbl))
    assert got["acc_txt2ext"].item() == pytest.approx(np.mean((txt @ p["ext_in_txt"].T).argmax(1) == lbl))


def _outputs(x, proj_dim_seed: int = 5):
    g = torch.Generator().manual_seed(proj_dim_seed)
    return {
        "image_features": _unit(N, 24, g),
        "text_features": _unit(N, 24, g),
        "image_proj": x["img"],
        "text_proj": x["txt"],
        "logit_scale": torch.tensor(14.0),
        "logit_scale_proto": x["scale"],
    }


def test_protoclip_loss_weights_terms_and_reports_diagnostics():
    x = _inputs(seed=6)
    outputs = _outputs(x)
    labels = {"img": x["img_lbl"], "txt": x["txt_lbl"], "ext": x["ext_lbl"]}
    got = ProtoCLIPLoss(w_clip=0.5, w_proto=2.0, w_ext=0.25, target_temperature=0.01)(
        outputs, labels, x["protos"], use_proto=True, use_ext=True
    )
    img_t, txt_t = outputs["image_features"].double().numpy(), outputs["text_features"].double().numpy()
    p = _np_protos(x["protos"])
    img, txt = x["img"].double().numpy(), x["txt"].double().numpy()
    clip = _ref_clip(img_t, txt_t, 14.0)
    proto = _ref_proto(img, txt, 8.5, x["img_lbl"].numpy(), x["txt_lbl"].numpy(), p, 0.01, True)[0]
    ext = _ref_ext(img, txt, 8.5, x["ext_lbl"].numpy(), p)
    assert got["clip"].item() == pytest.approx(clip, rel=1e-5)
    assert got["proto"].item() == pytest.approx(proto, rel=1e-5)
    assert got["ext"].item() == pytest.approx(ext, rel=1e-5)
    assert got["total"].item() == pytest.approx(0.5 * clip + 2.0 * proto + 0.25 * ext, rel=1e-5)
    assert got["modality_gap"].item() == pytest.approx(np.linalg.norm(img_t.mean(0) - txt_t.mean(0)), rel=1e-5)
    assert got["feature_std_image"].item() == pytest.approx(img_t.std(0, ddof=1).mean(), rel=1e-5)
    assert got["feature_std_text"].item() == pytest.approx(txt_t.std(0, ddof=1).mean(), rel=1e-5)
    assert got["temperature"].item() == pytest.approx(1 / 14.0)
    assert got["temperature_proto"].item() == pytest.approx(1 / 8.5)
    assert all(value.dim() == 0 for value in got.values())


def test_protoclip_loss_clip_only_has_zero_prototype_terms():
    x = _inputs(seed=7)
    got = ProtoCLIPLoss()(_outputs(x))
    assert got["total"].item() == pytest.approx(got["clip"].item())
    assert got["proto"].item() == 0.0 and got["ext"].item() == 0.0 and "acc_img2txt" not in got


def test_external_loss_without_pbt_is_refused():
    x = _inputs(seed=8)
    labels = {"img": x["img_lbl"], "txt": x["txt_lbl"], "ext": x["ext_lbl"]}
    with pytest.raises(ProtoclipError, match="needs PBT"):
        ProtoCLIPLoss(pbt=False)(_outputs(x), labels, x["protos"], use_proto=True, use_ext=True)


def test_prototypes_to_moves_every_tensor():
    protos = _inputs()["protos"]
    protos.ext_centroids = None
    moved = protos.to("meta")
    assert moved.img_centroids.device.type == "meta" and moved.ext_in_txt.device.type == "meta"
    assert moved.ext_centroids is None and protos.img_centroids.device.type == "cpu"


def test_gradients_reach_both_towers_both_heads_and_both_temperatures():
    from protoclip_cli.core.model import build_model, get_tokenizer
    from protoclip_cli.configs.train import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(projection_hidden_dim=64, projection_dim=D))
    images = torch.randn(N, 3, 64, 64)
    tokens = get_tokenizer("protoclip-tiny")([f"caption {i}" for i in range(N)])
    x = _inputs(seed=9)
    labels = {"img": x["img_lbl"], "txt": x["txt_lbl"], "ext": x["ext_lbl"]}
    terms = ProtoCLIPLoss()(model(images, tokens), labels, x["protos"], use_proto=True, use_ext=True)
    terms["total"].backward()
    for name, module in [
        ("image tower", model.clip.visual),
        ("text tower", model.clip.transformer),
        ("image head", model.image_head),
        ("text head", model.text_head),
    ]:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert model.logit_scale.grad.abs() > 0 and model.logit_scale_proto.grad.abs() > 0


# ---- two gloo ranks against one process ------------------------------------------------------------


SIGMOID_BIAS = -4.0


def _sigmoid_and_gradients(loss, img, txt, scale):
    """A sigmoid loss's value and its gradients on the image and text features, the scale and the bias."""
    img, txt = img.detach().clone().requires_grad_(True), txt.detach().clone().requires_grad_(True)
    scale, bias = scale.clone().requires_grad_(True), torch.tensor(SIGMOID_BIAS, requires_grad=True)
    value = loss(img, txt, scale, bias)
    value = value["clip"] if isinstance(value, dict) else value
    value.backward()
    return value.detach(), (img.grad, txt.grad, scale.grad, bias.grad)


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = _inputs(seed=11, n=N * world)
        part = slice(rank * N, (rank + 1) * N)
        img = x["img"][part].clone().requires_grad_(True)
        txt = x["txt"][part].clone().requires_grad_(True)
        clip = ClipLoss()(img, txt, x["scale"])["clip"]
        clip.backward()
        clip_grads = (img.grad.clone(), txt.grad.clone())
        img.grad = txt.grad = None
        proto = ProtoLoss(0.01)(img, txt, x["scale"], x["img_lbl"][part], x["txt_lbl"][part], x["protos"])
        ext = ExternalTeacherLoss()(img, txt, x["scale"], x["ext_lbl"][part], x["protos"])
        (proto["proto"] + ext["ext"]).backward()
        proto_grads = (img.grad.clone(), txt.grad.clone())
        sigmoid, sigmoid_grads = _sigmoid_and_gradients(SigLipLoss(), img, txt, x["scale"])
        from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

        theirs = OpenClipSigLipLoss(rank=rank, world_size=world, dist_impl="gather")
        open_clip_sigmoid, open_clip_grads = _sigmoid_and_gradients(theirs, img, txt, x["scale"])
        torch.save(
            {
                "sigmoid": sigmoid,
                "sigmoid_grads": sigmoid_grads,
                "open_clip_sigmoid": open_clip_sigmoid,
                "open_clip_grads": open_clip_grads,
                "clip": clip.detach(),
                "clip_grads": clip_grads,
                "proto": proto["proto"].detach(),
                "acc_img2txt": proto["acc_img2txt"],
                "ext": ext["ext"].detach(),
                "proto_grads": proto_grads,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # starts processes
def test_two_gloo_ranks_match_one_process_on_the_whole_batch(tmp_path):
    world = 2
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    x = _inputs(seed=11, n=N * world)
    img = x["img"].clone().requires_grad_(True)
    txt = x["txt"].clone().requires_grad_(True)
    clip = ClipLoss()(img, txt, x["scale"])["clip"]
    clip.backward()
    clip_grads = (img.grad.clone(), txt.grad.clone())
    img.grad = txt.grad = None
    proto = ProtoLoss(0.01)(img, txt, x["scale"], x["img_lbl"], x["txt_lbl"], x["protos"])
    ext = ExternalTeacherLoss()(img, txt, x["scale"], x["ext_lbl"], x["protos"])
    (proto["proto"] + ext["ext"]).backward()
    proto_grads = (img.grad, txt.grad)
    sigmoid, sigmoid_grads = _sigmoid_and_gradients(SigLipLoss(), x["img"], x["txt"], x["scale"])
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    # OpenCLIP's distributed SigLIP: each rank sums its own rows against every text, so the mean of
    # the ranks' losses is the loss of the whole batch, as ours on every rank.
    torch.testing.assert_close(sum(r["open_clip_sigmoid"] for r in ranks) / world, sigmoid)
    for rank, got in enumerate(ranks):
        part = slice(rank * N, (rank + 1) * N)
        torch.testing.assert_close(got["sigmoid"], sigmoid)
        for local, whole in zip(got["sigmoid_grads"][:2], sigmoid_grads[:2]):
            torch.testing.assert_close(local, whole[part])
        # Scale and bias: every rank already has the whole batch's gradient.
        for local, whole in zip(got["sigmoid_grads"][2:], sigmoid_grads[2:]):
            torch.testing.assert_close(local, whole)
        # OpenCLIP's features receive every rank's loss's gradient: world size x ours, which DDP's mean
        # over ranks turns into the same weight gradient as ours under optim.ddp_gradients = 'global-batch'.
        for theirs, ours in zip(got["open_clip_grads"][:2], got["sigmoid_grads"][:2]):
            torch.testing.assert_close(theirs, world * ours)
    for index in (2, 3):  # DDP averages OpenCLIP's per-rank scale and bias gradients
        torch.testing.assert_close(sum(r["open_clip_grads"][index] for r in ranks) / world, sigmoid_grads[index])
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        part = slice(rank * N, (rank + 1) * N)
        torch.testing.assert_close(got["clip"], clip.detach())
        torch.testing.assert_close(got["proto"], proto["proto"].detach())
        torch.testing.assert_close(got["ext"], ext["ext"].detach())
        torch.testing.assert_close(got["acc_img2txt"], proto["acc_img2txt"])
        for local, whole in zip(got["clip_grads"], clip_grads):
            torch.testing.assert_close(local, whole[part])
        for local, whole in zip(got["proto_grads"], proto_grads):
            torch.testing.assert_close(local, whole[part])
