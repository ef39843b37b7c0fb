"""KoLeo: spreads a batch's features over the sphere (Sablayrolles et al. 2019, as DINOv2 uses it).

``-mean_i log(min_{j != i} ||x_i - x_j||)`` over L2-normalised features: the loss falls as each
feature's nearest neighbour in the batch moves away, so it pushes against a feature that
self-distillation narrows onto few directions. Not part of M-IDoL's objective: a named deviation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """The Kozachenko-Leonenko entropy estimator's loss on one batch of features."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, D), B >= 2; returns a scalar."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"KoLeo needs a (batch >= 2, dim) tensor, got shape {tuple(features.shape)}")
        unit = F.normalize(features.float(), dim=-1, eps=self.eps)
        with torch.no_grad():  # which neighbour is nearest carries no gradient; the distance to it does
            similarity = unit @ unit.T
            similarity.fill_diagonal_(-2.0)
            nearest = similarity.argmax(dim=1)
        distance = (unit - unit[nearest]).norm(dim=-1)
        return -torch.log(distance + self.eps).mean()
