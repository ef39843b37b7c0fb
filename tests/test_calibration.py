"""Expert calibration: Hungarian assignment on argmax counts, unassigned modalities, and the
out-of-scope detector behind ``modality="auto"`` answering ``"unknown"``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midol_hub import calibrate, routing_report
from midol_hub.calibration import detect_modalities
from midol_hub.evaluate import BENCHMARKS

from .conftest import make_micro


def test_routing_report_matches_experts_by_argmax_counts_and_leaves_unserved_modalities_out():
    # xray and oct both go to expert 2 (the router merged them); fundus is split 6 / 4
    modalities = ["xray"] * 10 + ["oct"] * 10 + ["fundus"] * 10
    experts = [2] * 10 + [2] * 8 + [0] * 2 + [1] * 6 + [3] * 4
    report = routing_report(modalities, experts, num_experts=5)
    assert report["confusion"] == [[0, 0, 10, 0, 0], [2, 0, 8, 0, 0], [0, 6, 0, 4, 0]]
    # Hungarian maximises the matched counts: xray->2 (10), fundus->1 (6), oct->0 (2 of 10, at the 1/5 floor)
    assert report["assignment"] == {"xray": 2, "oct": 0, "fundus": 1}
    assert report["accuracy"] == {"xray": 1.0, "oct": 0.2, "fundus": 0.6}
    assert report["macro_accuracy"] == pytest.approx(0.6)
    assert report["expert_usage"] == [2 / 30, 6 / 30, 18 / 30, 4 / 30, 0.0]
    below_chance = routing_report(modalities, experts, num_experts=5, min_share=0.3)
    assert below_chance["assignment"]["oct"] is None and below_chance["accuracy"]["oct"] == 0.0
    perfect = routing_report(["a", "b"] * 5, [3, 1] * 5, num_experts=4)
    assert perfect["macro_accuracy"] == 1.0 and perfect["nmi"] == pytest.approx(1.0)


def test_detection_follows_the_routed_expert_and_the_stored_gaussians():
    model = make_micro()
    config = model.config
    config.expert_modalities = ["xray", "unassigned", "oct", "dermoscopy", "pathology"]
    dim = config.num_features
    mean = torch.zeros(dim, dtype=torch.float64)
    mean[0] = 1.0
    config.modality_calibration = {"out_of_scope": {
        "radius": {"xray": 2.0}, "mean": {"xray": mean.tolist()}, "variance": {"xray": [1e-4] * dim}}}
    near = mean + 0.05 * torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / dim**0.5
    far = torch.zeros(dim, dtype=torch.float64)
    far[1] = 1.0  # another direction: mean squared z-score (1 + 1) / 1e-4 / dim, far above the radius
    pooled = torch.stack([near, far, near, near]).float()
    said = detect_modalities(config, torch.tensor([0, 0, 1, 2]), pooled)
    # near the xray Gaussian; far from it; routed to the unassigned expert; oct has no detector entry
    assert said == ["xray", "unknown", "unknown", "unknown"]


@pytest.fixture(scope="module")
def training_images(data_root) -> dict[str, list]:
    return {modality: load(data_root)[0].images[:60] for modality, load in BENCHMARKS.values()}


def test_calibration_on_real_training_images(training_images):
    model = make_micro(seed=5)
    calibration = calibrate(model, training_images, quantile=0.95)
    counts = np.array(calibration["confusion"])
    assert counts.sum() == 300 and calibration["images_per_modality"]["oct"] == 60
    for row, modality in enumerate(calibration["modalities_order"]):
        if modality in model.config.expert_modalities:
            expert = model.config.expert_modalities.index(modality)
            assert calibration["accuracy"][modality] == pytest.approx(counts[row, expert] / 60)
        else:
            assert calibration["accuracy"][modality] == 0.0
    assert set(calibration["out_of_scope"]["mean"]) == {m for m in model.config.expert_modalities if m != "unassigned"}
    # on the images it was fitted to, the detector calls about 1 - quantile of each served modality unknown
    for modality, images in training_images.items():
        if modality not in model.config.expert_modalities:
            continue
        encoding = model.encode(images, modality="auto")
        routed_here = [m for m, e in zip(encoding.modality, encoding.expert_index.tolist())
                       if model.config.expert_modalities[e] == modality]
        if routed_here:
            assert routed_here.count("unknown") <= 0.05 * 60 + 1
    with pytest.raises(ValueError, match="given twice"):
        calibrate(model, {"oct": training_images["oct"][:2], "OCT": training_images["oct"][:2]})
