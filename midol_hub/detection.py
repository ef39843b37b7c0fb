"""What ``modality="auto"`` reports per image, and how sure it is.

This module *uses* the calibration that :func:`midol_hub.calibrate` fits (a leaf module, so
``encode`` can call it without importing the fitting code). Per image:

- **Out-of-scope score.** The four Swin stages, each averaged over space and L2-normalised,
  are concatenated (``stage_pooled``: low stages see texture and colour, the last one
  semantics). Its squared Mahalanobis distance to the nearest modality mean, under one
  covariance shared by all modalities (Lee et al., NeurIPS 2018: a tied covariance), is the
  score. The covariance is stored as a probabilistic PCA (Tipping & Bishop, 1999): its leading
  principal directions with their variances, and one variance for everything else, so a
  deviation outside the leading directions still counts. Above the threshold of its nearest
  modality (each modality's own, so that a small modality is not judged by the spread of the
  large ones) the image is ``"unknown"``.
- **Modality.** The modality whose mean is nearest under that covariance: a Gaussian
  classifier on the four stages, calibrated on labelled training images (Lee et al. classify by
  the same distance). It replaced the router's argmax as ``auto``'s answer when it named
  held-out training images right more often (midol-micro v3, two-fold, ``benchmarks.ood``:
  full-resolution dermoscopy 0.83 -> 0.99, pathology 0.89 -> 0.93); the embedding is then in
  that modality's expert subspace, and ``Encoding.routing`` keeps the router's own view.
- **Confidence.** The probability that the answer is right, from two calibrated parts: the
  probability that the image is in scope given its score, ``S / (S + w)`` with ``S`` the share
  of that modality's held-out training images scoring at least as high (the empirical survival
  function, continued by an exponential tail) and ``w`` the detector's ``outside_weight`` (how
  common and how spread out-of-scope images are taken to be; chosen on held-out training images
  and the out-of-scope development set, ``benchmarks.ood``), and, for an answered image, the
  probability that the nearest modality is the right one given its margin over the second
  nearest (Platt scaling on held-out training images). The threshold that decides ``"unknown"``
  is a separate, more cautious choice: an image just above it is called unknown with a
  confidence under 1/2, meaning "probably in scope, but unlike the training images of its
  nearest modality".
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


def in_scope_probability(scores: dict, score: torch.Tensor, outside_weight: float) -> torch.Tensor:
    """P(in scope | score) for one modality: ``S / (S + outside_weight)``, ``S`` the share of its
    held-out training images scoring at least ``score``; towards 1 for typical scores, towards 0
    far above all of them."""
    tail = in_scope_tail(scores, score)
    return tail / (tail + outside_weight)


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
    """``auto``'s answer for every row from its image (``features``: ``stage_pooled``): the nearest
    calibrated modality, or ``"unknown"`` when the image is unlike all of them. An uncalibrated
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
    if "outside_weight" not in detector or "nearest_confidence" not in config.modality_calibration:
        raise ValueError("this model's out-of-scope detector was fitted by an older midol-hub; recalibrate it with "
                         "midol_hub.calibrate(model, images) to use modality='auto'")
    answers = answer_by_distance(config.modality_calibration, modality_distances(detector, features).cpu())
    reason = [f"unlike every modality it was calibrated on, even the nearest, {name} (out-of-scope score "
              f"{float(s):.0f} > {float(t):.0f})" if out else None
              for name, out, s, t in zip(answers.nearest, answers.outside.tolist(), answers.score, answers.threshold)]
    expert = [-1 if out else config.expert_for(name) for name, out in zip(answers.nearest, answers.outside.tolist())]
    return Decisions(answers.modality, answers.confidence.float(), [ROUTER] * rows, reason, expert)


@dataclass
class DistanceAnswers:
    """Per row: the nearest modality, its score and threshold, whether it is beyond it, the
    answer (``"unknown"`` beyond) and the probability that the answer is right."""

    nearest: list[str]
    score: torch.Tensor
    threshold: torch.Tensor
    outside: torch.Tensor
    modality: list[str]
    confidence: torch.Tensor


def answer_by_distance(calibration: dict, distances: torch.Tensor) -> DistanceAnswers:
    """``auto``'s answers from (B, M) detector distances (columns in the detector's modality order)."""
    detector = calibration["out_of_scope"]
    score, nearest = distances.min(dim=1)
    right = nearest_right_probability(calibration, nearest_margin(distances))
    names = [detector["modalities"][i] for i in nearest.tolist()]
    in_scope = torch.empty(len(names), dtype=torch.float64)
    threshold = torch.empty(len(names), dtype=torch.float64)
    for name in set(names):  # one vectorised pass per modality, not per image
        mine = torch.tensor([i for i, n in enumerate(names) if n == name])
        in_scope[mine] = in_scope_probability(detector["in_scope"][name], score[mine], detector["outside_weight"])
        threshold[mine] = detector["in_scope"][name]["threshold"]
    outside = score > threshold
    modality = [UNKNOWN if out else name for name, out in zip(names, outside.tolist())]
    confidence = torch.where(outside, 1 - in_scope, in_scope * right)
    return DistanceAnswers(names, score, threshold, outside, modality, confidence)
