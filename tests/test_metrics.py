"""Evaluation metrics against brute-force float64 re-computations on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protoclip_cli.evaluation.tasks.clustering import agreement, purity, size_histogram, size_summary
from protoclip_cli.evaluation.tasks.linear_probe import linear_probe, reference_linear_probe
from protoclip_cli.evaluation.tasks.modality_gap import modality_gap
from protoclip_cli.evaluation.tasks.retrieval import retrieval_recall
from protoclip_cli.evaluation.tasks.zeroshot import class_embeddings, topk_accuracy, zeroshot_scores

torch.set_num_threads(1)


def brute_topk(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    hits = 0
    for row, label in zip(scores, labels):
        better_or_equal = sum(1 for j, s in enumerate(row) if j != label and s >= row[label])
        hits += better_or_equal < k
    return hits / len(labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_matches_brute_force_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    # Rounded scores make ties frequent, so the tie rule is exercised.
    logits = (torch.randn(200, 12, generator=gen, dtype=torch.float64) * 2).round()
    labels = torch.randint(0, 12, (200,), generator=gen)
    result = topk_accuracy(logits, labels, ks=(1, 3, 5, 20))
    assert set(result) == {"top1", "top3", "top5"}  # k > classes is skipped
    for k in (1, 3, 5):
        assert result[f"top{k}"] == pytest.approx(brute_topk(logits.numpy(), labels.numpy(), k))


def test_constant_scores_score_zero_not_one():
    assert topk_accuracy(torch.zeros(10, 5), torch.arange(10) % 5, ks=(1,))["top1"] == 0.0


def test_zeroshot_uses_cosine_of_class_embeddings():
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(64, 16, generator=gen) * torch.rand(64, 1, generator=gen) * 5
    classes = torch.randn(7, 16, generator=gen)
    labels = torch.randint(0, 7, (64,), generator=gen)
    img = images.double() / images.double().norm(dim=1, keepdim=True)
    cls = classes.double() / classes.double().norm(dim=1, keepdim=True)
    expected = brute_topk((img @ cls.T).numpy(), labels.numpy(), 5)
    assert zeroshot_scores(images, classes, labels)["top5"] == pytest.approx(expected)


def test_class_embedding_is_normalised_mean_of_normalised_prompt_features():
    gen = torch.Generator().manual_seed(4)
    table: dict[str, torch.Tensor] = {}

    def encode(prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            table.setdefault(p, torch.randn(8, generator=gen) * (1 + len(table)))
        return torch.stack([table[p] for p in prompts])

    templates = ["a {}.", lambda c: f"the {c}!"]
    result = class_embeddings(encode, ["cat", "dog", "eel"], templates)
    assert result.shape == (3, 8)
    for i, name in enumerate(["cat", "dog", "eel"]):
        vecs = [table[f"a {name}."].double(), table[f"the {name}!"].double()]
        mean = sum(v / v.norm() for v in vecs) / 2
        assert torch.allclose(result[i].double(), mean / mean.norm(), atol=1e-6)


def brute_recall(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, k: int) -> tuple[float, float]:
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    sims = images @ texts.T
    i2t = 0
    for i in range(len(images)):
        own = [t for t in range(len(texts)) if owner[t] == i]
        best = max(sims[i, t] for t in own)
        wrong_at_least = sum(1 for t in range(len(texts)) if owner[t] != i and sims[i, t] >= best)
        i2t += wrong_at_least < k
    t2i = 0
    for t in range(len(texts)):
        right = sims[owner[t], t]
        wrong_at_least = sum(1 for i in range(len(images)) if i != owner[t] and sims[i, t] >= right)
        t2i += wrong_at_least < k
    return i2t / len(images), t2i / len(texts)


@pytest.mark.parametrize("duplicates", [False, True])
def test_retrieval_recall_matches_brute_force(duplicates):
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    # Between 1 and 5 captions per image, shuffled, as in COCO/Flickr caption files.
    owner = torch.cat([torch.full((int(torch.randint(1, 6, (1,), generator=gen)),), i) for i in range(40)])
    owner = owner[torch.randperm(owner.numel(), generator=gen)]
    texts = images[owner] + torch.randn(owner.numel(), 6, generator=gen, dtype=torch.float64) * 1.5
    if duplicates:  # identical images and identical captions produce exact ties
        images[20:30] = images[10:20]
        texts[1::3] = texts[0::3][: texts[1::3].shape[0]]
    result = retrieval_recall(images, texts, owner, ks=(1, 5, 10))
    for k in (1, 5, 10):
        i2t, t2i = brute_recall(images.numpy(), texts.numpy(), owner.numpy(), k)
        assert result[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert result[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    six = [v for key, v in result.items() if key != "mean_recall"]
    assert len(six) == 6 and result["mean_recall"] == pytest.approx(sum(six) / 6)
    assert 0 < result["text_to_image_R@10"] < 1


def test_retrieval_rejects_images_without_captions():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recall(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1]))


def test_modality_gap_and_pair_cosine():
    gen = torch.Generator().manual_seed(6)
    images = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    texts = torch.randn(25, 5, generator=gen, dtype=torch.float64)
    owner = torch.randint(0, 10, (25,), generator=gen)
    i = images.numpy() / np.linalg.norm(images.numpy(), axis=1, keepdims=True)
    t = texts.numpy() / np.linalg.norm(texts.numpy(), axis=1, keepdims=True)
    result = modality_gap(images, texts, owner)
    assert result["gap"] == pytest.approx(np.linalg.norm(i.mean(0) - t.mean(0)))
    assert result["pair_cosine"] == pytest.approx(np.mean([t[j] @ i[owner[j]] for j in range(25)]))


def test_purity_ari_ami_against_brute_force():
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 5, size=300)
    predicted = np.where(rng.random(300) < 0.7, truth + 10, rng.integers(0, 8, size=300))
    expected = sum(max(np.sum(truth[predicted == c] == l) for l in np.unique(truth)) for c in np.unique(predicted))
    assert purity(predicted, truth) == pytest.approx(expected / 300)
    scores = agreement(predicted, truth)
    assert 0.2 < scores["ari"] < 1 and 0.2 < scores["ami"] < 1
    perfect = agreement(truth + 3, truth)  # a relabelling is a perfect clustering
    assert perfect == pytest.approx({"ari": 1.0, "ami": 1.0, "purity": 1.0})
    assert abs(agreement(rng.integers(0, 5, 300), truth)["ami"]) < 0.05


def test_size_summary_and_histogram():
    labels = np.array([0, 0, 0, 2, 2, 5])
    summary = size_summary(labels, k=7)
    assert summary["sizes"] == [3, 0, 2, 0, 0, 1, 0]
    assert (summary["n"], summary["empty"], summary["min"], summary["max"]) == (6, 4, 0, 3)
    histogram = size_histogram(np.array(summary["sizes"]), bins=4)
    assert sum(b["clusters"] for b in histogram) == 7
    assert histogram[0] == {"from": 0, "to": 0, "clusters": 4}
    with pytest.raises(ValueError):
        size_summary(labels, k=3)


def test_linear_probe_separable_features_reach_full_accuracy():
    gen = torch.Generator().manual_seed(8)
    centres = torch.randn(4, 10, generator=gen) * 6
    y = torch.randint(0, 4, (400,), generator=gen)
    x = centres[y] + torch.randn(400, 10, generator=gen)
    result = linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decays=(1e-4, 1e-2))
    assert result.top1 >= 0.99
    assert set(result.validation_top1) == {1e-4, 1e-2}
    assert result.train_size == 300 and result.test_size == 100


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_linear_probe_random_labels_stay_near_chance(method):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(600, 32, generator=gen)
    y = torch.randint(0, 4, (600,), generator=gen)
    result = linear_probe(x[:400], y[:400], x[400:], y[400:], weight_decays=(1e-4, 1e-1), method=method, epochs=20)
    # Chance is 0.25; with 200 test samples its standard deviation is about 0.03.
    assert 0.12 < result.top1 < 0.38


def test_linear_probe_picks_weight_decay_on_validation():
    gen = torch.Generator().manual_seed(10)
    centres = torch.randn(3, 5, generator=gen) * 4
    y = torch.randint(0, 3, (200,), generator=gen)
    x = centres[y] + torch.randn(200, 5, generator=gen)
    # A huge penalty collapses the weights to 0 (constant predictions): validation must reject it.
    result = linear_probe(x[:150], y[:150], x[150:], y[150:], weight_decays=(1e-3, 1e3))
    assert result.weight_decay == 1e-3
    assert result.validation_top1[1e3] < result.validation_top1[1e-3]


def _reference_probe_in_numpy(x, y, tx, ty, w0, epochs, batch_size, lr=0.1, momentum=0.9, wd=1e-6):
    """The reference probe written out in float64: softmax cross-entropy gradients, PyTorch's SGD
    (d = g + wd * p; buf = momentum * buf + d, buf = d on the first step; p -= lr * buf), the lr of
    epoch e = lr * (1 + cos(pi * e / epochs)) / 2, unshuffled batches, test top-1 after every epoch."""
    w, b = w0.astype(np.float64), np.zeros(w0.shape[0])
    buf_w = buf_b = None
    history = []
    for epoch in range(epochs):
        rate = lr * (1 + np.cos(np.pi * epoch / epochs)) / 2
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits = xb @ w.T + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1
            d_w, d_b = p.T @ xb / len(yb) + wd * w, p.sum(axis=0) / len(yb) + wd * b
            buf_w, buf_b = (d_w, d_b) if buf_w is None else (momentum * buf_w + d_w, momentum * buf_b + d_b)
            w, b = w - rate * buf_w, b - rate * buf_b
        history.append(float(np.mean((tx @ w.T + b).argmax(axis=1) == ty)))
    return w, b, history


def test_reference_linear_probe_follows_the_references_sgd_and_reports_the_best_epoch():
    gen = torch.Generator().manual_seed(11)
    centres = torch.randn(3, 6, generator=gen) * 2
    y = torch.randint(0, 3, (90,), generator=gen)
    x = centres[y] + torch.randn(90, 6, generator=gen) * 2.0 + 3.0  # raw, uncentred features
    train_x, train_y, test_x, test_y = x[:70], y[:70], x[70:], y[70:]
    result = reference_linear_probe(train_x, train_y, test_x, test_y, epochs=9, batch_size=32, seed=5)
    w0 = (torch.randn(3, 6, generator=torch.Generator().manual_seed(5)) * 0.01).numpy()
    w, b, history = _reference_probe_in_numpy(
        train_x.double().numpy(), train_y.numpy(), test_x.double().numpy(), test_y.numpy(), w0, epochs=9, batch_size=32
    )  # 70 samples in batches of 32: the last batch of every epoch has 6
    np.testing.assert_allclose(result.weight.numpy(), w, atol=1e-5)
    np.testing.assert_allclose(result.bias.numpy(), b, atol=1e-5)
    assert result.test_top1 == pytest.approx(history, abs=1e-6) and result.epochs == 9  # steps of 1/20
    assert result.top1 == max(result.test_top1) and result.best_epoch == history.index(max(history)) + 1


def test_reference_linear_probe_defaults_are_the_references_and_scores_the_best_of_100_epochs():
    gen = torch.Generator().manual_seed(12)
    centres = torch.randn(4, 10, generator=gen) * 3
    y = torch.randint(0, 4, (500,), generator=gen)
    x = centres[y] + torch.randn(500, 10, generator=gen) * 3
    result = reference_linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result.epochs == 100 and len(result.test_top1) == 100
    assert result.top1 == max(result.test_top1) > 0.5
    assert result.test_top1[result.best_epoch - 1] == result.top1
    assert result.test_top1[-1] < result.top1  # on these data the last epoch is not the best: the best is reported


def test_reference_kmeans_labels_recover_separated_blobs():
    from protoclip_cli.evaluation.tasks.clustering import PROTOCOLS, reference_kmeans_labels

    assert PROTOCOLS == {"default": {"iterations": 50, "restarts": 3}, "reference": {"iterations": 100, "restarts": 5}}
    rng = np.random.default_rng(13)
    centres = rng.normal(size=(5, 16)) * 10
    truth = rng.integers(0, 5, 2000)  # 2000 points > 256 per centroid: faiss trains on a sample, then assigns all
    features = centres[truth] + rng.normal(size=(2000, 16))
    predicted = reference_kmeans_labels(features, 5)
    assert predicted.shape == (2000,) and predicted.dtype == np.int64
    assert agreement(predicted, truth)["ari"] == pytest.approx(1.0)
