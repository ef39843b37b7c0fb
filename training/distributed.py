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


def leave_process_group(succeeded: bool) -> None:
    """Leave torchrun's process group at the end of a run. After a run that succeeded every rank
    first meets at a barrier, so that none shuts its connections down while a peer is still in a
    collective (seen once in CI: a rank aborting at exit after an FSDP run). After a failure the
    rank leaves at once: a barrier would wait for peers that may never come."""
    if not is_distributed():
        return
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1
