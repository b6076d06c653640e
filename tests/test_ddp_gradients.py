"""What a distributed step's gradient is (``optim.ddp_gradients``), on 2 gloo ranks against one process,
and which BatchNorm layers become SyncBatchNorm (``model.sync_batchnorm``); with either image-text loss
(``loss.contrastive``: the sigmoid loss's bias is a scalar like the temperatures), and with gradient
accumulation (``optim.accum_freq``: DDP's all-reduce skipped with ``no_sync`` until the last micro-batch).

Each rank computes the losses over the gathered global batch; its backward reaches its own features
and DDP averages the ranks' gradients. 'reference' (the default, as the reference implementation)
therefore gives the weights 1/world size of the one-process gradient and the temperatures the full
one; 'global-batch' gives exactly the one-process gradient.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

WORLD = 2
BATCH = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONTRASTIVE = ("infonce", "sigmoid")


def _setup(seed: int = 0, contrastive: str = "infonce"):
    from protoclip_cli.core.losses import Prototypes, ProtoCLIPLoss
    from protoclip_cli.core.model import build_model
    from protoclip_cli.configs.train import ModelConfig

    torch.manual_seed(seed)
    # No hidden head layer: BatchNorm would normalise per rank and make the two runs differ by design.
    model = build_model(ModelConfig(projection_dim=16, projection_hidden_dim=32, projection_n_layers=0), contrastive)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 64, 64, generator=generator)
    tokens = torch.randint(1, 400, (BATCH, model.context_length), generator=generator)
    k, d = 5, 16
    protos = Prototypes(*(torch.nn.functional.normalize(torch.randn(k, d, generator=generator), dim=1) for _ in range(4)),
                        ext_centroids=torch.randn(k, 8, generator=generator),
                        ext_in_img=torch.nn.functional.normalize(torch.randn(k, d, generator=generator), dim=1),
                        ext_in_txt=torch.nn.functional.normalize(torch.randn(k, d, generator=generator), dim=1))
    labels = {name: torch.randint(0, k, (BATCH,), generator=generator) for name in ("img", "txt", "ext")}
    return model, ProtoCLIPLoss(contrastive=contrastive), images, tokens, protos, labels


def _gradients(model, loss_fn, forward, images, tokens, protos, labels, world, mode) -> dict[str, torch.Tensor]:
    from protoclip_cli.training.step import backward

    terms = loss_fn(forward(images, tokens), labels=labels, protos=protos, use_proto=True, use_ext=True)
    backward(terms["total"], model, world, mode)
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _accumulated_gradients(rank: int, mode: str) -> dict[str, torch.Tensor]:
    """This rank's half of the batch as two micro-batches (optim.accum_freq = 2) under DDP, no_sync between."""
    import contextlib

    from protoclip_cli.training.episodes import Phase
    from protoclip_cli.training.step import Stepper

    model, loss_fn, images, tokens, protos, labels = _setup()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    half = BATCH // WORLD
    micro = [{"images": images[s : s + half // 2], "tokens": tokens[s : s + half // 2], "rows": slice(s, s + half // 2)}
             for s in range(rank * half, (rank + 1) * half, half // 2)]

    def labeller(outputs, batches):
        return {name: torch.cat([value[b["rows"]] for b in batches]) for name, value in labels.items()}

    stepper = Stepper(model, ddp, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn, contextlib.nullcontext,
                      lambda b: (b["images"], b["tokens"]), world_size=WORLD, ddp_gradients=mode, no_sync=ddp.no_sync)
    stepper.gradients(micro, Phase("proto", True, True, False), labeller, protos)
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, port: int, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    grads = {}
    for contrastive in CONTRASTIVE:
        model, loss_fn, images, tokens, protos, labels = _setup(contrastive=contrastive)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        grads[contrastive] = _gradients(model, loss_fn, ddp, images[part], tokens[part], protos,
                                        {k: v[part] for k, v in labels.items()}, WORLD, mode)
    grads["accumulated"] = _accumulated_gradients(rank, mode)
    if rank == 0:
        torch.save(grads, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["reference", "global-batch"])
@pytest.mark.integration  # starts processes
def test_two_ranks_give_the_documented_gradient(mode, tmp_path):
    out = str(tmp_path / "grads.pt")
    torch.multiprocessing.spawn(_rank, args=(_free_port(), mode, out), nprocs=WORLD, join=True)
    everything = torch.load(out, weights_only=True)
    # Each rank accumulating two micro-batches gives what it gives without accumulation.
    for contrastive, distributed in [*((c, everything[c]) for c in CONTRASTIVE), ("infonce", everything["accumulated"])]:
        model, loss_fn, images, tokens, protos, labels = _setup(contrastive=contrastive)
        single = _gradients(model, loss_fn, model, images, tokens, protos, labels, 1, mode)
        assert distributed.keys() == single.keys()
        # The parameters that scale or shift every logit (the sigmoid loss's bias too).
        scalars = {"clip.logit_scale", "logit_scale_proto"} | ({"clip.logit_bias"} if contrastive == "sigmoid" else set())
        assert scalars <= set(single)
        for name, expected in single.items():
            factor = 1.0 if (mode == "global-batch" or name in scalars) else 1.0 / WORLD
            scale = float(expected.abs().max()) or 1.0
            assert torch.allclose(distributed[name], expected * factor, atol=2e-5 * scale, rtol=1e-4), (contrastive, name)


def test_sync_batchnorm_converts_what_the_recipe_names():
    from protoclip_cli.core.model import build_model
    from protoclip_cli.configs.train import ModelConfig
    from protoclip_cli.training.setup import sync_batchnorm

    import copy

    built = build_model(ModelConfig(arch="RN50", projection_dim=16, projection_hidden_dim=32))

    def count(which: str) -> tuple[int, int]:
        model = copy.deepcopy(built)
        plain = sum(isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d) for m in model.modules())
        return sync_batchnorm(model, which), plain

    none, plain = count("none")
    heads, _ = count("heads")
    every, _ = count("all")
    assert none == 0
    assert heads == 2  # one Linear-BatchNorm-ReLU block in each head
    assert every == plain > 50  # the RN50 tower's ~53 as well
