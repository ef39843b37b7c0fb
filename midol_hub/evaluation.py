"""Evaluation: metrics, linear probe, weighted cosine kNN (as in DINO), few-shot, Dice and IoU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
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


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ImportError("evaluation needs scikit-learn: pip install 'midol-hub[eval]'") from None
    from sklearn import metrics

    return metrics


def classification_metrics(
    y_true: np.ndarray, scores: np.ndarray, class_names: list[str] | None = None, thresholds: np.ndarray | None = None
) -> dict:
    """Accuracy, balanced accuracy, macro AUC (``auc``), macro F1, per-class metrics and the
    confusion matrix. ``scores`` are probabilities (N, C); 2-D ``y_true`` means multi-label
    (then ``thresholds`` per label, default 0.5, turn probabilities into decisions)."""
    metrics = _sklearn()
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    names = class_names or [str(i) for i in range(scores.shape[1])]
    if y_true.ndim == 2:
        thresholds = np.full(scores.shape[1], 0.5) if thresholds is None else np.asarray(thresholds)
        pred = (scores >= thresholds).astype(int)
        present = [c for c in range(y_true.shape[1]) if 0 < y_true[:, c].sum() < len(y_true)]
        auc = float(np.mean([metrics.roc_auc_score(y_true[:, c], scores[:, c]) for c in present])) if present else float("nan")
        balanced = float(np.mean([metrics.balanced_accuracy_score(y_true[:, c], pred[:, c]) for c in range(y_true.shape[1])]))
        confusion = [metrics.confusion_matrix(y_true[:, c], pred[:, c], labels=[0, 1]).tolist() for c in range(y_true.shape[1])]
        accuracy = float(metrics.accuracy_score(y_true, pred))
    else:
        pred = scores.argmax(axis=1)
        labels = list(range(scores.shape[1]))
        try:
            auc = float(metrics.roc_auc_score(y_true, scores[:, 1]) if len(labels) == 2 else
                        metrics.roc_auc_score(y_true, scores, multi_class="ovr", average="macro", labels=labels))
        except ValueError:  # a class absent from y_true: AUC is undefined
            auc = float("nan")
        balanced = float(metrics.balanced_accuracy_score(y_true, pred))
        confusion = metrics.confusion_matrix(y_true, pred, labels=labels).tolist()
        accuracy = float(metrics.accuracy_score(y_true, pred))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y_true, pred, labels=None if y_true.ndim == 2 else list(range(scores.shape[1])), zero_division=0
    )
    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "auc": auc,
        "f1": float(np.mean(f1)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)
        },
        "confusion_matrix": confusion,
    }


def best_thresholds(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-label threshold maximising F1 on a validation set (multi-label)."""
    metrics = _sklearn()
    chosen = []
    for c in range(y_true.shape[1]):
        candidates = np.unique(np.concatenate([probs[:, c], [0.5]]))
        scores = [metrics.f1_score(y_true[:, c], probs[:, c] >= t, zero_division=0) for t in candidates]
        chosen.append(float(candidates[int(np.argmax(scores))]))
    return np.array(chosen)


@dataclass
class LinearProbe:
    """A logistic regression on standardised features, as tensors: ``logits(x) = ((x - mean) / std) @ weight.T + bias``."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    c: float
    multilabel: bool

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def probs(self, features: torch.Tensor) -> np.ndarray:
        logits = self.logits(features)
        return (logits.sigmoid() if self.multilabel else logits.softmax(-1)).numpy()


def fit_linear_probe(train_x: torch.Tensor, train_y: np.ndarray, val_x: torch.Tensor | None = None,
                     val_y: np.ndarray | None = None, cs: Sequence[float] = (1.0,), seed: int = 0) -> LinearProbe:
    """L2-regularised logistic regression (scikit-learn, lbfgs) on standardised frozen features.

    With several ``cs`` (inverse regularisation strengths) and a validation set, the one with
    the best validation macro AUC (balanced accuracy where AUC is undefined) is kept; the fit
    uses the training set only. Multi-label targets (N, C) get one regression per label.
    """
    _sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    x, y = np.asarray(train_x, dtype=np.float64), np.asarray(train_y)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    standardised = (x - mean) / std
    multilabel = y.ndim == 2
    num_classes = y.shape[1] if multilabel else int(y.max()) + 1
    best, best_score = None, -np.inf
    for c in cs:
        classifier = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        classifier = (OneVsRestClassifier(classifier) if multilabel else classifier).fit(standardised, y)
        probe = _as_probe(classifier, mean, std, num_classes, c, multilabel)
        if len(cs) == 1 or val_x is None:
            return probe
        metrics = classification_metrics(np.asarray(val_y), probe.probs(torch.as_tensor(np.asarray(val_x))))
        score = metrics["auc"] if np.isfinite(metrics["auc"]) else metrics["balanced_accuracy"]
        if score > best_score:
            best, best_score = probe, score
    return best


def _as_probe(classifier, mean: np.ndarray, std: np.ndarray, num_classes: int, c: float, multilabel: bool) -> LinearProbe:
    estimators = classifier.estimators_ if multilabel else [classifier]
    coef = np.concatenate([e.coef_ for e in estimators])
    intercept = np.concatenate([e.intercept_ for e in estimators])
    if not multilabel and len(classifier.classes_) == 2:  # one decision value d: softmax([0, d]) = sigmoid(d)
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight, bias = np.zeros((num_classes, coef.shape[1])), np.full(num_classes, -1e4)  # absent classes: never predicted
    rows = np.arange(num_classes) if multilabel else classifier.classes_.astype(int)
    weight[rows], bias[rows] = coef, intercept
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return LinearProbe(as_tensor(mean), as_tensor(std), as_tensor(weight), as_tensor(bias), c, multilabel)


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, c: float = 1.0, seed: int = 0) -> np.ndarray:
    """Probabilities (N, C) from an L2-regularised logistic regression on standardised frozen features."""
    return fit_linear_probe(train_x, train_y, cs=(c,), seed=seed).probs(torch.as_tensor(np.asarray(test_x)))


def knn_classify(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None) -> np.ndarray:
    """kNN class probabilities (N, C): the weighted votes normalised to sum to one."""
    votes = knn_predict(train_x, torch.as_tensor(np.asarray(train_y)), test_x, k, temperature, num_classes)
    return (votes / votes.sum(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


def retrieval_hits(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray,
                   k: int = 10) -> np.ndarray:
    """(Q, k) booleans: whether each of a test query's k most similar training images (by cosine,
    most similar first) has the query's label. Single-label sets only."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if train_y.ndim != 1 or test_y.ndim != 1:
        raise ValueError("retrieval takes single-label sets (one class index per image)")
    k = min(k, len(train_y))
    similarity = F.normalize(torch.as_tensor(test_x).float(), dim=-1) @ F.normalize(torch.as_tensor(train_x).float(), dim=-1).T
    return train_y[similarity.topk(k, dim=1).indices.numpy()] == test_y[:, None]


def retrieval_scores(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray,
                     k: int = 10) -> dict[str, float]:
    """Similar-case retrieval of test queries against the training images, by cosine (exact
    search, as an :class:`~midol_hub.ImageIndex` of this size does): ``precision@k``, the share
    of the top k with the query's label, and ``mAP@k``, the mean over queries of the average
    precision at the ranks of the relevant hits among the top k, divided by min(k, relevant
    images in the gallery). Single-label sets only."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    relevant = retrieval_hits(train_x, train_y, test_x, test_y, k)
    k = relevant.shape[1]
    precision_at = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    in_gallery = np.minimum(k, (train_y[None, :] == test_y[:, None]).sum(axis=1))
    average_precision = (precision_at * relevant).sum(axis=1) / np.maximum(in_gallery, 1)
    return {f"precision@{k}": float(relevant.mean()), f"mAP@{k}": float(average_precision.mean())}


def few_shot(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, shots: int,
             seeds: Sequence[int] = (0, 1, 2, 3, 4), method: str = "linear") -> dict:
    """Accuracy with ``shots`` training images per class, over several seeds: mean and std."""
    train_y, classes = np.asarray(train_y), np.unique(train_y)
    accuracies = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        picks = np.concatenate([rng.choice(np.flatnonzero(train_y == c), min(shots, int((train_y == c).sum())), replace=False)
                                for c in classes])
        x, y = train_x[torch.as_tensor(picks)], train_y[picks]
        num_classes = int(max(train_y.max(), np.max(test_y))) + 1
        probs = (linear_probe(x, y, test_x, seed=seed) if method == "linear"
                 else knn_classify(x, y, test_x, k=min(20, len(y)), num_classes=num_classes))
        accuracies.append(float((probs.argmax(1) == np.asarray(test_y)).mean()))
    return {"shots": shots, "mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "runs": accuracies}


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict:
    """Dice and IoU per foreground class (1..C-1) and their means, over all pixels of the batch."""
    dice, iou = {}, {}
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        intersection, total = (p & t).sum().item(), p.sum().item() + t.sum().item()
        union = (p | t).sum().item()
        dice[c] = 2 * intersection / total if total else 1.0
        iou[c] = intersection / union if union else 1.0
    return {"dice": float(np.mean(list(dice.values()))), "iou": float(np.mean(list(iou.values()))),
            "dice_per_class": dice, "iou_per_class": iou}


def routing_report(modalities: Sequence[str], experts: Sequence[int] | np.ndarray, num_experts: int,
                   min_share: float | None = None) -> dict:
    """How well argmax routing separates labelled modalities.

    Experts are matched one-to-one to modalities by Hungarian assignment on the modality x
    expert count matrix; a modality whose matched expert receives less than ``min_share``
    (default 1 / num_experts, chance) of its images is left unassigned (``None``): no expert
    serves it. Returns ``assignment`` {modality: expert or None}, per-modality ``accuracy``
    (share of its images routed to its expert; 0 when unassigned), their mean
    ``macro_accuracy``, the ``confusion`` counts (rows follow ``modalities_order``), ``nmi``
    between modality and expert, and ``expert_usage`` (share of all images per expert).
    """
    from scipy.optimize import linear_sum_assignment

    metrics = _sklearn()
    names = list(dict.fromkeys(modalities))
    experts = np.asarray(experts, dtype=int)
    rows = np.array([names.index(m) for m in modalities])
    confusion = np.zeros((len(names), num_experts), dtype=int)
    np.add.at(confusion, (rows, experts), 1)
    min_share = 1.0 / num_experts if min_share is None else min_share
    assignment: dict[str, int | None] = dict.fromkeys(names)
    for row, col in zip(*linear_sum_assignment(-confusion)):
        if confusion[row, col] >= min_share * confusion[row].sum() and confusion[row, col] > 0:
            assignment[names[row]] = int(col)
    accuracy = {m: float(confusion[i, assignment[m]] / confusion[i].sum()) if assignment[m] is not None else 0.0
                for i, m in enumerate(names)}
    return {
        "assignment": assignment,
        "accuracy": accuracy,
        "macro_accuracy": float(np.mean(list(accuracy.values()))),
        "confusion": confusion.tolist(),
        "modalities_order": names,
        "nmi": float(metrics.normalized_mutual_info_score(rows, experts)),
        "expert_usage": (np.bincount(experts, minlength=num_experts) / len(experts)).tolist(),
    }


def calibration_error(confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: over ``bins`` equal-width confidence bins, the gap between the
    bin's accuracy and its mean confidence, weighted by the bin's share of the answers."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gaps = [abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
            for b in range(bins) if (which == b).any()]
    return float(np.sum(gaps))
