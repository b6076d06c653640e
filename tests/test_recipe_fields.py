"""No recipe field is dead: every one reaches the code that builds or runs a training.

A field that is parsed and documented but never used (as ``proto.init`` once was: k-means never saw
it) silently does nothing. The first test records which recipe fields a real, small ProtoCLIP run
reads outside the config machinery (loading, validation, serialisation) and fails naming any field
that nothing read; the few fields only a CUDA or multi-process run reads are listed with that
reason. The second pins the [proto] settings all the way into k-means.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import pytest
import torch

from protoclip_cli.configs import train as recipes
from protoclip_cli.config import explain
from helpers import small_config

# Read only where a CPU test cannot go; each with the reason.
ONLY_ON_CUDA_OR_SEVERAL_RANKS = {
    "model.channels_last": "the memory format of convolutional towers on CUDA",
    "model.sync_batchnorm": "SyncBatchNorm exists under DDP on CUDA only",
}
# Read only when their switch is on, which this run leaves off (a wandb run needs the wandb service).
ONLY_WHEN_SWITCHED_ON = {
    "logging.wandb_project": "logging.wandb (tests/test_wandb.py trains with it on)",
    "logging.wandb_entity": "logging.wandb",
    "logging.wandb_name": "logging.wandb",
    "proto.single_pass_start": "proto.single_pass (tests/test_single_pass.py trains with each value)",
}
# Modules whose reads are the config machinery itself, not a use of the setting.
MACHINERY = {"dataclasses", "copy", "protoclip_cli.config", "protoclip_cli.configs.train"}


def _sections() -> dict[type, str]:
    """Each recipe dataclass and the prefix of its keys ('' for the top level, 'data.', ...)."""
    hints = typing.get_type_hints(recipes.TrainConfig)
    found = {recipes.TrainConfig: ""}
    found.update({hints[f.name]: f.name + "." for f in dataclasses.fields(recipes.TrainConfig)
                  if dataclasses.is_dataclass(hints[f.name])})
    return found


@pytest.fixture
def reads(monkeypatch) -> set[str]:
    """Fully qualified recipe fields read while the fixture is active (outside MACHINERY)."""
    seen: set[str] = set()
    for cls, prefix in _sections().items():
        names = {f.name for f in dataclasses.fields(cls)}

        def tracked(self, name, _names=names, _prefix=prefix):
            if name in _names:
                module = sys._getframe(1).f_globals.get("__name__", "")
                if module not in MACHINERY:
                    seen.add(_prefix + name)
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", tracked)
    return seen


def test_a_protoclip_run_reads_every_recipe_field(synthetic_teacher, synthetic_workspace, reads):
    from protoclip_cli.stages.train import run

    torch.set_num_threads(2)
    config = small_config("name='fields-read'", teacher=Path(synthetic_teacher).stem)
    reads.clear()  # loading and validating the recipe are not uses
    run(config, synthetic_workspace)
    leaves = {key for key, *_ in explain(recipes.TrainConfig)}
    unread = sorted(leaves - reads - set(ONLY_ON_CUDA_OR_SEVERAL_RANKS) - set(ONLY_WHEN_SWITCHED_ON))
    assert not unread, f"recipe fields no code read during a training run: {unread}"
    assert set(ONLY_ON_CUDA_OR_SEVERAL_RANKS) <= leaves  # the list names real fields


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_every_proto_setting_reaches_kmeans(backend):
    from protoclip_cli.core.kmeans import kmeans
    from protoclip_cli.configs.train import ProtoConfig
    from protoclip_cli.training.prototypes import build_prototypes

    generator = torch.Generator().manual_seed(0)
    features = {"image": torch.randn(80, 8, generator=generator), "text": torch.randn(80, 8, generator=generator),
                "teacher": torch.randn(80, 6, generator=generator)}
    keys = torch.arange(80)
    results = {}
    for init in ("random", "kmeans++"):
        proto = ProtoConfig(k=6, teacher_k=4, iterations=3, restarts=2, init=init, backend=backend)
        built = build_prototypes(2, keys, features, proto, seed=5)
        assert built.centroids["image"].shape == (6, 8) and built.centroids["teacher"].shape == (4, 6)
        # The trainer's clustering is k-means called with every setting of the section.
        for offset, (modality, k) in enumerate((("image", 6), ("text", 6), ("teacher", 4))):
            direct = kmeans(features[modality], k, iterations=3, restarts=2, seed=5 + 7919 * 2 + offset,
                            backend=backend, init=init)
            assert torch.equal(torch.from_numpy(built.centroids[modality]), direct.centroids), (init, modality)
        results[init] = built.centroids["image"]
    assert not (results["random"] == results["kmeans++"]).all()
