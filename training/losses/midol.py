"""M-IDoL's objective: routing consistency + DINO self-distillation, as the official ``DINOLoss``.

``total = route_weight * route + distill_weight * distill``. The routing term's targets use the
same teacher temperature as the distillation term (the official code shares one schedule).
"""

from __future__ import annotations

import torch
from torch import nn

from .dino import DINOLoss
from .routing import RoutingLoss


class MIDoLLoss(nn.Module):
    """The official M-IDoL loss; ``routing="balanced"`` swaps in the softer routing form."""

    def __init__(
        self,
        out_dim: int,
        num_crops: int,
        teacher_temp: float = 0.04,
        student_temp: float = 0.1,
        route_student_temp: float = 0.1,
        center_momentum: float = 0.9,
        sinkhorn_eps: float = 0.05,
        sinkhorn_iters: int = 3,
        route_weight: float = 1.0,
        distill_weight: float = 1.0,
        routing: str = "official",
    ) -> None:
        super().__init__()
        self.num_crops, self.teacher_temp = num_crops, teacher_temp
        self.route_weight, self.distill_weight = route_weight, distill_weight
        self.distill = DINOLoss(out_dim, student_temp, center_momentum)
        self.route = RoutingLoss(routing, route_student_temp, sinkhorn_eps, sinkhorn_iters)

    @property
    def center(self) -> torch.Tensor:
        """The DINO centre (1, out_dim), an EMA of the teacher's prototype logits."""
        return self.distill.center

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_temp: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(total, route_loss, distill_loss)`` and updates the centre.

        student_out (num_crops * B, K) and teacher_out (2 * B, K): prototype logits;
        student_logits (num_crops * B, E) and teacher_logits (2 * B, E): router logits.
        ``teacher_temp`` overrides the constructor's value for this call (its schedule).
        """
        temp = self.teacher_temp if teacher_temp is None else teacher_temp
        distill = self.distill(student_out, teacher_out, self.num_crops, temp)
        if self.route_weight:
            route = self.route(student_logits, teacher_logits, self.num_crops, temp)
        else:
            route = distill.new_zeros(())
        return self.route_weight * route + self.distill_weight * distill, route, distill
