"""Stages own the worker processes they start: none outlives the stage, whether it finishes or fails,
so calling the library twice in one process (the demo, compare, a notebook) prints nothing stray."""

from __future__ import annotations

import gc
import multiprocessing

import pytest
import torch
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from conftest import linked_workspace
from helpers import small_config


def _live_loader_iterators() -> list:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is _MultiProcessingDataLoaderIter and not o._shutdown]


@pytest.fixture
def own_workspace(synthetic_workspace, tmp_path):
    return linked_workspace(synthetic_workspace, tmp_path / "ws")


def test_train_then_evaluate_in_one_process_leaves_no_worker_and_prints_nothing_stray(own_workspace, capfd):
    from protoclip_cli.stages import evaluate, train

    torch.set_num_threads(2)
    config = small_config("name='two-stages'", "data.workers=2", "schedule.episodes=2", "schedule.lit_start_episode=99")
    train.run(config, own_workspace)
    # The cause, not only its symptom (which depends on when garbage collection runs).
    assert multiprocessing.active_children() == []
    assert _live_loader_iterators() == []
    capfd.readouterr()
    evaluate.run(evaluate.EvaluateConfig(task="zeroshot", model=config.name, workers=2, plots=False, cache=False),
                 own_workspace)
    gc.collect()
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err, err[-2000:]
    assert multiprocessing.active_children() == []


def test_a_failed_train_stops_its_workers_too(own_workspace):
    from protoclip_cli.errors import ProtoclipError
    from protoclip_cli.stages import train

    # An absurd learning rate: the loss becomes non-finite and the stage fails with its sentence.
    config = small_config("name='diverges'", "data.workers=2", "optim.lr=1e6", "schedule.warmup_steps=0",
                          "optim.grad_clip=0.0")
    with pytest.raises(ProtoclipError, match="non-finite"):
        train.run(config, own_workspace)
    assert multiprocessing.active_children() == []
    assert _live_loader_iterators() == []
