"""Config, registry and modality names."""

from __future__ import annotations

import json

import pytest

from midol_hub import (
    MODALITIES,
    MIDoLConfig,
    canonical_modality,
    get_entry,
    list_models,
)
from midol_hub.modalities import ModalityProfile


@pytest.mark.parametrize(
    "alias, canonical",
    [("X-Ray", "xray"), ("CXR", "xray"), ("cfp", "fundus"), ("OCT", "oct"), ("derm", "dermoscopy"),
     ("Histopathology", "pathology"), (" pathology ", "pathology")],
)
def test_aliases_are_case_insensitive(alias, canonical):
    assert canonical_modality(alias) == canonical


def test_unknown_modality_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown modality 'mri'.*xray, fundus, oct, dermoscopy, pathology"):
        canonical_modality("mri")
    assert canonical_modality("AUTO", allow_auto=True) == "auto"
    with pytest.raises(ValueError):
        canonical_modality("auto")


def test_config_json_round_trip_keeps_every_field(tmp_path):
    config = MIDoLConfig(**get_entry("midol-micro").config, modality_calibration={"accuracy": {"oct": 0.9}, "macro_accuracy": 0.9})
    config.save_pretrained(tmp_path)
    loaded = MIDoLConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.num_features == 256
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "midol"


def test_profiles_follow_the_modality():
    config = MIDoLConfig()
    assert config.profile("cxr") == ModalityProfile(size=224, resize="whole", channels="gray")
    assert config.profile("fundus").crop_border
    assert config.profile("derm").resize == "crop"
    assert config.expert_for("histopathology") == MODALITIES.index("pathology")


def test_preprocessing_hash_changes_with_the_profiles():
    a, b = MIDoLConfig(), MIDoLConfig()
    assert a.preprocessing_hash() == b.preprocessing_hash()
    b.preprocessing["oct"]["resize"] = "crop"
    assert a.preprocessing_hash() != b.preprocessing_hash()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=6), "top_k=6"),
        (dict(expert_modalities=["xray", "oct"]), "expert_modalities lists 2"),
        (dict(depths=[2, 2], num_heads=[4]), "same length"),
        (dict(expert_modalities=["xray", "oct", "fundus", "derm", "mri"]), "unknown modality 'mri'"),
    ],
)
def test_invalid_configs_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MIDoLConfig(**kwargs)


def test_bad_profile_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown preprocessing keys \['colour'\]"):
        ModalityProfile.from_dict({"size": 64, "colour": "rgb"})


def test_registry_lists_the_four_architectures():
    assert list_models() == ["midol-swin-base", "midol-swin-tiny", "midol-lite", "midol-micro"]
    assert list_models(pretrained=True) == ["midol-lite", "midol-micro"]  # shipped in the package
    assert get_entry("MIDOL_MICRO").name == "midol-micro"
    assert get_entry("nope") is None
