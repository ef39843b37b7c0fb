"""What the log records besides the losses: expert usage, routing purity per tag, kNN accuracy."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch

from midol_hub.evaluation import knn_predict
from midol_hub.modalities import default_profiles
from midol_hub.preprocessing import Preprocessor


def routing_stats(probs: torch.Tensor, sources: torch.Tensor, tags: list[str | None]) -> dict:
    """Expert usage and its entropy (nats; log E is perfectly balanced), and per tagged root the
    share of its images routed to that root's most used expert (1.0 = pure)."""
    chosen = probs.argmax(dim=-1)
    mean = probs.mean(dim=0)
    stats = {
        "expert_usage": torch.bincount(chosen, minlength=probs.shape[1]).div(len(chosen)).tolist(),
        "expert_entropy": float(-(mean * mean.clamp_min(1e-12).log()).sum()),
        "max_entropy": math.log(probs.shape[1]),
    }
    purity = {}
    for source, tag in enumerate(tags):
        picked = chosen[sources == source].tolist()
        if tag is not None and picked:
            purity[tag] = Counter(picked).most_common(1)[0][1] / len(picked)
    if purity:
        stats["routing_purity"] = purity
    return stats


class KNNMonitor:
    """Teacher kNN accuracy on a labelled .npz (train split as memory, val split as queries)."""

    def __init__(self, path: str, size: int, max_train: int = 1000, max_val: int = 500) -> None:
        with np.load(path) as data:
            if "train_images" not in data or ("val_images" not in data and "test_images" not in data):
                raise ValueError(f"run.knn_data {path} needs train_images/train_labels and val_ or test_ arrays")
            query = "val" if "val_images" in data else "test"
            self.train = data["train_images"][:max_train], data["train_labels"][:max_train].reshape(-1)
            self.val = data[f"{query}_images"][:max_val], data[f"{query}_labels"][:max_val].reshape(-1)
        self.preprocessor = Preprocessor(default_profiles(size)["auto"])

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        features = []
        for images, _ in (self.train, self.val):
            batches = [self.preprocessor.batch(list(images[i : i + 256])) for i in range(0, len(images), 256)]
            features.append(torch.cat([model(b.to(device)).pooled.float().cpu() for b in batches]))
        scores = knn_predict(features[0], torch.from_numpy(self.train[1]), features[1])
        return float((scores.argmax(-1).numpy() == self.val[1]).mean())
