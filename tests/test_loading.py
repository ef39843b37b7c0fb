"""load_model from registry names, directories and single files; save/load round trips."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from midol_hub import (
    MIDoLModel,
    ModelNotFoundError,
    WeightsMismatchError,
    WeightsNotAvailableError,
    list_models,
    load_model,
)
from midol_hub.registry import get_entry


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_save_writes_config_weights_and_card(micro_dir):
    assert sorted(p.name for p in micro_dir.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                           "preprocessor_config.json"]
    card = (micro_dir / "README.md").read_text()
    meta = ModelCard(card).data
    assert meta.license == "apache-2.0" and meta.pipeline_tag == "image-feature-extraction"
    assert "not a medical device" in card


def test_save_load_round_trip_is_bit_exact(micro, micro_dir):
    loaded = load_model(micro_dir)
    assert_same_weights(micro, loaded)
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(micro(x).embedding, loaded(x).embedding)
    # non-persistent buffers (relative position index, shift masks) are recomputed, not left on meta
    assert not any(buffer.is_meta for buffer in loaded.buffers())


def test_single_safetensors_file_with_config_beside_it(micro, micro_dir, tmp_path):
    shutil.copy(micro_dir / "config.json", tmp_path / "config.json")
    shutil.copy(micro_dir / "model.safetensors", tmp_path / "teacher.safetensors")
    loaded = load_model(tmp_path / "teacher.safetensors")
    assert_same_weights(micro, loaded)
    assert loaded.provenance.weights_path == str(tmp_path / "teacher.safetensors")


def test_provenance_hashes_the_weights_file(micro_dir):
    model = load_model(micro_dir)
    expected = hashlib.sha256((micro_dir / "model.safetensors").read_bytes()).hexdigest()
    assert model.provenance.source == "local"
    assert model.provenance.weights_sha256 == expected
    assert model.provenance.preprocessing_sha256 == model.config.preprocessing_hash()


def test_dtype_is_applied_at_load(micro, micro_dir):
    model = load_model(micro_dir, dtype="bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.head.fc1_weight.device.type == "cpu"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = micro(x).pooled
        low = model(x.bfloat16()).pooled.float()
    assert torch.nn.functional.cosine_similarity(ref, low).min() > 0.99


@pytest.mark.parametrize("name", list_models())
def test_every_registry_name_builds_with_random_weights(name):
    with pytest.warns(UserWarning, match="random weights"):
        model = load_model(name, pretrained=False)
    assert model.provenance.source == "random"
    assert model.head.fc1_weight.shape[0] == 5


def test_registry_name_without_weights_says_how_to_get_them():
    with pytest.raises(WeightsNotAvailableError, match=r"midol convert.*training\.pretrain --config training/configs/"
                                                      r"midol_swin_base\.yaml.*pretrained=False"):
        load_model("midol-swin-base")
    # no official checkpoint exists for a CNN backbone: only its recipe and random weights are offered
    ways = get_entry("midol-lite").how_to_get_weights()
    assert "midol convert" not in ways and "--config training/configs/midol_lite.yaml" in ways and "pretrained=False" in ways
    for entry in (get_entry("midol-swin-base"), get_entry("midol-lite")):  # the recipes named exist
        assert (Path(__file__).parents[1] / entry.recipe).is_file()


def test_unknown_name_says_what_was_looked_for():
    with pytest.raises(ModelNotFoundError, match=r"'midol-huge'.*not a registry name.*midol-micro.*org/name"):
        load_model("midol-huge")


def test_directory_without_config_is_reported(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        load_model(tmp_path)


def test_config_without_weights_is_reported(micro_dir, tmp_path):
    shutil.copy(micro_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelNotFoundError, match=r"no weights: expected .*model\.safetensors"):
        load_model(tmp_path)


def test_foreign_config_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelNotFoundError, match=r"'vit' model, not an M-IDoL model"):
        load_model(tmp_path)


def test_pth_checkpoints_point_to_conversion(tmp_path):
    path = tmp_path / "M-IDoL.pth"
    path.write_bytes(b"not really")
    with pytest.raises(ModelNotFoundError, match="midol convert"):
        load_model(path)


def test_weights_that_do_not_match_the_config_list_the_keys(micro_dir, tmp_path):
    shutil.copy(micro_dir / "config.json", tmp_path / "config.json")
    state = load_file(micro_dir / "model.safetensors")
    state.pop("head.router.weight")
    state["head.extra"] = torch.zeros(1)
    state["head.fc1_bias"] = torch.zeros(5, 7)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightsMismatchError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert "missing: head.router.weight" in message
    assert "unexpected: head.extra" in message
    assert "head.fc1_bias: file (5, 7) vs config (5, 512)" in message


def test_truncated_weights_file_is_reported(micro_dir, tmp_path):
    shutil.copy(micro_dir / "config.json", tmp_path / "config.json")
    blob = (micro_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(WeightsMismatchError, match="not a readable safetensors file.*truncated"):
        load_model(tmp_path)


def test_bad_dtype_is_named(micro_dir):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(micro_dir, dtype="float8")


def test_transformers_auto_classes_round_trip(micro, micro_dir):
    assert AutoConfig.from_pretrained(micro_dir).model_type == "midol"
    auto = AutoModel.from_pretrained(micro_dir)
    assert isinstance(auto, MIDoLModel)
    assert_same_weights(micro, auto)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(micro(x).embedding, auto(x).embedding)


MEMORY_PROBE = """
import os, sys
import torch, midol_hub

def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size, so imports do not count
before = status_mb("VmRSS:")
model = midol_hub.load_model(sys.argv[1])
with torch.no_grad():
    model(torch.zeros(1, 3, 224, 224))  # touch every weight
peak = status_mb("VmHWM:")
print((peak - before) / (os.path.getsize(os.path.join(sys.argv[1], "model.safetensors")) / 2**20))
"""


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak memory added by load + one forward stays near one weights file (two copies would be >= 2)."""
    import subprocess
    import sys

    with pytest.warns(UserWarning):
        load_model("midol-swin-tiny", pretrained=False).save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ratio = float(result.stdout.strip().splitlines()[-1])
    assert ratio < 1.5, f"load_model added {ratio:.2f}x the weights file to peak memory"


def test_auto_precision_follows_native_bf16_and_slow_bf16_warns_once(monkeypatch, micro_dir):
    from midol_hub import dtypes

    monkeypatch.setattr(dtypes, "cpu_bf16_flags", lambda: ())  # an AVX2 CPU without native bf16
    dtypes._warn_slow_bf16.cache_clear()
    assert dtypes.parse_dtype("auto") == torch.float32 and dtypes.supported_precisions()["auto"] == "float32"
    with pytest.warns(UserWarning, match=r"no native bf16.*about 6x slower.*dtype='auto'") as caught:
        dtypes.parse_dtype("bf16")
        dtypes.parse_dtype(torch.bfloat16)
    assert len(caught) == 1  # once per process
    assert next(load_model(micro_dir, dtype="auto").parameters()).dtype == torch.float32
    monkeypatch.setattr(dtypes, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dtypes.parse_dtype("auto") == torch.bfloat16 and dtypes.parse_dtype("bf16") == torch.bfloat16
    model = load_model(micro_dir, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.encode(torch.rand(3, 64, 64), dtype="auto").embedding.shape == (1, 256)  # its own precision
