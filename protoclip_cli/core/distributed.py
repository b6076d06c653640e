"""torch.distributed helpers. Every function is a no-op identity with world size 1."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
