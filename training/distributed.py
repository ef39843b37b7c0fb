"""torchrun / DDP plumbing: one process per device, gloo on CPU and nccl on GPU."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun; returns (rank, world size, device)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl")
            device = torch.device("cuda", local_rank)
        else:
            dist.init_process_group("gloo")
            device = torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return 0, 1, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1
