"""Calibration: which expert serves which modality, which images are none of them, and how
sure ``modality="auto"`` may be. Fitted on labelled training images only.

- **Experts.** The router learns its split of the images without labels, so an expert has
  no modality until labelled images are routed through the model. Experts are matched
  one-to-one to modalities by Hungarian assignment on the argmax-routing counts; an expert
  that no modality reaches stays ``"unassigned"``, and a modality that reaches no expert of its
  own (the router put its images with another modality's) shares the expert most of its
  images go to (``shared_experts``). ``auto`` names
  modalities by the detector below, not by the router, so every calibrated modality is named.
- **Out-of-scope detector** (used by :mod:`midol_hub.detection`): class means of the
  ``stage_pooled`` features, their shared (tied) covariance as a probabilistic PCA (its
  ``components`` leading directions and variances, one variance for the rest), and per
  modality the score that ``quantile`` of its held-out training images stay under (where
  P(in scope) is 1/2). Held out means two-fold, each half scored by a detector fitted on the other, repeated over
  ``repeats`` random splits (a threshold read from one split of a small modality moves with the
  split), and never splitting a ``group``: views of one patient, lesion, slide or file are held
  out together, or the held-out scores come out too good and the threshold too tight for new
  patients. The held-out scores also give each modality's in-scope score distribution behind
  the confidence. (Measured on midol-micro v3, ``benchmarks.ood``: one threshold for all
  called 0.077 of held-out pathology and 0.081 of OCT images unknown but 0.006 of fundus; one
  per modality 0.048-0.067 each.)
- **Confidence of the answer.** Platt scaling of the nearest modality's margin over the second
  nearest against "the nearest modality is the image's", on the same held-out scores, and the
  ``slope`` with which P(in scope) falls past the ``quantile`` (:mod:`midol_hub.detection`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from .detection import modality_distances, nearest_margin
from .evaluation import routing_report
from .modalities import SHARED, UNASSIGNED, canonical_modality
from .modeling_midol import MIDoLModel

SCORE_QUANTILES = 100  # stored points of the in-scope score distribution (levels 0, 0.01, ..., 0.99)
QUANTILE, COMPONENTS, REPEATS, SLOPE = 0.975, 64, 5, 1.5
"""Defaults of :func:`calibrate`: the share of held-out training images whose score keeps
P(in scope) over 1/2, the covariance's principal directions, the held-out splits and how fast
P(in scope) falls past the quantile. Chosen on midol-micro v3 by ``benchmarks.ood.chosen_setting``
(training images and the out-of-scope set only; the rule and its table are in the model card)."""


def fit_detector(features: torch.Tensor, labels: Sequence[str], components: int = COMPONENTS) -> dict:
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


def two_fold(groups: Sequence, seed: int = 0) -> np.ndarray:
    """(N,) 0 or 1 per item: a random half of the groups each, so a group is never split."""
    names = list(dict.fromkeys(groups))
    side = dict(zip(names, np.random.default_rng(seed).permutation(len(names)) % 2))
    return np.array([side[g] for g in groups])


def held_out_distances(features: torch.Tensor, labels: Sequence[str], components: int,
                       groups: Sequence | None = None, seed: int = 0) -> torch.Tensor:
    """(N, M) each image's distances to the modality means (in first-seen label order) under a
    detector fitted on the other half of the images; a group (``groups``: one id per image) is
    never split between the halves."""
    groups = list(groups) if groups is not None else list(range(len(labels)))
    if len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} entries for {len(labels)} images; give one group per image")
    sides = two_fold(groups, seed)
    names = list(dict.fromkeys(labels))
    distances = torch.empty(len(labels), len(names), dtype=torch.float64)
    for half in (0, 1):
        fit_on, score_on = np.flatnonzero(sides == half), np.flatnonzero(sides != half)
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


def calibrate(model: MIDoLModel, images: Mapping[str, Sequence], groups: Mapping[str, Sequence[str]] | None = None,
              quantile: float = QUANTILE, components: int = COMPONENTS, repeats: int = REPEATS,
              slope: float = SLOPE, batch_size: int = 64) -> dict:
    """Assign the experts of ``model`` to modalities from labelled ``images`` ({modality: images}),
    fit the out-of-scope detector and the confidence of ``auto``'s answers.

    ``groups`` ({modality: one id per image}, optional) names what must be held out together:
    the patient, lesion or slide of each image, or the file that several crops were cut from.
    Without it every image is its own group. Updates ``model.config.expert_modalities`` and
    ``model.config.modality_calibration`` in place and returns the calibration: per-modality
    routing ``accuracy`` and its mean ``macro_accuracy``, the modality x expert ``confusion``
    counts, ``nmi``, the ``shared_experts`` ({modality: expert} of modalities without an expert of
    their own), the ``out_of_scope`` detector and ``nearest_confidence``. Use training
    images only: evaluate on held-out ones.
    """
    config = model.config
    if config.expert_modalities == [SHARED]:
        raise ValueError("a one-expert (plain DINO) model has no experts to calibrate")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not slope > 0:
        raise ValueError(f"slope must be positive, got {slope}")
    for modality, ids in (groups or {}).items():
        if modality not in images or len(ids) != len(images[modality]):
            given = len(images[modality]) if modality in images else "no"
            raise ValueError(f"groups[{modality!r}] has {len(ids)} ids for {given} images; give one group per image "
                             "of the same modality")
    with uncalibrated(model):  # route without the old detector
        calibration = _fit(model, images, groups or {}, quantile, components, repeats, slope, batch_size)
    config.modality_calibration = calibration
    return calibration


@contextmanager
def uncalibrated(model: MIDoLModel) -> Iterator[MIDoLModel]:
    """``model`` without its modality calibration for the block (``auto`` answers by the router),
    restored afterwards: features for fitting a detector must not need the detector."""
    previous, model.config.modality_calibration = model.config.modality_calibration, None
    try:
        yield model
    finally:
        model.config.modality_calibration = previous


def fit_out_of_scope(features: torch.Tensor, labels: Sequence[str], groups: Sequence | None = None,
                     quantile: float = QUANTILE, components: int = COMPONENTS, repeats: int = REPEATS,
                     slope: float = SLOPE) -> dict:
    """The ``out_of_scope`` detector and the ``nearest_confidence`` Platt scaling from labelled
    ``stage_pooled`` features (what :func:`calibrate` stores; usable without a model)."""
    detector = fit_detector(features, labels, components)
    distances = torch.cat([held_out_distances(features, labels, components, groups, seed)
                           for seed in range(repeats)])  # every image scored once per split
    scores, nearest = (values.numpy() for values in distances.min(dim=1))
    label_array = np.array(list(labels) * repeats)
    detector.update(quantile=quantile, components=len(detector["variances"]), repeats=repeats, slope=slope,
                    in_scope={m: in_scope_scores(scores[label_array == m], quantile) for m in detector["modalities"]})
    right = np.array(list(dict.fromkeys(labels)))[nearest] == label_array
    return {"out_of_scope": detector, "nearest_confidence": platt(np.log1p(nearest_margin(distances).numpy()), right)}


def _fit(model: MIDoLModel, images: Mapping[str, Sequence], groups: Mapping[str, Sequence[str]], quantile: float,
         components: int, repeats: int, slope: float, batch_size: int) -> dict:
    config = model.config
    labels, image_groups, experts, features = [], [], [], []
    for modality, items in images.items():
        key = canonical_modality(modality)
        if key in labels:
            raise ValueError(f"modality {key!r} is given twice; pass each modality's images once")
        encoding = model.encode(list(items), modality="auto", output="stage_pooled", batch_size=batch_size)
        labels += [key] * len(encoding)
        image_groups += [(key, g) for g in groups.get(modality, range(len(encoding)))]
        experts.append(encoding.expert_index)
        features.append(encoding.stage_pooled)
    expert_index = torch.cat(experts).numpy()
    report = routing_report(labels, expert_index, config.num_experts)
    expert_modalities = [UNASSIGNED] * config.num_experts
    for modality, expert in report["assignment"].items():
        if expert is not None:
            expert_modalities[expert] = modality
    counts = dict(zip(report["modalities_order"], np.array(report["confusion"])))
    shared_experts = {m: int(counts[m].argmax()) for m, expert in report["assignment"].items() if expert is None}
    fitted = fit_out_of_scope(torch.cat(features), labels, image_groups, quantile, components, repeats, slope)
    calibration = {
        "method": "Hungarian assignment on argmax-routing counts of labelled training images",
        **{key: report[key] for key in ("accuracy", "macro_accuracy", "confusion", "modalities_order", "nmi")},
        "shared_experts": shared_experts,
        "images_per_modality": {m: labels.count(m) for m in report["modalities_order"]},
        **fitted,
    }
    config.expert_modalities = expert_modalities
    return calibration
