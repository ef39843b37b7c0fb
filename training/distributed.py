"""DDP plumbing beside :func:`midol_hub.utils.join_torchrun`: collectives that are no-ops in one process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1
