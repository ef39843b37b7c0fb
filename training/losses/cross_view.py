"""The pairing both objectives share: teacher view i supervises every student view j != i."""

from __future__ import annotations

from typing import Sequence

import torch


def cross_view_cross_entropy(targets: Sequence[torch.Tensor], student_log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over cross-view pairs of the batch-mean cross-entropy ``-sum(target * log_prob)``."""
    total, terms = student_log_probs[0].new_zeros(()), 0
    for t_index, target in enumerate(targets):
        for s_index, log_probs in enumerate(student_log_probs):
            if s_index != t_index:
                total = total + (-target * log_probs).sum(dim=-1).mean()
                terms += 1
    return total / terms
