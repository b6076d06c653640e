"""Linear probe: multinomial logistic regression on frozen features, in torch; the task
(:func:`evaluate`) and its math on feature tensors.

Features are standardised with the training mean and standard deviation. The L2 penalty
(``weight_decay * ||W||^2``, bias excluded) is chosen on a validation split carved at random from
the training set; the probe is then refit on the whole training set and scored on the test set
(top-1, top-5, mean per-class recall). Optimisers: full-batch L-BFGS (strong Wolfe line search;
exact and fast up to a few hundred thousand samples on a GPU) or mini-batch Adam (for larger sets).

:func:`reference_linear_probe` is the ProtoCLIP reference's protocol instead (SGD for 100 epochs on
the raw features, best test accuracy over the epochs), for numbers comparable with the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from protoclip_cli.errors import ProtoclipError
from protoclip_cli.evaluation.data.image_set import ImageSet
from protoclip_cli.evaluation.tasks.features import image_features
from protoclip_cli.evaluation.tasks.model import EvalModel
from protoclip_cli.evaluation.tasks.percent import percent, percents
from protoclip_cli.evaluation.tasks.zeroshot import mean_per_class_recall, topk_accuracy

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class LinearProbeResult:
    top1: float
    weight_decay: float
    top5: float | None = None  # None with fewer than 5 classes
    mean_per_class_recall: float = 0.0
    validation_top1: dict[float, float] = field(default_factory=dict)
    train_size: int = 0
    test_size: int = 0


@dataclass
class LogisticRegression:
    """A fitted probe: logits = ((x - mean) / std) @ weight.T + bias."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.weight) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    method: str = "lbfgs",
    max_iter: int = 300,
    epochs: int = 30,
    batch_size: int = 4096,
    lr: float = 1e-3,
    seed: int = 0,
) -> LogisticRegression:
    """Minimise mean cross-entropy + ``weight_decay * ||W||^2`` on (x, y); x stays on its device."""
    x = x.float()
    y = y.long().to(x.device)
    mean = x.mean(dim=0)
    std = x.std(dim=0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(mean)
    z = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_classes, x.shape[1], generator=generator) * 0.01).to(x.device).requires_grad_()
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)

    def loss_on(rows: torch.Tensor | slice) -> torch.Tensor:
        return F.cross_entropy(z[rows] @ weight.T + bias, y[rows]) + weight_decay * weight.pow(2).sum()

    if method == "lbfgs":
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
            tolerance_grad=1e-7, tolerance_change=1e-10,
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = loss_on(slice(None))
            loss.backward()
            return loss

        optimizer.step(closure)
    elif method == "adam":
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            for start in range(0, x.shape[0], batch_size):
                optimizer.zero_grad()
                loss_on(order[start : start + batch_size]).backward()
                optimizer.step()
    else:
        raise ValueError(f"unknown linear-probe method {method!r} (lbfgs or adam)")
    return LogisticRegression(weight.detach(), bias.detach(), mean, std)


def top1(model: LogisticRegression, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.predict(x).cpu() == y.long().cpu()).float().mean())


def validation_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows): a seeded random ``fraction`` of ``n`` (at least one of each)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(n * fraction)), n - 1)
    return order[n_val:], order[:n_val]


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    validation_fraction: float = 0.2,
    method: str = "lbfgs",
    seed: int = 0,
    **fit_kwargs,
) -> LinearProbeResult:
    """Choose the weight decay on a validation split of train, refit on all of train, score on test."""
    if train_x.shape[0] < 2:
        raise ValueError("the linear probe needs at least two training samples")
    num_classes = int(max(int(train_y.max()), int(test_y.max())) + 1)
    fit_rows, val_rows = validation_split(train_x.shape[0], validation_fraction, seed)
    scores: dict[float, float] = {}
    for wd in weight_decays:
        probe = fit_logistic_regression(
            train_x[fit_rows], train_y[fit_rows], num_classes, wd, method=method, seed=seed, **fit_kwargs
        )
        scores[float(wd)] = top1(probe, train_x[val_rows], train_y[val_rows])
    # Ties go to the strongest regularisation: the simpler model generalises at least as well.
    best = max(scores, key=lambda wd: (scores[wd], wd))
    probe = fit_logistic_regression(train_x, train_y, num_classes, best, method=method, seed=seed, **fit_kwargs)
    # Ranks with ties against the model, as zero-shot: top-1 is argmax agreement unless scores tie exactly.
    logits = probe.logits(test_x).cpu()
    return LinearProbeResult(
        top1=top1(probe, test_x, test_y),
        top5=topk_accuracy(logits, test_y.cpu(), ks=(5,)).get("top5"),
        mean_per_class_recall=mean_per_class_recall(logits, test_y.cpu()),
        weight_decay=best,
        validation_top1=scores,
        train_size=int(train_x.shape[0]),
        test_size=int(test_x.shape[0]),
    )


# -- the reference protocol --------------------------------------------------------------------------


@dataclass
class ReferenceProbeResult:
    top1: float  # the best test top-1 over the epochs
    best_epoch: int  # 1-based
    test_top1: list[float] = field(default_factory=list)  # after each epoch
    epochs: int = 0
    train_size: int = 0
    test_size: int = 0
    weight: torch.Tensor | None = None  # the classifier after the last epoch
    bias: torch.Tensor | None = None


def reference_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int = 100,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
    batch_size: int = 1024,
    seed: int = 0,
) -> ReferenceProbeResult:
    """The linear probe of megvii-research/protoclip (``logistic_regression_pytorch`` in
    ``src/training/evaluations/linear_eval.py``), with its hyper-parameters as defaults.

    A ``Linear`` layer (weights N(0, 0.01) from a generator seeded with ``seed``, bias 0) on the raw
    features (no standardisation), one output per class up to the largest training label;
    cross-entropy; SGD (lr 0.1, momentum 0.9,
    weight decay 1e-6 on weights and bias) with a cosine schedule stepped per epoch
    (``CosineAnnealingLR(T_max=epochs)``); mini-batches of 1024 in the training set's order (its
    DataLoader does not shuffle), the last one partial. After every epoch the whole test set is
    scored, and the best test top-1 over the epochs is reported: a selection on the test set,
    kept so the number can be compared with the paper's.
    """
    device = train_x.device
    x = train_x.float()
    y = train_y.long().to(device)
    tx = test_x.float().to(device)
    ty = test_y.long().to(device)
    num_classes = int(train_y.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    classifier = torch.nn.Linear(x.shape[1], num_classes).to(device)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(num_classes, x.shape[1], generator=generator) * 0.01)
        classifier.bias.zero_()
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    history: list[float] = []
    for _ in range(epochs):
        for start in range(0, x.shape[0], batch_size):
            loss = F.cross_entropy(classifier(x[start : start + batch_size]), y[start : start + batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            history.append(float((classifier(tx).argmax(dim=1) == ty).float().mean()))
        scheduler.step()
    best = max(range(epochs), key=lambda e: (history[e], -e))
    return ReferenceProbeResult(
        top1=history[best], best_epoch=best + 1, test_top1=history, epochs=epochs,
        train_size=int(x.shape[0]), test_size=int(tx.shape[0]),
        weight=classifier.weight.detach(), bias=classifier.bias.detach(),
    )


def evaluate(
    model: EvalModel,
    train: ImageSet,
    test: ImageSet,
    cache_dir: Path | None,
    batch_size: int,
    workers: int,
    method: str,
    weight_decays: Sequence[float],
    seed: int,
    protocol: str = "default",
) -> dict:
    """Top-1 of logistic regression on frozen image features.

    ``protocol="default"``: normalised features, weight decay chosen on a validation split of train,
    refit, scored once on test (:func:`linear_probe`). ``"reference"``: the ProtoCLIP reference's SGD
    probe on the raw features, best test top-1 over its 100 epochs (:func:`reference_linear_probe`).
    """
    train_y = torch.from_numpy(train.require_labels("the linear probe"))
    test_y = torch.from_numpy(test.require_labels("the linear probe"))
    if len(train.classnames) != len(test.classnames):
        raise ProtoclipError(
            f"Train ({train.name}) has {len(train.classnames)} classes but test ({test.name}) has "
            f"{len(test.classnames)}; both splits need the same class folders."
        )
    normalized = protocol != "reference"  # the reference probes the raw image tower outputs
    train_x = image_features(model, train, cache_dir, batch_size, workers, normalized=normalized).to(model.device)
    test_x = image_features(model, test, cache_dir, batch_size, workers, normalized=normalized).to(model.device)
    common = {"train_images": int(train_x.shape[0]), "test_images": int(test_x.shape[0]),
              "classes": len(train.classnames), "protocol": protocol,
              "chance_top1": round(100.0 / len(train.classnames), 4)}
    if protocol == "reference":
        ref = reference_linear_probe(train_x, train_y, test_x, test_y, seed=seed)
        return {
            "metrics": {"top1": percent(ref.top1)},
            "method": "sgd", "features": "raw", "epochs": ref.epochs, "best_epoch": ref.best_epoch,
            "test_top1_per_epoch": [percent(v) for v in ref.test_top1],
            "selection": "best test top-1 over the epochs (the reference's; not a held-out estimate)",
            **common,
        }
    result = linear_probe(train_x, train_y, test_x, test_y, weight_decays=weight_decays, method=method, seed=seed)
    metrics = {"top1": result.top1, "mean_per_class_recall": result.mean_per_class_recall}
    if result.top5 is not None:
        metrics["top5"] = result.top5
    return {
        "metrics": percents(metrics),
        "weight_decay": result.weight_decay,
        "validation_top1": {str(wd): percent(v) for wd, v in result.validation_top1.items()},
        "method": method,
        "features": "normalised",
        "selection": "weight decay on a 20% validation split of train, refit, scored once on test",
        **common,
    }
