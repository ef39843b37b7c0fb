"""Calibration: which expert serves which modality, which images are none of them, and how
sure ``modality="auto"`` may be. Fitted on labelled training images only.

- **Experts.** The router learns its split of the images without labels, so an expert has
  no modality until labelled images are routed through the model. Experts are matched
  one-to-one to modalities by Hungarian assignment on the argmax-routing counts (the rule
  ``modality="auto"`` answers by); an expert that no modality reaches stays ``"unassigned"``.
- **Out-of-scope detector** (used by :mod:`midol_hub.detection`): class means of the
  ``stage_pooled`` features, their shared (tied) covariance as a probabilistic PCA (its
  ``components`` leading directions and variances, one variance for the rest), and per
  modality the threshold that ``quantile`` of its held-out training images stay under. The
  scores of held-out images (two-fold: each half scored by a detector fitted on the other) also
  give each modality's in-scope score distribution behind the confidence. (Measured on
  midol-micro v3: one threshold for all called a quarter of the 72 held-out OCT images unknown,
  since the modalities with 500 images set it; per-modality thresholds call 2.6-2.8% of each.)
- **Confidence of the answer.** Platt scaling of the nearest modality's margin over the second
  nearest against "the nearest modality is the image's", on the same held-out scores.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .detection import modality_distances, nearest_margin
from .evaluation import routing_report
from .modalities import SHARED, UNASSIGNED, canonical_modality
from .modeling_midol import MIDoLModel

SCORE_QUANTILES = 100  # stored points of the in-scope score distribution (levels 0, 0.01, ..., 0.99)


def fit_detector(features: torch.Tensor, labels: Sequence[str], components: int = 64) -> dict:
    """Class means of ``features`` (N, D) grouped by ``labels`` and their tied covariance as a
    probabilistic PCA: the ``components`` leading principal directions of the within-class scatter
    with their variances, and the mean of the remaining variances for every other direction."""
    features = features.double()
    names = list(dict.fromkeys(labels))
    label_array = np.array(labels)
    means = torch.stack([features[torch.from_numpy(label_array == m)].mean(dim=0) for m in names])
    residual = features - means[[names.index(m) for m in labels]]
    covariance = residual.T @ residual / len(features)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = eigenvalues.argsort(descending=True)
    keep, rest = order[: min(components, features.shape[1] - 1)], order[min(components, features.shape[1] - 1):]
    floor = 1e-6 * float(eigenvalues.max())  # directions the training images never vary in still count, finitely
    return {"modalities": names, "means": _rounded(means), "basis": _rounded(eigenvectors[:, keep]),
            "variances": _rounded(eigenvalues[keep].clamp_min(floor)),
            "residual_variance": max(float(eigenvalues[rest].clamp_min(0).mean()), floor)}


def _rounded(tensor: torch.Tensor) -> list:
    """A JSON-friendly nested list with 7 significant digits (the config stays readable and small)."""
    return np.vectorize(lambda v: float(f"{v:.7g}"))(tensor.numpy()).tolist()


def held_out_distances(features: torch.Tensor, labels: Sequence[str], components: int, seed: int = 0) -> torch.Tensor:
    """(N, M) each image's distances to the modality means (in first-seen label order) under a
    detector fitted on the other half of the images."""
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = [np.sort(order[::2]), np.sort(order[1::2])]
    names = list(dict.fromkeys(labels))
    distances = torch.empty(len(labels), len(names), dtype=torch.float64)
    for fit_on, score_on in (halves, halves[::-1]):
        detector = fit_detector(features[fit_on], [labels[i] for i in fit_on], components)
        columns = [names.index(m) for m in detector["modalities"]]
        distances[np.ix_(score_on, columns)] = modality_distances(detector, features[score_on])
    return distances


def in_scope_scores(scores: np.ndarray, quantile: float) -> dict:
    """One modality's held-out scores, summarised: the ``quantile`` threshold, the scores at levels
    0, 1/n, ..., (n-1)/n, and the mean excess over the last of them (an exponential tail)."""
    levels = np.quantile(scores, np.arange(SCORE_QUANTILES) / SCORE_QUANTILES)
    excess = scores[scores > levels[-1]] - levels[-1]
    return {"threshold": float(np.quantile(scores, quantile)), "score_quantiles": [float(f"{v:.7g}") for v in levels],
            "tail_scale": float(excess.mean()) if len(excess) else 1.0}


def platt(score: np.ndarray, right: np.ndarray) -> dict:
    """Logistic regression of ``right`` on ``score``: {"scale", "bias"} of sigmoid(scale * score + bias)."""
    from sklearn.linear_model import LogisticRegression

    if right.all() or not right.any():  # nothing to separate: a constant at the observed rate
        rate = (right.sum() + 0.5) / (len(right) + 1)
        return {"scale": 0.0, "bias": float(np.log(rate / (1 - rate)))}
    fit = LogisticRegression(C=1e4).fit(np.asarray(score, dtype=float)[:, None], right)
    return {"scale": float(fit.coef_[0, 0]), "bias": float(fit.intercept_[0])}


def calibrate(model: MIDoLModel, images: Mapping[str, Sequence], quantile: float = 0.975, components: int = 64,
              batch_size: int = 64) -> dict:
    """Assign the experts of ``model`` to modalities from labelled ``images`` ({modality: images}),
    fit the out-of-scope detector and the confidence of ``auto``'s answers.

    Updates ``model.config.expert_modalities`` and ``model.config.modality_calibration`` in
    place and returns the calibration: per-modality routing ``accuracy`` and its mean
    ``macro_accuracy``, the modality x expert ``confusion`` counts, ``nmi``, the
    ``out_of_scope`` detector and ``nearest_confidence``. Use training images only: evaluate on
    held-out ones.
    """
    config = model.config
    if config.expert_modalities == [SHARED]:
        raise ValueError("a one-expert (plain DINO) model has no experts to calibrate")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    previous, config.modality_calibration = config.modality_calibration, None  # route without the old detector
    try:
        calibration = _fit(model, images, quantile, components, batch_size)
    except BaseException:
        config.modality_calibration = previous
        raise
    config.modality_calibration = calibration
    return calibration


def _fit(model: MIDoLModel, images: Mapping[str, Sequence], quantile: float, components: int, batch_size: int) -> dict:
    config = model.config
    labels, experts, features = [], [], []
    for modality, items in images.items():
        key = canonical_modality(modality)
        if key in labels:
            raise ValueError(f"modality {key!r} is given twice; pass each modality's images once")
        encoding = model.encode(list(items), modality="auto", output="stage_pooled", batch_size=batch_size)
        labels += [key] * len(encoding)
        experts.append(encoding.expert_index)
        features.append(encoding.stage_pooled)
    expert_index = torch.cat(experts).numpy()
    report = routing_report(labels, expert_index, config.num_experts)
    expert_modalities = [UNASSIGNED] * config.num_experts
    for modality, expert in report["assignment"].items():
        if expert is not None:
            expert_modalities[expert] = modality
    served = [i for i, label in enumerate(labels) if report["assignment"][label] is not None]
    features_all = torch.cat(features)
    served_labels = [labels[i] for i in served]
    detector = fit_detector(features_all[served], served_labels, components)
    distances = held_out_distances(features_all[served], served_labels, components)
    scores, nearest = (values.numpy() for values in distances.min(dim=1))
    label_array = np.array(served_labels)
    detector.update(quantile=quantile, components=len(detector["variances"]),
                    in_scope={m: in_scope_scores(scores[label_array == m], quantile) for m in detector["modalities"]})
    right = np.array(list(dict.fromkeys(served_labels)))[nearest] == label_array
    calibration = {
        "method": "Hungarian assignment on argmax-routing counts of labelled training images",
        **{key: report[key] for key in ("accuracy", "macro_accuracy", "confusion", "modalities_order", "nmi")},
        "images_per_modality": {m: labels.count(m) for m in report["modalities_order"]},
        "out_of_scope": detector,
        "nearest_confidence": platt(np.log1p(nearest_margin(distances).numpy()), right),
    }
    config.expert_modalities = expert_modalities
    return calibration
