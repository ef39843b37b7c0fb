"""The encode contract: shapes, batching, modality selection, outputs and errors."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from midol_hub import (
    ImageReadError,
    ModalityMismatchError,
    ModalityMismatchWarning,
    load_model,
    routing_map,
)
from training import shared_data

from .helpers import make_micro


@pytest.fixture
def images(rng) -> list[np.ndarray]:
    return [rng.integers(0, 256, size=(48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(5)]


def test_single_image_gives_a_batch_of_one(micro, images, no_warnings):
    enc = micro.encode(images[0], modality="oct")
    assert enc.embedding.shape == (1, 256)
    assert enc.routing.shape == (1, 5)
    assert enc.modality == ["oct"] and enc.indices == [0] and len(enc) == 1
    torch.testing.assert_close(enc.routing.sum(-1), torch.ones(1))
    torch.testing.assert_close(enc.embedding.norm(dim=-1), torch.ones(1))


def test_batching_does_not_change_results(micro, images):
    together = micro.encode(images, modality="pathology", batch_size=32).embedding
    chunked = micro.encode(images, modality="pathology", batch_size=2).embedding
    one_by_one = torch.cat([micro.encode(image, modality="pathology").embedding for image in images])
    assert (together - chunked).abs().max() < 1e-5
    assert (together - one_by_one).abs().max() < 1e-5


def test_forced_modality_reads_that_experts_subspace(micro, images):
    enc = micro.encode(images[:2], modality="derm", output=("embedding", "pooled"))
    expected = F.normalize(micro.head.expert_outputs(enc.pooled)[:, 3], dim=-1)
    torch.testing.assert_close(enc.embedding, expected, rtol=1e-5, atol=1e-5)
    assert enc.modality == ["dermoscopy", "dermoscopy"]
    assert enc.experts == ("xray", "fundus", "oct", "dermoscopy", "pathology")
    torch.testing.assert_close(enc.confidence, enc.routing[:, 3])


def test_auto_uses_the_routers_choice(micro, images):
    enc = micro.encode(images, modality="auto", output=("embedding", "pooled"))
    chosen = enc.routing.argmax(-1)
    assert enc.modality == [enc.experts[i] for i in chosen]
    expected = F.normalize(micro.head.expert_outputs(enc.pooled)[torch.arange(5), chosen], dim=-1)
    torch.testing.assert_close(enc.embedding, expected, rtol=1e-5, atol=1e-5)


def test_unnormalised_embeddings_on_request(micro, images):
    raw = micro.encode(images[0], modality="oct", normalize=False).embedding
    unit = micro.encode(images[0], modality="oct").embedding
    assert abs(float(raw.norm()) - 1) > 1e-3
    torch.testing.assert_close(F.normalize(raw, dim=-1), unit)


def test_dense_outputs_and_unrequested_ones(micro, images):
    enc = micro.encode(images[:3], modality="xray", output=("patch_tokens", "pyramid"))
    assert enc.patch_tokens.shape == (3, 256, 4, 4)
    assert [tuple(s.shape) for s in enc.pyramid] == [(3, 32, 32, 32), (3, 64, 16, 16), (3, 128, 8, 8), (3, 256, 4, 4)]
    with pytest.raises(AttributeError, match=r"'embedding' was not requested; call encode\(\.\.\., output=\("):
        enc.embedding
    with pytest.raises(ValueError, match="unknown output"):
        micro.encode(images[0], modality="xray", output="logits")


def test_preprocessed_tensors_go_straight_to_the_network(micro, images):
    batch = micro.preprocess(images[:2], "fundus")
    direct = micro.encode(batch, modality="fundus", preprocessed=True).embedding
    via_files = micro.encode(images[:2], modality="fundus").embedding
    torch.testing.assert_close(direct, via_files)
    with torch.no_grad():
        reference = F.normalize(micro(batch, expert_index=torch.tensor([1, 1])).embedding, dim=-1)
    torch.testing.assert_close(direct, reference)
    with pytest.raises(ImageReadError, match=r"must have shape \(B, 3, 64, 64\)"):
        micro.encode(torch.zeros(1, 3, 32, 32), modality="fundus", preprocessed=True)
    with pytest.raises(ImageReadError, match="NaN or Inf"):
        micro.encode(torch.full((3, 64, 64), float("nan")), modality="fundus", preprocessed=True)


def test_batched_tensor_input_is_split_into_images(micro, images):
    tensors = torch.stack([torch.from_numpy(im[:48]).permute(2, 0, 1) for im in images])
    enc = micro.encode(tensors, modality="oct")
    assert enc.embedding.shape == (5, 256)


def test_mixed_list_of_input_types(micro, images, tmp_path):
    Image.fromarray(images[1]).save(tmp_path / "b.png")
    mixed = [images[0], str(tmp_path / "b.png"), Image.fromarray(images[2]), torch.from_numpy(images[3]).permute(2, 0, 1)]
    enc = micro.encode(mixed, modality="pathology")
    separate = micro.encode(images[:4], modality="pathology")
    torch.testing.assert_close(enc.embedding, separate.embedding, rtol=1e-5, atol=1e-5)


def test_errors_raise_names_the_bad_file(micro, images, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 nonsense")
    with pytest.raises(ImageReadError, match=r"broken\.jpg"):
        micro.encode([images[0], tmp_path / "broken.jpg"], modality="oct")


def test_errors_skip_returns_the_rest_and_reports(micro, images, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 nonsense")
    inputs = [images[0], tmp_path / "broken.jpg", images[1], np.zeros((0, 5)), images[2]]
    with pytest.warns(UserWarning, match=r"skipped 2 of 5 input\(s\)"):
        enc = micro.encode(inputs, modality="oct", batch_size=2, errors="skip")
    assert enc.indices == [0, 2, 4]
    assert [(f.index, f.source.endswith("broken.jpg")) for f in enc.failures] == [(1, True), (3, False)]
    reference = micro.encode([images[0], images[1], images[2]], modality="oct").embedding
    torch.testing.assert_close(enc.embedding, reference, rtol=1e-5, atol=1e-5)


def test_everything_skipped_gives_empty_results(micro, tmp_path):
    with pytest.warns(UserWarning, match="skipped 1 of 1"):
        enc = micro.encode([tmp_path / "absent.png"], modality="oct", errors="skip")
    assert enc.embedding.shape == (0, 256) and enc.routing.shape == (0, 5) and enc.modality == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(modality="mri"), ValueError, "unknown modality 'mri'"),
        (dict(modality="oct", errors="ignore"), ValueError, "errors must be 'raise' or 'skip'"),
        (dict(modality="oct", batch_size=0), ValueError, "batch_size must be a positive integer"),
    ],
)
def test_bad_arguments_are_named(micro, images, kwargs, error, message):
    with pytest.raises(error, match=message):
        micro.encode(images[0], **kwargs)


def test_empty_list_is_rejected(micro):
    with pytest.raises(ValueError, match="empty list"):
        micro.encode([], modality="oct")


def calibrated_micro_routing_everything_to(expert: int):
    """A micro model whose router always picks ``expert``, marked as calibrated."""
    model = make_micro(3, modality_calibration={"accuracy": {"oct": 0.95}, "macro_accuracy": 0.95})
    with torch.no_grad():
        model.head.router.weight.zero_()
        model.backbone.norm.bias.fill_(1.0)  # pooled features then have a positive mean
        model.head.router.weight[expert] = 1.0
    return model


def test_mismatch_guard_warns_or_raises_when_calibrated(images):
    model = calibrated_micro_routing_everything_to(0)  # everything looks like X-ray
    with pytest.warns(ModalityMismatchWarning, match=r"2 image\(s\) encoded as 'oct' look like another modality.*'xray'"):
        model.encode(images[:2], modality="oct")
    with pytest.raises(ModalityMismatchError, match="encoded as 'oct'"):
        model.encode(images[:2], modality="oct", strict_modality=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.encode(images[:2], modality="xray", strict_modality=True)  # agrees with the router
        make_micro(3).encode(images[:2], modality="oct", strict_modality=True)  # uncalibrated: no guard


def test_bf16_autocast_stays_close_to_fp32(micro, images):
    fp32 = micro.encode(images, modality="oct").embedding
    bf16 = micro.encode(images, modality="oct", dtype="bf16").embedding
    assert bf16.dtype == torch.float32
    assert F.cosine_similarity(fp32, bf16).min() > 0.99


def test_encoding_carries_provenance(micro_dir, images):
    model = load_model(micro_dir)
    enc = model.encode(images[0], modality="oct")
    assert enc.provenance["source"] == "local" and enc.provenance["location"] == str(micro_dir)
    # the hashes of what is on disk, computed independently of the loader
    assert enc.provenance["weights_sha256"] == hashlib.sha256((micro_dir / "model.safetensors").read_bytes()).hexdigest()
    profiles = json.loads((micro_dir / "config.json").read_text())["preprocessing"]
    canonical = json.dumps(profiles, sort_keys=True, separators=(",", ":")).encode()
    assert enc.provenance["preprocessing_sha256"] == hashlib.sha256(canonical).hexdigest()


def test_same_input_gives_bitwise_identical_embeddings_on_cpu(micro, images):
    a = micro.encode(images, modality="oct").embedding
    b = micro.encode(images, modality="oct").embedding
    assert torch.equal(a, b)


def test_routing_maps_average_exactly_to_the_routing_logits_on_real_images(data_root):
    model = load_model("midol-micro")
    full = shared_data.fullres_parts(data_root, "test")
    files = [full[m][i] for m in ("xray", "fundus", "oct", "dermoscopy", "pathology") for i in range(min(2, len(full[m])))]
    maps = routing_map(model, files)
    assert maps.shape == (len(files), 5, 4, 4)  # 64 px with patch 2: a 4 x 4 final-stage token grid
    logits = model(model.preprocess(files, "auto")).routing_logits
    torch.testing.assert_close(maps.mean(dim=(2, 3)), logits, atol=1e-5, rtol=0)
    assert (maps.flatten(2).std(dim=-1) > 0).any()  # a map, not a constant: the patches disagree
