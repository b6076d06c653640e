"""The process's device and its place in a torchrun or srun launch.

:func:`resolve_device` turns a ``device`` setting into a ``torch.device`` (every stage uses it);
:func:`init_distributed` joins the process group torchrun describes in the environment, or that
SLURM's ``srun`` describes (``core/slurm.py`` turns it into torchrun's variables). The collective
helpers below are no-op identities with world size 1.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from protoclip_cli.core.slurm import launch_environment
from protoclip_cli.errors import ProtoclipError


def local_rank() -> int:
    """This process's GPU index on its machine under torchrun (0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's CUDA device (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU.

    ``cuda`` without an index also means ``cuda:LOCAL_RANK``, so one setting serves every rank of
    a torchrun launch. A CUDA device on a machine without one, or a name torch does not know, is a
    :class:`~protoclip_cli.errors.ProtoclipError`.
    """
    if name == "auto":
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ProtoclipError(f"'{name}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProtoclipError(f"Device '{name}' was requested but this machine has no CUDA device; use cpu instead.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
    return device


def launched_by_torchrun() -> bool:
    """torchrun (and torch.distributed.launch) set these for every process it starts."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device: str) -> bool:
    """Join the process group of a torchrun or srun launch: NCCL on CUDA, gloo on the CPU. Started by
    torchrun, even one process joins (``--nproc_per_node 1`` goes through the same start-up as
    eight); a world of one then trains as a single process. A task of a multi-task ``srun`` step
    first gets torchrun's variables from SLURM's (those already set win). Returns True when this
    call created the group (the caller then destroys it)."""
    if dist.is_initialized():
        return False
    os.environ.update(launch_environment(os.environ))
    if not (launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return False
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank())
    try:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    except (RuntimeError, ValueError) as error:  # torch's DistStoreError is a RuntimeError
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ProtoclipError(
            f"Rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} could not join the others at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({reason}); start every rank with "
            "the same torchrun or srun command (srun: one task per GPU), or set MASTER_PORT to a free port."
        ) from error
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0 (no gradient)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` of all ranks along dim 0; gradients flow to this rank's part only.

    Each rank computes the loss over the global batch; gradients of the other ranks' parts would be
    the same computation done by those ranks, so only the local part keeps its autograd history.
    """
    if not is_distributed():
        return tensor
    parts = list(all_gather_cat(tensor.detach()).chunk(world_size()))
    parts[rank()] = tensor
    return torch.cat(parts)


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank (small control data only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
