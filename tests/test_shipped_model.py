"""The midol-micro weights shipped inside the package: offline loading, calibration, quality floors."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from midol_hub import MODALITIES, extract_features, from_npz, get_entry, linear_probe, list_models, load_model
from midol_hub.evaluate import BENCHMARKS

# Floors sit below what was measured on these samples when the weights were made (overall
# purity 0.35, X-ray 1.0, OCT 0.8; probe 0.72). A random router scores about 0.2 everywhere.
PURITY_FLOOR = {"all": 0.3, "xray": 0.9, "oct": 0.6}
PNEUMONIA_PROBE_FLOOR = 0.68


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
    assert sorted(shipped.config.expert_modalities) == sorted(MODALITIES)
    assert set(shipped.config.modality_calibration["purity"]) == set(MODALITIES)


def test_routing_sends_real_test_images_to_their_modality(shipped, data_root):
    images, labels = [], []
    for modality, load in BENCHMARKS.values():
        test = load(data_root)[1]
        picks = np.random.default_rng(0).permutation(len(test))[:20]
        images += [test.images[i] for i in picks]
        labels += [modality] * len(picks)
    encoding = shipped.encode(images, modality="auto")
    hits = np.array([m == label for m, label in zip(encoding.modality, labels)])
    labels = np.array(labels)
    purity = {"all": hits.mean(), "xray": hits[labels == "xray"].mean(), "oct": hits[labels == "oct"].mean()}
    assert all(purity[key] >= floor for key, floor in PURITY_FLOOR.items()), purity


def test_linear_probe_floor_on_pneumoniamnist(shipped, data_root):
    path = data_root / "xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz"
    train, test = from_npz(path, "train").subset(range(0, 2428, 6)), from_npz(path, "test").subset(range(0, 468, 2))
    probs = linear_probe(extract_features(shipped, train.images, "xray"), train.labels,
                         extract_features(shipped, test.images, "xray"))
    accuracy = float((probs.argmax(1) == test.labels).mean())
    assert accuracy >= PNEUMONIA_PROBE_FLOOR, accuracy


def test_card_reports_the_comparison_and_credits_the_data():
    card = (get_entry("midol-micro").embedded_path() / "README.md").read_text()
    assert "| PneumoniaMNIST | linear probe |" in card
    assert re.search(r"\| modality separation \| routing purity \| n/a \| n/a \| 0\.\d{3} \|", card)
    assert "DINO baseline" in card and "CC BY 4.0" in card and "Kermany" in card
    assert "python -m midol_hub.evaluate --model midol-micro --separation" in card
