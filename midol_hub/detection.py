"""What ``modality="auto"`` reports per image, and how sure it is.

This module *uses* the calibration that :func:`midol_hub.calibrate` fits (a leaf module, so
``encode`` can call it without importing the fitting code). Per image:

- **Out-of-scope score.** The four Swin stages, each averaged over space and L2-normalised,
  are concatenated (``stage_pooled``: low stages see texture and colour, the last one
  semantics). Its squared Mahalanobis distance to the nearest modality mean, under one
  covariance shared by all modalities (Lee et al., NeurIPS 2018: a tied covariance), is the
  score. The covariance is stored as a probabilistic PCA (Tipping & Bishop, 1999): its leading
  principal directions with their variances, and one variance for everything else, so a
  deviation outside the leading directions still counts. Above the threshold of the modality
  it was routed to (each modality's own, so that a small modality is not judged by the
  spread of the large ones) the image is ``"unknown"``.
- **Confidence.** The probability that the answer is right, from two calibrated parts: the
  probability that the image is in scope given its score (in-scope scores follow the
  distribution of the routed modality's training images; out-of-scope scores are taken as
  flat, with the prior set so that the probability is 1/2 exactly at the threshold, where the
  answer flips), and,
  for an answered image, the probability that the router's expert is the right one given its
  routing probability (Platt scaling on training images).
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
    lists once per detector (encode scores every batch)."""
    cached = _TENSORS.get(id(detector))
    if cached is None or cached[0] is not detector:
        cached = (detector, tuple(torch.tensor(detector[key], dtype=torch.float64) for key in ("means", "basis", "variances")))
        _TENSORS[id(detector)] = cached
    return cached[1]


def out_of_scope_score(detector: dict, features: torch.Tensor) -> torch.Tensor:
    """(B,) squared Mahalanobis distance of ``stage_pooled`` features to the nearest modality mean,
    under the detector's probabilistic-PCA covariance."""
    features = features.double()
    means, basis, variances = (t.to(features.device) for t in _detector_tensors(detector))
    offsets = features.unsqueeze(1) - means.unsqueeze(0)  # (B, M, D)
    along = offsets @ basis  # (B, M, R)
    outside = offsets.pow(2).sum(-1) - along.pow(2).sum(-1)
    distance = (along.pow(2) / variances).sum(-1) + outside.clamp_min(0) / detector["residual_variance"]
    return distance.min(dim=1).values


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


def in_scope_probability(scores: dict, score: torch.Tensor) -> torch.Tensor:
    """P(in scope | score) for one modality: 1/2 at its threshold, towards 1 for typical scores,
    towards 0 far above."""
    at_threshold = in_scope_tail(scores, torch.tensor(scores["threshold"], dtype=score.dtype, device=score.device))
    tail = in_scope_tail(scores, score)
    return tail / (tail + at_threshold)


def route_right_probability(calibration: dict, routing_probability: torch.Tensor) -> torch.Tensor:
    """P(the router's expert is the image's modality | its routing probability), Platt-scaled."""
    platt = calibration["router_confidence"]
    p = routing_probability.double().clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid(platt["scale"] * torch.log(p / (1 - p)) + platt["bias"])


@dataclass
class Decisions:
    """Per row: the modality, the probability that it is right, where it came from and, for
    ``"unknown"``, why."""

    modality: list[str]
    confidence: torch.Tensor
    source: list[str]
    reason: list[str | None]


def detect_modalities(config: MIDoLConfig, routing_logits: torch.Tensor, features: torch.Tensor | None) -> Decisions:
    """The router's answer for every row: its expert's modality, or ``"unknown"`` when that expert
    serves no modality or the image is out of scope (``features``: ``stage_pooled``)."""
    probs = routing_logits.float().softmax(dim=-1).cpu()
    top_p, top_i = probs.max(dim=-1)
    names = [config.expert_modalities[i] for i in top_i.tolist()]
    calibration = config.modality_calibration or {}
    detector = calibration.get("out_of_scope")
    if config.backbone_only:
        rows = len(names)
        return Decisions([UNKNOWN] * rows, torch.zeros(rows), [ROUTER] * rows, ["backbone-only model: no trained router"] * rows)
    if not detector:
        modality = [UNKNOWN if n == UNASSIGNED else n for n in names]
        reason = ["routed to an expert that serves no modality" if n == UNASSIGNED else None for n in names]
        return Decisions(modality, top_p, [ROUTER] * len(names), reason)
    if "basis" not in detector:
        raise ValueError("this model's out-of-scope detector was fitted by midol-hub < 0.2; recalibrate it with "
                         "midol_hub.calibrate(model, images) to use modality='auto'")
    score = out_of_scope_score(detector, features).cpu()
    right = route_right_probability(calibration, top_p)
    modality, reason, confidence = [], [], []
    for row, name in enumerate(names):
        if name == UNASSIGNED or name not in detector["in_scope"]:
            modality.append(UNKNOWN)
            reason.append("routed to an expert that serves no modality")
            confidence.append(1 - right[row])
            continue
        scores = detector["in_scope"][name]
        in_scope = in_scope_probability(scores, score[row : row + 1])[0]
        if score[row] > scores["threshold"]:
            modality.append(UNKNOWN)
            reason.append(f"unlike the {name} images it was calibrated on, and every other modality (out-of-scope score "
                          f"{float(score[row]):.0f} > {scores['threshold']:.0f})")
            confidence.append(1 - in_scope)
        else:
            modality.append(name)
            reason.append(None)
            confidence.append(in_scope * right[row])
    return Decisions(modality, torch.stack(confidence).float(), [ROUTER] * len(names), reason)
