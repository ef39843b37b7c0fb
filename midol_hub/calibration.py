"""Expert calibration: which expert serves which modality, and which images are none of them.

The router learns its split of the images without labels, so an expert has no modality
until labelled images (training data only) are routed through the model. Experts are then
matched one-to-one to modalities by Hungarian assignment on the argmax-routing counts (the
same rule ``modality="auto"`` answers by); an expert that no modality reaches stays
``"unassigned"``. An out-of-scope detector is fitted at the same time: per modality, a
diagonal Gaussian of its images' L2-normalised pooled features, and the mean squared z-score
that ``quantile`` of them stay within. ``modality="auto"`` answers ``"unknown"`` for an image
farther than that from the modality it was routed to, or routed to an unassigned expert.
(Measured on midol-micro: a centroid-cosine radius let an MR slice pass as pathology; the
diagonal Gaussian flags both out-of-scope slices at the same false-unknown rate.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .evaluation import routing_report
from .modalities import SHARED, UNASSIGNED, UNKNOWN, canonical_modality

VARIANCE_FLOOR = 1e-6  # keeps near-constant feature dimensions from dominating the distance

if TYPE_CHECKING:
    from .configuration_midol import MIDoLConfig
    from .modeling_midol import MIDoLModel


def calibrate(model: MIDoLModel, images: Mapping[str, Sequence], quantile: float = 0.99, batch_size: int = 64) -> dict:
    """Assign the experts of ``model`` to modalities from labelled ``images`` ({modality: images}).

    Updates ``model.config.expert_modalities`` and ``model.config.modality_calibration`` in
    place and returns the calibration: per-modality routing ``accuracy`` and its mean
    ``macro_accuracy``, the modality x expert ``confusion`` counts, ``nmi`` and the
    ``out_of_scope`` detector. Use training images only: evaluate on held-out ones.
    """
    config = model.config
    if config.expert_modalities == [SHARED]:
        raise ValueError("a one-expert (plain DINO) model has no experts to calibrate")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    labels, experts, pooled = [], [], []
    for modality, items in images.items():
        key = canonical_modality(modality)
        if key in labels:
            raise ValueError(f"modality {key!r} is given twice; pass each modality's images once")
        encoding = model.encode(list(items), modality="auto", output="pooled", batch_size=batch_size)
        labels += [key] * len(encoding)
        experts.append(encoding.expert_index)
        pooled.append(encoding.pooled)
    report = routing_report(labels, torch.cat(experts).numpy(), config.num_experts)
    features = F.normalize(torch.cat(pooled).double(), dim=-1)
    label_array = np.array(labels)
    means, variances, radius = {}, {}, {}
    for modality, expert in report["assignment"].items():
        if expert is None:
            continue
        own = features[torch.from_numpy(label_array == modality)]
        mean, variance = own.mean(dim=0), own.var(dim=0, unbiased=False) + VARIANCE_FLOOR
        means[modality], variances[modality] = mean.tolist(), variance.tolist()
        radius[modality] = float(torch.quantile(_distance(own, mean, variance), quantile))
    expert_modalities = [UNASSIGNED] * config.num_experts
    for modality, expert in report["assignment"].items():
        if expert is not None:
            expert_modalities[expert] = modality
    calibration = {
        "method": "Hungarian assignment on argmax-routing counts of labelled training images",
        **{key: report[key] for key in ("accuracy", "macro_accuracy", "confusion", "modalities_order", "nmi")},
        "images_per_modality": {m: int((label_array == m).sum()) for m in report["modalities_order"]},
        "out_of_scope": {"quantile": quantile, "radius": radius, "mean": means, "variance": variances},
    }
    config.expert_modalities = expert_modalities
    config.modality_calibration = calibration
    return calibration


def detect_modalities(config: MIDoLConfig, expert_index: torch.Tensor, pooled: torch.Tensor) -> list[str]:
    """The modality ``modality="auto"`` reports per image: its expert's modality, or ``"unknown"``
    when that expert is unassigned or the image lies outside the modality's calibrated radius."""
    if config.backbone_only:
        return [UNKNOWN] * len(expert_index)
    names = [config.expert_modalities[i] for i in expert_index.tolist()]
    detector = (config.modality_calibration or {}).get("out_of_scope")
    if not detector:
        return [UNKNOWN if name == UNASSIGNED else name for name in names]
    features = F.normalize(pooled.double(), dim=-1)
    result = [UNKNOWN] * len(names)
    for name in set(names) & set(detector["mean"]):  # one distance computation per modality, not per image
        rows = [row for row, routed in enumerate(names) if routed == name]
        mean, variance = (torch.tensor(detector[key][name], dtype=features.dtype, device=features.device)
                          for key in ("mean", "variance"))
        inside = _distance(features[rows], mean, variance) <= detector["radius"][name]
        for row, ok in zip(rows, inside.tolist()):
            result[row] = name if ok else UNKNOWN
    return result


def _distance(features: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Mean squared z-score of each row under a diagonal Gaussian: 1 on average for its own images."""
    return ((features - mean) ** 2 / variance).mean(dim=-1)
