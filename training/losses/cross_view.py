"""The pairing both objectives share: teacher view i supervises every student view j != i."""

from __future__ import annotations

from typing import Sequence

import torch


def cross_view_pairs(teacher_terms: Sequence[torch.Tensor], student_terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over cross-view pairs (i, j != i) of the batch mean of ``-sum(teacher_i * student_j)``.

    With teacher probabilities and student log-probabilities this is DINO's cross-entropy.
    """
    total, terms = student_terms[0].new_zeros(()), 0
    for t_index, teacher in enumerate(teacher_terms):
        for s_index, student in enumerate(student_terms):
            if s_index != t_index:
                total = total + (-teacher * student).sum(dim=-1).mean()
                terms += 1
    return total / terms
