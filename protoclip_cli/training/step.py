"""One optimiser step: forward, losses, backward, clipping and the update, over one batch or over
several micro-batches whose gradients accumulate (``optim.accum_freq``).

Gradient accumulation is OpenCLIP's ``--accum-freq`` method, which keeps every loss over the whole
accumulated batch instead of averaging per-micro-batch losses (which would shrink the contrastive
batch and the prototype losses' batch to a micro-batch):

1. every micro-batch goes through the model without gradients; its features (tower features and
   projections) are kept;
2. the labels of the whole step are computed once from them (faithful mode: looked up by key;
   single-pass mode: nearest prototypes of these features, the teacher's from the loader);
3. each micro-batch in turn is recomputed with gradients, its fresh features put in place of its
   cached ones, and the image-text loss of the whole accumulated batch backpropagated; the gradient
   reaching micro-batch j's features is therefore the whole-batch loss's, and the sum over j is the
   whole-batch gradient of every weight. The prototype and teacher terms are per-sample means
   against fixed prototypes: micro-batch j computes only its own rows' share of them (the other
   rows' gradient would reach cached features only), so their (batch x k) scores are computed once
   per step rather than once per micro-batch; the step's reported terms add up the shares (and,
   under DDP, the ranks' shares).

Two differences from open_clip_train, both to make A micro-batches of n give the update of one batch
of A x n: the temperatures and the sigmoid loss's bias enter every micro-batch's loss directly, so
each backward gives them the whole gradient and open_clip_train's sum is A times it; here they are
divided by A. And the first pass leaves BatchNorm running statistics as they were (each sample
updates them once, in its pass with gradients). What does differ from a batch of A x n: BatchNorm
layers (the projection heads', a ResNet's) normalise over a micro-batch, as they normalise over one
GPU's batch under DDP; randomness inside the model (dropout) would draw differently in the two
passes (the shipped towers have none).

Memory: only the features (a few hundred floats per sample) of the whole accumulated batch are kept,
so activations are those of one micro-batch; the price is one extra forward pass per micro-batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from protoclip_cli.core.distributed import all_reduce_sum, is_distributed
from protoclip_cli.training.episodes import Phase

# Per-sample outputs of the model; the rest (scales, bias) are parameters of the model.
FEATURES = ("image_features", "text_features", "image_proj", "text_proj")
# Loss terms that are sums over samples: a micro-batch computes its rows' share (losses.py, ``rows``).
SHARED_TERMS = ("proto", "proto_img2txt", "proto_txt2img", "acc_img2txt", "acc_txt2img",
                "ext", "ext_img", "ext_txt", "acc_img2ext", "acc_txt2ext")


def loss_multiplier(world_size: int, mode: str) -> int:
    """What the loss is multiplied by before backward: the world size under 'global-batch', else 1."""
    return world_size if (mode == "global-batch" and world_size > 1) else 1


def backward(total: torch.Tensor, model: torch.nn.Module, world_size: int, mode: str) -> None:
    """Backpropagate the global-batch loss ``total`` computed on this rank.

    Every loss term covers the global batch (features gathered from all ranks), but its gradient
    reaches only this rank's features, and DDP averages the ranks' gradients. 'reference' leaves it at
    that, as the reference implementation does: the weights' gradient is 1/world size of the
    global-batch loss's. 'global-batch' scales the loss by the world size, which makes it exactly the
    gradient of one process seeing the whole global batch; the temperatures (and the sigmoid loss's
    bias) scale or shift every rank's logits, so their gradient is already the global one on each
    rank and is scaled back.
    """
    multiplier = loss_multiplier(world_size, mode)
    if multiplier == 1:
        total.backward()
        return
    (total * multiplier).backward()
    divide_scalar_gradients(model, multiplier)


def divide_scalar_gradients(model: torch.nn.Module, divisor: float) -> None:
    """Divide the gradients of the temperatures and the logit bias (``model.scalar_parameters()``)."""
    for scalar in model.scalar_parameters():
        if scalar.grad is not None:
            scalar.grad.div_(divisor)


def micro_batches(batches: Iterable[dict], count: int) -> Iterator[list[dict]]:
    """The batches of a pass in groups of ``count`` consecutive ones (an incomplete last group is dropped)."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == count:
            yield group
            group = []


@contextlib.contextmanager
def batchnorm_statistics_kept(model: torch.nn.Module) -> Iterator[None]:
    """Restore every BatchNorm's running statistics on exit (a pass that must not update them)."""
    kept = [
        (module, [buffer.clone() for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)])
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, (mean, var, tracked) in kept:
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
                module.num_batches_tracked.copy_(tracked)


def _sum_over_ranks(shares: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole global batch's terms from this rank's shares (one all-reduce under DDP)."""
    if not shares or not is_distributed():
        return shares
    summed = all_reduce_sum(torch.stack([shares[name] for name in shares]))
    return dict(zip(shares, summed))


# (outputs of the whole step, its micro-batches) -> labels of the whole step, or None without prototypes
Labeller = Callable[[dict, list[dict]], "dict[str, torch.Tensor] | None"]


@dataclass
class Stepper:
    """Runs optimiser steps of one model; ``inputs(batch) -> (images, tokens)`` on the device.

    ``train_model`` is what the forward goes through (the model, or its DDP / compiled wrapper);
    ``no_sync`` is DDP's context that skips the gradient all-reduce (all but the last micro-batch).
    """

    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager]
    inputs: Callable[[dict], tuple[torch.Tensor, torch.Tensor]]
    world_size: int = 1
    ddp_gradients: str = "reference"
    grad_clip: float = 0.0
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None

    def step(self, batches: list[dict], phase: Phase, labeller: Labeller, protos) -> tuple[dict, dict]:
        """One optimiser step over ``batches`` (one batch, or the micro-batches of one step).

        Returns the loss terms (of the whole step's batch) and the outputs of the whole step: the
        features of every micro-batch in order (detached when accumulated) and the scales.
        """
        self.optimizer.zero_grad(set_to_none=True)
        terms, outputs = self.gradients(batches, phase, labeller, protos)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.model.clamp_temperatures()
        return terms, outputs

    def gradients(self, batches: list[dict], phase: Phase, labeller: Labeller, protos) -> tuple[dict, dict]:
        """Accumulate the step's gradients into ``.grad`` (no update); returns terms and outputs."""
        if len(batches) == 1:
            images, tokens = self.inputs(batches[0])
            with self.autocast():
                outputs = self.train_model(images, tokens)
            terms = self._loss(outputs, labeller(outputs, batches), phase, protos)
            backward(terms["total"], self.model, self.world_size, self.ddp_gradients)
            return terms, outputs
        return self._accumulated(batches, phase, labeller, protos)

    def _loss(self, outputs: dict, labels, phase: Phase, protos, rows: slice | None = None) -> dict:
        return self.loss_fn(outputs, labels=labels, protos=protos, use_proto=phase.use_proto, use_ext=phase.use_ext,
                            rows=rows)

    def _accumulated(self, batches: list[dict], phase: Phase, labeller: Labeller, protos) -> tuple[dict, dict]:
        cached: list[dict[str, torch.Tensor]] = []
        with torch.no_grad(), batchnorm_statistics_kept(self.model):
            for batch in batches:
                images, tokens = self.inputs(batch)
                with self.autocast():
                    outputs = self.train_model(images, tokens)
                cached.append({name: outputs[name] for name in FEATURES if outputs.get(name) is not None})
        whole = {name: torch.cat([c[name] for c in cached]) for name in cached[0]}
        labels = labeller(whole, batches)
        multiplier = loss_multiplier(self.world_size, self.ddp_gradients)
        last = len(batches) - 1
        shares: dict[str, torch.Tensor] = {}
        start = 0
        for index, batch in enumerate(batches):
            images, tokens = self.inputs(batch)
            sync = self.no_sync() if (self.no_sync is not None and index < last) else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    outputs = self.train_model(images, tokens)
                mixed = {name: outputs[name] for name in outputs if name not in FEATURES}
                for name in whole:
                    mixed[name] = torch.cat([c[name] for c in cached[:index]] + [outputs[name]]
                                            + [c[name] for c in cached[index + 1 :]])
                rows = slice(start, start + len(cached[index]["image_features"]))
                start = rows.stop
                terms = self._loss(mixed, labels, phase, protos, rows)
                (terms["total"] * multiplier if multiplier != 1 else terms["total"]).backward()
            for name in SHARED_TERMS if (phase.use_proto or phase.use_ext) else ():
                if name in terms:
                    shares[name] = shares.get(name, 0) + terms[name].detach()
        # Each micro-batch's loss gave the scalars their whole gradient: A times over (losses.py
        # scales the prototype temperature's gradient of a micro-batch's share to match).
        divide_scalar_gradients(self.model, multiplier * len(batches))
        terms = {**terms, **_sum_over_ranks(shares)}
        terms["total"] = self.loss_fn.total_of(terms).detach()
        return terms, {**{name: value for name, value in outputs.items() if name not in FEATURES}, **whole}
