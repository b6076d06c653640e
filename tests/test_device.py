"""One device resolution for every stage (core.distributed.resolve_device), and the torchrun
start-up being a no-op outside torchrun."""

from __future__ import annotations

import pytest
import torch

from protoclip_cli.core.distributed import init_distributed, resolve_device
from protoclip_cli.errors import ProtoclipError


def test_cpu_and_auto(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_sentence():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ProtoclipError, match=f"Device '{name}' was requested but this machine has no CUDA device; use cpu"):
            resolve_device(name)


@pytest.mark.gpu
def test_cuda_without_index_is_the_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    assert resolve_device("cuda") == torch.device("cuda", torch.cuda.device_count() - 1)
    assert resolve_device("auto") == torch.device("cuda", torch.cuda.device_count() - 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_unknown_device_name_is_one_sentence():
    with pytest.raises(ProtoclipError, match="'gpu0' is not a device; use auto, cpu, cuda or cuda:N."):
        resolve_device("gpu0")


def test_init_distributed_outside_torchrun_does_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") is False
    assert not torch.distributed.is_initialized()


def test_one_process_started_by_torchrun_joins_a_process_group(monkeypatch):
    """torchrun --nproc_per_node 1 goes through the same start-up as more processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    try:
        assert init_distributed("cpu") is True
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        assert init_distributed("cpu") is False  # already joined
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
