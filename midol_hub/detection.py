"""What ``modality="auto"`` reports per image, and how sure it is.

This module *uses* the calibration that :func:`midol_hub.calibrate` fits (a leaf module, so
``encode`` can call it without importing the fitting code). Per image:

- **Out-of-scope score.** The backbone's stages (a Swin's four, EfficientNet-Lite0's five),
  each averaged over space and L2-normalised, are concatenated (``stage_pooled``: low stages
  see texture and colour, the last one semantics). Its squared Mahalanobis distance to the
  nearest modality mean, under one covariance shared by all modalities (Lee et al., NeurIPS
  2018: a tied covariance), is the score. The covariance is stored as a probabilistic PCA
  (Tipping & Bishop, 1999): its leading principal directions with their variances, and one
  variance for everything else, so a deviation outside the leading directions still counts.
  The score is read against the held-out scores of the nearest modality (each modality's own,
  so that a small modality is not judged by the spread of the large ones) to give P(in scope),
  below.
- **Modality.** The modality whose mean is nearest under that covariance: a Gaussian
  classifier on the stages, calibrated on labelled training images (Lee et al. classify by
  the same distance). It replaced the router's argmax as ``auto``'s answer when it named
  held-out training images right more often (midol-micro v3, two-fold, ``benchmarks.ood``:
  full-resolution dermoscopy 0.83 -> 0.99, pathology 0.89 -> 0.93); the embedding is then in
  that modality's expert subspace, and ``Encoding.routing`` keeps the router's own view.
- **The answer and its confidence: one distribution** over the calibrated modalities and
  ``"unknown"``. P(in scope) = ``T^s / (T^s + (1 - q)^s)``, with ``T`` the share of the nearest
  modality's held-out training images scoring at least as high (the empirical survival function,
  continued by an exponential tail), ``q`` the detector's ``quantile`` and ``s`` its ``slope``: 1/2
  exactly at that modality's ``q`` quantile, falling the faster the larger ``s``. Of P(in scope),
  the nearest modality takes the probability that the nearest is right given its margin over the
  second nearest (Platt scaling on held-out training images), the other modalities the rest in
  proportion to ``exp(-distance / 2)``; ``"unknown"`` takes ``1 - P(in scope)``. The answer is the
  most probable outcome and ``confidence`` its probability, so no answer is less probable than
  another outcome (issue 28: the earlier rule called an image unknown beyond a threshold while its
  own confidence said it was probably in scope). ``q`` and ``s`` are chosen on held-out training
  images and the out-of-scope development set (``benchmarks.ood``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .configuration_midol import MIDoLConfig
from .modalities import UNASSIGNED, UNKNOWN

FORCED, DICOM, ROUTER = "forced", "dicom", "router"
"""Where a row's modality came from (``Encoding.modality_source``)."""


def stage_pooled(pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, C + 2C + 4C + 8C): every NCHW stage averaged over space, L2-normalised, concatenated."""
    return torch.cat([F.normalize(stage.float().mean(dim=(2, 3)), dim=-1) for stage in pyramid], dim=-1)


_TENSORS: dict[int, tuple[dict, tuple[torch.Tensor, ...]]] = {}


def _detector_tensors(detector: dict) -> tuple[torch.Tensor, ...]:
    """means (M, D), basis (D, R), variances (R,) as float64 tensors, converted from the config's
    lists once per detector (encode scores every batch; the conversion costs about as much as
    the scoring itself)."""
    cached = _TENSORS.get(id(detector))
    if cached is None or cached[0] is not detector:
        cached = (detector, tuple(torch.tensor(detector[key], dtype=torch.float64) for key in ("means", "basis", "variances")))
        _TENSORS[id(detector)] = cached
    return cached[1]


def modality_distances(detector: dict, features: torch.Tensor) -> torch.Tensor:
    """(B, M) squared Mahalanobis distances of ``stage_pooled`` features to each modality mean (in
    the order of ``detector["modalities"]``), under the detector's probabilistic-PCA covariance."""
    features = features.double()
    means, basis, variances = (t.to(features.device) for t in _detector_tensors(detector))
    offsets = features.unsqueeze(1) - means.unsqueeze(0)  # (B, M, D)
    along = offsets @ basis  # (B, M, R)
    outside = offsets.pow(2).sum(-1) - along.pow(2).sum(-1)
    return (along.pow(2) / variances).sum(-1) + outside.clamp_min(0) / detector["residual_variance"]


def out_of_scope_score(detector: dict, features: torch.Tensor) -> torch.Tensor:
    """(B,) squared Mahalanobis distance of ``stage_pooled`` features to the nearest modality mean."""
    return modality_distances(detector, features).min(dim=1).values


def nearest_margin(distances: torch.Tensor) -> torch.Tensor:
    """(B,) how much nearer the nearest modality is than the second nearest (a log-likelihood ratio x 2)."""
    if distances.shape[1] < 2:
        return torch.full((distances.shape[0],), float("inf"), dtype=distances.dtype)
    two = distances.topk(2, dim=1, largest=False).values
    return two[:, 1] - two[:, 0]


def in_scope_tail(scores: dict, score: torch.Tensor) -> torch.Tensor:
    """Share of one modality's in-scope (training) images whose score is at least ``score``: the
    empirical survival function between the stored quantiles (levels 0, 1/n, ..., (n-1)/n),
    continued past the last one by the fitted exponential tail. ``scores`` is that modality's
    entry of the detector's ``in_scope``."""
    quantiles = torch.tensor(scores["score_quantiles"], dtype=score.dtype, device=score.device)
    n = len(quantiles)
    levels = torch.arange(n, dtype=score.dtype, device=score.device) / n
    position = torch.searchsorted(quantiles, score.contiguous()).clamp(1, n - 1)
    low, high = quantiles[position - 1], quantiles[position]
    share = ((score - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    inside = 1 - (levels[position - 1] + share / n)
    tail = torch.exp(-(score - quantiles[-1]) / scores["tail_scale"]) / n
    return torch.where(score > quantiles[-1], tail, torch.where(score < quantiles[0], torch.ones_like(score), inside))


def in_scope_probability(detector: dict, modality: str, score: torch.Tensor) -> torch.Tensor:
    """P(in scope | score) for an image nearest to ``modality``: ``T^s / (T^s + (1 - q)^s)``, ``T``
    the share of that modality's held-out training images scoring at least ``score``; 1/2 at its
    ``quantile`` ``q``, towards 1 for typical scores and towards 0 far above all of them."""
    slope = detector["slope"]
    tail = in_scope_tail(detector["in_scope"][modality], score) ** slope
    return tail / (tail + (1 - detector["quantile"]) ** slope)


def nearest_right_probability(calibration: dict, margin: torch.Tensor) -> torch.Tensor:
    """P(the nearest modality is the image's modality | its margin), Platt-scaled on log(1 + margin)."""
    platt = calibration["nearest_confidence"]
    return torch.sigmoid(platt["scale"] * torch.log1p(margin.double()) + platt["bias"])


@dataclass
class Decisions:
    """Per row: the modality, the probability that it is right, where it came from and, for
    ``"unknown"``, why."""

    modality: list[str]
    confidence: torch.Tensor
    source: list[str]
    reason: list[str | None]
    expert: list[int]
    """The expert whose subspace the embedding is in (-1: keep the router's)."""


def detect_modalities(config: MIDoLConfig, routing_logits: torch.Tensor, features: torch.Tensor | None) -> Decisions:
    """``auto``'s answer for every row from its image (``features``: ``stage_pooled``): the most
    probable of the calibrated modalities and ``"unknown"``, with its probability. An uncalibrated
    model answers by the router's argmax (``"unknown"`` for an unassigned expert)."""
    probs = routing_logits.float().softmax(dim=-1).cpu()
    top_p, top_i = probs.max(dim=-1)
    rows = len(top_i)
    detector = (config.modality_calibration or {}).get("out_of_scope")
    if config.backbone_only:
        return Decisions([UNKNOWN] * rows, torch.zeros(rows), [ROUTER] * rows,
                         ["backbone-only model: no trained router"] * rows, [-1] * rows)
    if not detector:
        names = [config.expert_modalities[i] for i in top_i.tolist()]
        modality = [UNKNOWN if n == UNASSIGNED else n for n in names]
        reason = ["routed to an expert that serves no modality" if n == UNASSIGNED else None for n in names]
        return Decisions(modality, top_p, [ROUTER] * rows, reason, [-1] * rows)
    if "slope" not in detector or "nearest_confidence" not in config.modality_calibration:
        raise ValueError("this model's out-of-scope detector was fitted by an older midol-hub; recalibrate it with "
                         "midol_hub.calibrate(model, images) to use modality='auto'")
    answers = answer_by_distance(config.modality_calibration, modality_distances(detector, features).cpu())
    expert = [-1 if name == UNKNOWN else config.expert_for(name) for name in answers.modality]
    return Decisions(answers.modality, answers.confidence.float(), [ROUTER] * rows, answers.reasons(), expert)


@dataclass
class DistanceAnswers:
    """Per row: the nearest modality, P(in scope), P(the nearest is right | in scope), the answer
    (the most probable of the modalities and ``"unknown"``) and its probability."""

    nearest: list[str]
    in_scope: torch.Tensor
    nearest_right: torch.Tensor
    modality: list[str]
    confidence: torch.Tensor

    def reasons(self) -> list[str | None]:
        """Why each ``"unknown"`` answer is one (None for the others)."""
        return [None if answer != UNKNOWN else
                f"unlike every modality it was calibrated on, even the nearest, {name} (P(in scope) {inside:.2f})"
                if inside < 0.5 else
                f"probably in scope (P {inside:.2f}), but its nearest modality, {name}, is right with probability "
                f"{right:.2f} only: no modality is more probable than unknown"
                for answer, name, inside, right in zip(self.modality, self.nearest, self.in_scope.tolist(),
                                                       self.nearest_right.tolist())]


def answer_by_distance(calibration: dict, distances: torch.Tensor) -> DistanceAnswers:
    """``auto``'s answers from (B, M) detector distances (columns in the detector's modality order):
    the most probable outcome of the distribution in this module's docstring, and its probability."""
    detector = calibration["out_of_scope"]
    modalities = list(detector["modalities"])
    distances = distances.double()
    score, nearest = distances.min(dim=1)
    inside = torch.empty_like(score)
    for index, name in enumerate(modalities):  # one vectorised pass per modality, not per image
        mine = nearest == index
        if mine.any():
            inside[mine] = in_scope_probability(detector, name, score[mine])
    right = nearest_right_probability(calibration, nearest_margin(distances))
    rows = torch.arange(len(score))
    others = torch.softmax(-(distances - score[:, None]) / 2, dim=1)
    others[rows, nearest] = 0
    others = others / others.sum(dim=1, keepdim=True).clamp_min(1e-300)
    probabilities = torch.cat([(inside * (1 - right))[:, None] * others, (1 - inside)[:, None]], dim=1)
    probabilities[rows, nearest] = inside * right
    confidence, answer = probabilities.max(dim=1)
    outcomes = modalities + [UNKNOWN]
    return DistanceAnswers([modalities[i] for i in nearest.tolist()], inside, right,
                           [outcomes[i] for i in answer.tolist()], confidence)
