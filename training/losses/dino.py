"""DINO self-distillation: centred, sharpened teacher prototypes supervise the student.

Fine-grained discrimination inside each expert subspace. Cross-view pairs only: each of the
two global teacher views supervises every other student view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum, world_size
from .cross_view import cross_view_pairs


class DINOLoss(nn.Module):
    """DINO's cross-entropy with a centre kept as an EMA of teacher outputs (momentum 0.9)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, num_crops: int, teacher_temp: float
    ) -> torch.Tensor:
        """student_logits: (num_crops * B, K); teacher_logits: (2 * B, K). Updates the centre."""
        student = F.log_softmax(student_logits.float() / self.student_temp, dim=-1).chunk(num_crops)
        teacher = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        loss = cross_view_pairs(teacher, student)
        self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        batch_center = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        batch_center /= teacher_logits.shape[0] * world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
