"""Regression tests for calls that used to return a plausible but wrong answer without a word:
numpy batches, shadowed local models, the feature-cache race, head-less conversions, encode
changing a shared model, and stale provenance. (DICOM cases live in test_dicom.py.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from midol_hub import (
    convert_checkpoint,
    extract_features,
    load_model,
)
from midol_hub.features import weights_fingerprint
from training import shared_data

from .helpers import make_micro, microsoft_backbone, prefixed, tutel_state

REPO = Path(__file__).resolve().parents[1]


# 1. numpy batches are read by their layout ------------------------------------------------------


def test_medmnist_stacks_and_batches_give_one_row_per_image(micro, rng):
    gray = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)  # how MedMNIST stores grayscale sets
    colour = rng.integers(0, 256, size=(6, 28, 28, 3), dtype=np.uint8)  # and colour sets
    stacked = micro.encode(gray, modality="xray").embedding
    assert stacked.shape == (5, 256)
    torch.testing.assert_close(stacked, micro.encode(list(gray), modality="xray").embedding)
    batch = micro.encode(colour, modality="pathology").embedding
    assert batch.shape == (6, 256)
    torch.testing.assert_close(batch, micro.encode(list(colour), modality="pathology").embedding)
    channels_first = micro.encode(colour.transpose(0, 3, 1, 2), modality="pathology").embedding
    torch.testing.assert_close(channels_first, batch)


def test_channels_first_argument_settles_the_layout(micro, rng):
    image = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    one = micro.encode(image, modality="fundus", channels_first=True).embedding
    assert one.shape == (1, 256)
    torch.testing.assert_close(one, micro.encode(image.transpose(1, 2, 0), modality="fundus").embedding)
    assert micro.preprocess(image, "fundus", channels_first=True).shape == (1, 3, 64, 64)
    assert micro.preprocess(image.transpose(1, 2, 0)[None].repeat(2, 0), "fundus").shape == (2, 3, 64, 64)


# 2. a local directory beats a registry name of the same spelling ----------------------------------


def test_local_directory_named_like_a_registry_model_is_loaded(tmp_path, monkeypatch):
    tuned = make_micro(seed=7)
    tuned.save_pretrained(tmp_path / "midol-micro")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"'midol-micro' is both a local path .*and a registry model; loading the local"):
        loaded = load_model("midol-micro")
    assert loaded.provenance.source == "local"
    torch.testing.assert_close(loaded.head.router.weight, tuned.head.router.weight)


# 3. the feature cache under two processes ---------------------------------------------------------

CACHE_WORKER = """
import sys, time, warnings
from pathlib import Path
import numpy as np
warnings.simplefilter("ignore")
from midol_hub import extract_features, load_model

model_dir, cache, go, count = sys.argv[1:5]
model = load_model(model_dir)
encode = model.encode
def counted(*args, **kwargs):
    with open(count, "a") as handle:
        handle.write("x")
    return encode(*args, **kwargs)
model.encode = counted
while not Path(go).exists():
    time.sleep(0.01)
digests = []
for key in range(4):  # each key takes the two processes about as long: they reach it together
    images = list(np.random.default_rng(key).integers(0, 256, size=(48, 32, 32), dtype=np.uint8))
    digests.append(extract_features(model, images, "oct", cache_dir=cache).numpy().tobytes().hex()[:64])
print(" ".join(digests))
"""


def test_two_processes_share_the_feature_cache_without_collisions(micro_dir, tmp_path):
    cache, go, count = tmp_path / "cache", tmp_path / "go", tmp_path / "count"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-c", CACHE_WORKER, str(micro_dir), str(cache), str(go), str(count)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
               for _ in range(2)]
    go.touch()
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), [err[-2000:] for _, err in outputs]
    first, second = (out.split() for out, _ in outputs)
    assert first == second and len(first) == 4
    assert len(count.read_text()) == 4  # each key encoded by one process only, the other read its file
    assert len(list(cache.glob("*.safetensors"))) == 4 and not list(cache.glob("*.tmp"))


# 4. conversion never saves random experts without being asked ---------------------------------------


@pytest.mark.parametrize(
    "head",
    [{}, tutel_state(1, local_experts=2), {"mlp.0.weight": torch.zeros(8, 256), "mlp.0.bias": torch.zeros(8),
                                           "last_layer.weight_g": torch.ones(16, 1), "last_layer.weight_v": torch.zeros(16, 256)}],
    ids=["no head", "per-rank head", "plain DINO head"],
)
def test_checkpoint_without_a_complete_head_converts_backbone_only(tmp_path, head):
    """Refused without backbone_only=True (the messages are asserted in test_bad_inputs); with it, pooled features."""
    torch.save({**prefixed("backbone.", microsoft_backbone(0)), **prefixed("head.", head)}, tmp_path / "ckpt.pth")
    model = convert_checkpoint(tmp_path / "ckpt.pth", tmp_path / "out", backbone_only=True)
    assert model.config.backbone_only and model.config.default_output == ["pooled"]
    loaded = load_model(tmp_path / "out")
    enc = loaded.encode(torch.rand(3, 64, 64))
    assert enc.pooled.shape == (1, 256) and enc.modality == ["unknown"] and torch.isnan(enc.routing).all()


# 6. encode leaves the caller's model as it found it -------------------------------------------------


def test_encode_does_not_move_the_model(micro):
    with pytest.raises(ValueError):  # the message is asserted in test_bad_inputs
        micro.encode(torch.rand(3, 64, 64), device="cuda")
    assert next(micro.parameters()).device.type == "cpu"


def test_a_low_precision_model_encodes_in_its_own_precision(micro_dir):
    model = load_model(micro_dir, dtype="bf16")
    assert model.encode(torch.rand(3, 64, 64), dtype="bf16").embedding.shape == (1, 256)


def test_train_mode_warns_once():
    model = make_micro(seed=3).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.encode(torch.rand(3, 64, 64))
        model.encode(torch.rand(3, 64, 64))
    assert [str(w.message) for w in caught if "training mode" in str(w.message)] == [
        "the model is in training mode (stochastic depth and gate noise are on), so embeddings vary from call to call; "
        "call model.eval() before encoding"
    ]
    assert model.training  # still the caller's choice


# 7. provenance is taken at load time and follows the weights ---------------------------------------


def test_provenance_is_hashed_at_load_time(micro_dir, tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((micro_dir / name).read_bytes())
    original = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    model = load_model(directory)
    other = make_micro(seed=9)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, directory / "model.safetensors")
    (directory / "model.safetensors").unlink()  # replaced, then evicted: the hash stays the loaded file's
    enc = model.encode(torch.rand(3, 64, 64))
    assert enc.provenance["weights_sha256"] == original and enc.provenance["source"] == "local"


def test_changed_weights_turn_the_provenance_modified_and_refresh_the_feature_cache(micro_dir, tmp_path):
    model = load_model(micro_dir)
    images = [np.full((32, 32), v, dtype=np.uint8) for v in (10, 200)]
    before = extract_features(model, images, "oct", cache_dir=tmp_path)
    fingerprint = weights_fingerprint(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(2, 3, 64, 64)).embedding.sum().backward()
    optimizer.step()  # fine-tuned in place
    assert model.provenance.source == "modified" and model.provenance.weights_sha256 is None
    assert model.provenance.derived_from.startswith(f"local:{micro_dir}@")
    assert weights_fingerprint(model) != fingerprint
    after = extract_features(model, images, "oct", cache_dir=tmp_path)
    torch.testing.assert_close(after, model.encode(images, modality="oct").embedding)
    assert (after - before).abs().max() > 1e-4  # not the stale cached features
    reloaded = load_model(micro_dir)
    reloaded.load_state_dict(make_micro(seed=4).state_dict())
    assert reloaded.provenance.source == "modified"


def test_a_recalibrated_model_refreshes_the_feature_cache(tmp_path, data_root):
    """Which expert serves a modality (and which modality ``auto`` names) comes from the
    calibration, so the feature cache is keyed by it too: after recalibration, no stale rows."""
    model = load_model("midol-micro")
    images = [items[0] for items in shared_data.labelled_splits(data_root, "test").values()]
    assert "unknown" not in model.encode(images, modality="auto").modality  # each is embedded by its expert
    before = {m: extract_features(model, images, m, cache_dir=tmp_path) for m in ("auto", "oct")}
    model.config.expert_modalities = model.config.expert_modalities[1:] + model.config.expert_modalities[:1]
    for modality, old in before.items():
        new = extract_features(model, images, modality, cache_dir=tmp_path)
        torch.testing.assert_close(new, model.encode(images, modality=modality).embedding)
        assert (new - old).abs().max() > 1e-3  # the experts' modalities moved: other subspaces, not the cache
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_transformers_auto_model_gets_the_same_provenance(micro_dir):
    from transformers import AutoModel

    auto, direct = AutoModel.from_pretrained(micro_dir), load_model(micro_dir)
    assert auto.provenance == direct.provenance and auto.provenance.weights_sha256
    assert not auto.training and next(auto.parameters()).dtype == torch.float32
    stored = load_file(micro_dir / "model.safetensors")
    torch.testing.assert_close(auto.head.router.weight, stored["head.router.weight"].float())
