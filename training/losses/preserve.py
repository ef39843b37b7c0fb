"""Feature preservation: what the start's pooled feature held stays linearly readable in the student's.

``2 - 2 cos(P s, t)`` between a learned linear map ``P`` of the student's pooled feature ``s`` and
the frozen start's pooled feature ``t`` of the same crop (CaSSLe, Fini et al. 2022, in its
linear form). ``P`` starts as the identity, so the term is 0 at the start and the student stays
free to move where ``P`` can follow; a linear probe on the start's feature then has a
counterpart on the student's. Not part of M-IDoL's objective: a named deviation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeaturePreservationLoss(nn.Module):
    """The cosine loss between ``P s`` and ``t``; ``P`` (dim x dim, with bias) is this module's parameter."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.predictor = nn.Linear(dim, dim)
        with torch.no_grad():
            self.predictor.weight.copy_(torch.eye(dim))
            self.predictor.bias.zero_()

    def forward(self, student: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """student, start: (B, dim) pooled features of the same crops; returns the batch mean, in [0, 4]."""
        if student.ndim != 2 or student.shape != start.shape or student.shape[1] != self.predictor.in_features:
            raise ValueError(f"feature preservation needs two (batch, {self.predictor.in_features}) tensors, "
                             f"got {tuple(student.shape)} and {tuple(start.shape)}")
        predicted = self.predictor(student.float())
        return (2 - 2 * F.cosine_similarity(predicted, start.detach().float(), dim=-1)).mean()
