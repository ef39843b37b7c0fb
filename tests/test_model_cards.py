"""Model cards: every template renders, its YAML parses and agrees with the config."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

import midol_hub
from midol_hub import get_entry, list_models
from midol_hub.model_card import (
    card_templates,
    input_spec,
    render_model_card,
    separation_table,
)

from .helpers import make_micro

RESULTS = {"PneumoniaMNIST": {"linear probe": {"accuracy": 0.8123, "auc": 0.9}, "kNN": {"accuracy": 0.75}}}


def split_card(card) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", str(card), re.DOTALL)
    assert match, "card must start with YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.mark.parametrize("template", ["midol-swin-base", "midol-swin-tiny", "midol-micro", "midol-lite", None])
def test_every_template_renders_valid_yaml_that_matches_the_config(template):
    entry = get_entry(template) if template else None
    config = entry.make_config() if entry else make_micro().config
    card = str(render_model_card(config, name=template, results=RESULTS, base_model="midol-swin-base" if not template else None))
    meta, body = split_card(card)
    assert meta["library_name"] == "midol-hub"
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert "medical-imaging" in meta["tags"]
    assert ("swin-transformer" in meta["tags"]) == config.is_swin  # midol-lite is a CNN: tagged with its timm name
    assert config.is_swin or config.backbone in meta["tags"]
    assert meta["license"] == (entry.license if entry else "other")
    if not template:
        assert meta["base_model"] == "midol-swin-base"
    assert all(isinstance(d, str) for d in meta.get("datasets", []))
    assert "$" not in card.replace("$MIDOL", "")  # every placeholder was filled
    spec = json.loads(re.search(r"```json\n(.*?)\n```", body, re.DOTALL).group(1))
    assert spec == json.loads(json.dumps(input_spec(config)))
    assert spec["xray"]["channels"] == "gray" and spec["oct"]["size"] == [config.img_size] * 2
    assert f"{config.num_features}-d per expert subspace" in body
    assert "| PneumoniaMNIST | linear probe | 0.812 | 0.900 |" in body
    assert "| PneumoniaMNIST | kNN | 0.750 |  |" in body
    assert "not a medical device" in body and "arXiv:2604.08936" in body
    index = meta["model-index"][0]
    assert index["name"] == (template or "M-IDoL model")
    found = {(r["dataset"]["name"], m["name"], m["type"], m["value"]) for r in index["results"] for m in r["metrics"]}
    assert found == {("PneumoniaMNIST", "linear probe accuracy", "accuracy", 0.8123),
                     ("PneumoniaMNIST", "linear probe auc", "roc_auc", 0.9), ("PneumoniaMNIST", "kNN accuracy", "accuracy", 0.75)}
    assert ModelCard(card).data.eval_results[0].metric_value == 0.8123  # huggingface_hub reads it back


def test_all_registry_models_have_a_template():
    assert card_templates() == sorted(["midol", *list_models()])
    assert "midol-lite" in card_templates()


def test_templates_live_inside_the_package():
    """A source checkout on PYTHONPATH (no install) must find them: a mapped top-level folder is found only once installed."""
    templates = Path(str(resources.files("midol_hub.model_cards")))
    assert templates == Path(midol_hub.__file__).parent / "model_cards"
    assert (templates / "midol-lite.md").is_file()


def test_save_pretrained_fills_the_evaluation_table_from_a_json_file(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    make_micro().save_pretrained(tmp_path / "model", results=results)
    _, body = split_card((tmp_path / "model" / "README.md").read_text())
    assert "| PneumoniaMNIST | linear probe | 0.812 | 0.900 |" in body
    assert "No evaluation results yet." not in body


def test_separation_table_reports_accuracy_misses_out_of_scope_answers_and_calibration():
    separation = {
        "auto routing": {"nmi": 0.8, "accuracy": {"fundus": 1.0, "pathology": 0.5}, "macro_accuracy": 0.75,
                         "unknown_rate": {"fundus": 0.0, "pathology": 0.25}},
        "sizes": {"test": 40},
        "full resolution": {"accuracy": {"fundus": 1.0, "pathology": 0.5}, "unknown_rate": {"fundus": 0.0, "pathology": 0.0},
                            "images": {"fundus": 3, "pathology": 2}, "macro_accuracy": 0.75, "misses": {"a.tif": "xray"}},
        "out of scope": {"unknown_rate": 0.5, "images": 2, "answers": {"CT_small.dcm": "unknown", "chelsea.png": "dermoscopy"}},
        "confidence": {"ece": 0.04, "auroc": 0.91, "right": 0.9, "mean_confidence": 0.86, "images": 47},
    }
    table = separation_table(separation)
    assert "on 40 test-split images (NMI between modality and expert 0.800)" in table
    assert "| pathology | 0.500 | 0.250 | 0.500 | 0.000 | 2 |" in table
    assert "| **macro** | **0.750** | | **0.750** | | |" in table
    assert "Full-resolution misses: a.tif -> xray." in table
    assert "0.500 called `unknown`; given a modality: chelsea.png -> dermoscopy." in table
    assert "expected calibration error 0.040, AUROC right vs wrong 0.910" in table
    uncalibrated = separation_table({"auto routing": {"nmi": 0.1}, "sizes": {"test": 5}})
    assert uncalibrated.endswith("Uncalibrated: no expert is assigned to a modality yet.")
