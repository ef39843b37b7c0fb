"""Evaluation on frozen features: weighted cosine kNN, as in DINO."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Class scores (Q, C) from the k most cosine-similar training features, each vote
    weighted by ``exp(similarity / temperature)`` (DINO's kNN protocol)."""
    train = F.normalize(train_features.float(), dim=-1)
    query = F.normalize(query_features.float(), dim=-1)
    num_classes = num_classes or int(train_labels.max()) + 1
    similarity, neighbours = (query @ train.T).topk(min(k, len(train)), dim=-1)
    votes = F.one_hot(train_labels[neighbours].long(), num_classes).float()
    return (votes * (similarity / temperature).exp().unsqueeze(-1)).sum(dim=1)
