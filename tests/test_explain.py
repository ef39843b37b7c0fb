"""Class heatmaps of a classifier trained on real data: shapes, targets, and the deletion test."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.heatmaps import deletion_drops, probe_classifier
from midol_hub import class_heatmap, extract_features

DELETED = 0.2


@pytest.fixture(scope="module")
def blood(data_root):
    """midol-micro with a linear probe fitted on 800 BloodMNIST training images, and 200 test images."""
    model, probe, encoder, test = probe_classifier("BloodMNIST")
    return model, probe, encoder, test.images[:200], test.labels[:200]


def test_the_classifier_is_its_probe_and_the_maps_explain_its_answers(blood):
    model, probe, encoder, images, labels = blood
    probabilities = model.predict(images[:40])
    expected = probe.probs(extract_features(encoder, images[:40], "pathology"))
    assert np.abs(probabilities.numpy() - expected).max() < 1e-4
    maps = class_heatmap(model, images[:40])
    size = model.config.img_size
    assert maps.heat.shape == (40, size, size) and float(maps.heat.min()) >= 0 and float(maps.heat.max()) <= 1
    assert torch.equal(maps.target, probabilities.argmax(1))
    assert torch.allclose(maps.probability, probabilities.max(1).values, atol=1e-5)
    assert float((maps.target.numpy() == labels[:40]).mean()) > 0.6
    fixed = class_heatmap(model, images[:4], target=3)
    assert fixed.target.tolist() == [3] * 4
    assert torch.allclose(fixed.probability, probabilities[:4, 3], atol=1e-5)


def test_blurring_the_hottest_fifth_costs_more_than_blurring_a_random_fifth(blood):
    model, _, _, images, _ = blood
    drop_top, drop_random = deletion_drops(model, class_heatmap(model, images), DELETED)
    # measured (python -m benchmarks.heatmaps): 0.040 vs 0.006 on these 200 images; the hot region wins on 64%
    assert float(drop_top.mean()) > 2 * float(drop_random.mean()) > 0
    assert float((drop_top > drop_random).float().mean()) > 0.6


def test_explain_draws_class_heatmaps_of_a_saved_classifier(blood, tmp_path):
    model, _, _, images, _ = blood
    model.save_pretrained(tmp_path / "classifier")
    files = []
    for i in range(3):
        Image.fromarray(np.asarray(images[i])).save(tmp_path / f"cell{i}.png")
        files.append(str(tmp_path / f"cell{i}.png"))
    result = subprocess.run([sys.executable, "-m", "midol_hub.cli", "explain", *files, "--classifier",
                             str(tmp_path / "classifier"), "--out", str(tmp_path / "maps")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    drawn = sorted((tmp_path / "maps").glob("*.png"))
    assert [p.name for p in drawn] == [f"cell{i}-gradcam.png" for i in range(3)]
    assert min(Image.open(p).size[0] for p in drawn) > 400
    bad = subprocess.run([sys.executable, "-m", "midol_hub.cli", "explain", files[0], "--classifier", str(tmp_path),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 1 and "no config.json" in bad.stderr
