"""Routing consistency: student routing matches the Sinkhorn-balanced teacher routing.

The balancing spreads a batch evenly over the experts (maximum inter-modality entropy), so
the router learns to split images into expert subspaces without modality labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cross_view import cross_view_cross_entropy
from ..distributed import all_reduce_sum, world_size


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, eps: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Balanced assignment (B, E) from routing logits (B, E), in fp32, without gradient.

    Alternately normalises experts (columns) to equal mass 1/E and samples (rows) to mass
    1/B over the global batch (marginals are summed across ranks); rows of the result sum to 1.
    """
    q = torch.exp((logits.float() - logits.float().max()) / eps).t()  # (E, B)
    num_experts, batch = q.shape
    global_batch = batch * world_size()
    q /= all_reduce_sum(q.sum()).clamp_min(1e-30)
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(1e-30)
        q /= num_experts
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= global_batch
    return (q * global_batch).t()


class RoutingConsistencyLoss(nn.Module):
    """Cross-entropy between the balanced teacher routing of each global view and the student
    routing ``softmax(logits / student_temp)`` of every other view."""

    def __init__(self, student_temp: float = 0.1, eps: float = 0.05, iterations: int = 3) -> None:
        super().__init__()
        self.student_temp, self.eps, self.iterations = student_temp, eps, iterations

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, num_crops: int) -> torch.Tensor:
        """student_logits: (num_crops * B, E); teacher_logits: (2 * B, E) for the global views."""
        student = F.log_softmax(student_logits.float() / self.student_temp, dim=-1).chunk(num_crops)
        targets = [sinkhorn_knopp(t, self.eps, self.iterations) for t in teacher_logits.chunk(2)]
        return cross_view_cross_entropy(targets, student)
