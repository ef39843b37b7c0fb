"""Routing consistency: the student's routing follows the Sinkhorn-balanced teacher routing.

Balancing spreads every batch evenly over the experts, so the router learns to split images
into expert subspaces without modality labels. Two forms:

* ``official``: the M-IDoL code's form. Teacher targets a_T = Sinkhorn(teacher logits /
  teacher temperature); loss ``-sum_i a_S,i * log a_T,i`` with a_S = softmax(student logits /
  0.1). The student distribution weights the log of the target, so the loss is lowest when
  the student puts all its mass on the target's argmax.
* ``balanced``: a_T = Sinkhorn(raw teacher logits); loss ``-sum_i a_T,i * log a_S,i``, the
  usual (SwAV-style) cross-entropy towards the balanced target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum, world_size
from .cross_view import cross_view_pairs

ROUTING_FORMS = ("official", "balanced")
TINY = 1e-12


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, eps: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Balanced assignment (B, E) of routing logits (B, E), as the official code computes it.

    fp32 and no gradient; each row is shifted by its maximum before ``exp(logits / eps)``;
    each iteration gives every expert mass 1/E (sums over all ranks), then every sample mass
    1/B; values are clamped at 1e-12 and the rows of the result sum to 1.
    """
    x = logits.float()
    q = torch.exp((x - x.max(dim=1, keepdim=True).values) / eps).t().clamp_min(TINY)  # (E, B)
    q = q / (q.sum() + TINY)
    num_experts, batch = q.shape
    global_batch = batch * world_size()
    for _ in range(iterations):
        q = q / (all_reduce_sum(q.sum(dim=1, keepdim=True)) + TINY) / num_experts
        q = q / (q.sum(dim=0, keepdim=True) + TINY) / global_batch
        q = q.clamp_min(TINY)
    out = (q * global_batch).t().clamp_min(TINY)
    return out / (out.sum(dim=1, keepdim=True) + TINY)


class RoutingLoss(nn.Module):
    """Mean over cross-view pairs (teacher global view g, student view j != g) of the batch-mean
    routing cross-entropy, in the ``official`` or ``balanced`` form (see the module docstring)."""

    def __init__(self, form: str = "official", student_temp: float = 0.1, eps: float = 0.05, iterations: int = 3) -> None:
        super().__init__()
        if form not in ROUTING_FORMS:
            raise ValueError(f"routing form must be one of {', '.join(ROUTING_FORMS)}, got {form!r}")
        self.form, self.student_temp, self.eps, self.iterations = form, student_temp, eps, iterations

    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> list[torch.Tensor]:
        """The balanced teacher routing of each global view, (B, E) each, without gradient."""
        scale = teacher_temp if self.form == "official" else 1.0
        return [sinkhorn_knopp(view / scale, self.eps, self.iterations) for view in teacher_logits.float().chunk(2)]

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, num_crops: int,
                teacher_temp: float) -> torch.Tensor:
        """student_logits: (num_crops * B, E); teacher_logits: (2 * B, E) of the global views."""
        targets = self.targets(teacher_logits, teacher_temp)
        scaled = student_logits.float() / self.student_temp
        if self.form == "official":
            students, targets = scaled.softmax(dim=-1).chunk(num_crops), [t.log() for t in targets]
            return cross_view_pairs(targets, students)
        return cross_view_pairs(targets, F.log_softmax(scaled, dim=-1).chunk(num_crops))
