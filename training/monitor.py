"""What the log records besides the losses: expert usage, routing accuracy per tag, kNN accuracy."""

from __future__ import annotations

import math

import numpy as np
import torch

from midol_hub.evaluation import knn_predict, routing_report
from midol_hub.image_io import RawImage
from midol_hub.modalities import default_profiles
from midol_hub.preprocessing import Preprocessor, WarningCollector


def routing_stats(probs: torch.Tensor, sources: torch.Tensor, tags: list[str | None]) -> dict:
    """Batch expert usage (argmax shares) and the entropy of the mean routing (nats; log E is
    perfectly balanced); with tagged roots, the batch's routing accuracy (see ``routing_report``)."""
    chosen = probs.argmax(dim=-1)
    mean = probs.mean(dim=0)
    stats = {
        "expert_usage": torch.bincount(chosen, minlength=probs.shape[1]).div(len(chosen)).tolist(),
        "expert_entropy": float(-(mean * mean.clamp_min(1e-12).log()).sum()),
        "max_entropy": math.log(probs.shape[1]),
    }
    tagged = [i for i, s in enumerate(sources.tolist()) if tags[s] is not None]
    if tagged:
        report = routing_report([tags[s] for s in sources[tagged].tolist()], chosen[tagged].numpy(), probs.shape[1])
        stats["routing_accuracy"] = report["accuracy"]
    return stats


class RoutingMonitor:
    """The teacher's argmax routing of fixed training images of every tag, preprocessed as
    ``encode(modality="auto")`` does: routing accuracy per tag, macro mean, NMI, expert usage."""

    def __init__(self, samples_by_tag: dict[str, list[np.ndarray]], size: int) -> None:
        preprocessor, collector = Preprocessor(default_profiles(size)["auto"]), WarningCollector()
        self.tags, batches = [], []
        for tag, samples in samples_by_tag.items():
            batches.append(preprocessor.from_raw([RawImage(p, f"{tag}[{i}]") for i, p in enumerate(samples)], collector))
            self.tags += [tag] * len(samples)
        self.images = torch.cat(batches)

    @torch.no_grad()
    def report(self, model: torch.nn.Module) -> dict:
        was_training, device = model.training, next(model.parameters()).device
        model.eval()
        experts = torch.cat([model(chunk.to(device)).routing_logits.argmax(-1).cpu() for chunk in self.images.split(256)])
        model.train(was_training)
        report = routing_report(self.tags, experts.numpy(), model.config.num_experts)
        return {key: report[key] for key in ("macro_accuracy", "accuracy", "nmi", "expert_usage")}


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
        was_training, device = model.training, next(model.parameters()).device
        model.eval()
        features = []
        for images, _ in (self.train, self.val):
            batches = [self.preprocessor.batch(list(images[i : i + 256])) for i in range(0, len(images), 256)]
            features.append(torch.cat([model(b.to(device)).pooled.float().cpu() for b in batches]))
        model.train(was_training)
        scores = knn_predict(features[0], torch.from_numpy(self.train[1]), features[1])
        return float((scores.argmax(-1).numpy() == self.val[1]).mean())
