"""The midol-micro weights shipped inside the package: offline loading, calibration, quality floors."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
from midol_hub.evaluate import BENCHMARKS
from safetensors import safe_open

from midol_hub import (
    MODALITIES,
    extract_features,
    from_npz,
    get_entry,
    linear_probe,
    list_models,
    load_model,
)

# Floors sit below what was measured on these samples when the weights were made; a random
# router names about 0.2 of each modality.
ROUTING_MACRO_FLOOR = 0.85  # measured 0.935 (20 test images per dataset)
ROUTING_MODALITY_FLOOR = 0.7  # measured: pathology 0.825, dermoscopy 0.90, OCT 0.95, X-ray and fundus 1.0
PNEUMONIA_PROBE_FLOOR = 0.75  # measured 0.808


@pytest.fixture(scope="module")
def shipped():
    return load_model("midol-micro")


def test_loads_offline_from_the_package(shipped):
    entry = get_entry("midol-micro")
    weights = entry.embedded_path() / "model.safetensors"
    assert "midol-micro" in list_models(pretrained=True)
    assert shipped.provenance.source == "embedded" and shipped.provenance.location == "midol-micro"
    assert shipped.provenance.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    with safe_open(weights, "pt") as stored:  # stored in fp16, computed in fp32
        assert stored.get_tensor("head.fc1_weight").dtype == torch.float16
    assert shipped.head.fc1_weight.dtype == torch.float32 and shipped.head.prototypes is None


def test_experts_are_calibrated_on_the_five_modalities(shipped):
    calibration = shipped.config.modality_calibration
    assert sorted(shipped.config.expert_modalities) == sorted(MODALITIES)
    assert set(calibration["accuracy"]) == set(MODALITIES) == set(calibration["out_of_scope"]["radius"])
    assert calibration["macro_accuracy"] == pytest.approx(np.mean(list(calibration["accuracy"].values())))
    assert calibration["out_of_scope"]["quantile"] == 0.99


def test_auto_names_the_modality_of_real_test_images(shipped, data_root):
    images, labels = [], []
    for modality, load in BENCHMARKS.values():
        test = load(data_root)[1]
        picks = np.random.default_rng(0).permutation(len(test))[:20]
        images += [test.images[i] for i in picks]
        labels += [modality] * len(picks)
    said, labels = np.array(shipped.encode(images, modality="auto").modality), np.array(labels)
    accuracy = {m: float((said[labels == m] == m).mean()) for m in MODALITIES}
    assert np.mean(list(accuracy.values())) >= ROUTING_MACRO_FLOOR, accuracy
    assert min(accuracy.values()) >= ROUTING_MODALITY_FLOOR, accuracy


def test_ct_and_mr_slices_are_not_given_a_modality(shipped, data_root):
    outside = sorted(str(p) for p in (data_root / "other/pydicom_test_files").glob("*.dcm"))
    assert len(outside) == 2
    assert shipped.encode(outside, modality="auto").modality == ["unknown", "unknown"]


def test_linear_probe_floor_on_pneumoniamnist(shipped, data_root):
    path = data_root / "xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz"
    train, test = from_npz(path, "train").subset(range(0, 2428, 6)), from_npz(path, "test").subset(range(0, 468, 2))
    probs = linear_probe(extract_features(shipped, train.images, "xray"), train.labels,
                         extract_features(shipped, test.images, "xray"))
    accuracy = float((probs.argmax(1) == test.labels).mean())
    assert accuracy >= PNEUMONIA_PROBE_FLOOR, accuracy


def test_card_reports_the_comparison_ablations_and_credits_the_data():
    card = (get_entry("midol-micro").embedded_path() / "README.md").read_text()
    assert "| PneumoniaMNIST | linear probe accuracy |" in card
    assert re.search(r"\| modality separation \| NMI modality vs expert \| 0\.\d{3} \| 0\.\d{3} \| 0\.\d{3} \|", card)
    assert "### Ablations" in card and "| official |" in card and "routing=balanced" in card
    assert "DINO baseline" in card and "CC BY 4.0" in card and "Kermany" in card
    assert "python -m midol_hub.evaluate --model midol-micro --separation" in card
