"""ONNX export: the exported shipped model reproduces ``encode`` under onnxruntime on real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from midol_hub import OnnxEncoder, export_onnx, load_model
from midol_hub.cli import main
from midol_hub.deploy import sidecar_path
from midol_hub.utils import image_files

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def shipped():
    return load_model("midol-micro")


@pytest.fixture(scope="module")
def exported(shipped, tmp_path_factory):
    return export_onnx(shipped, tmp_path_factory.mktemp("onnx") / "midol-micro.onnx")


@pytest.fixture(scope="module")
def real_images(data_root):
    """Two files of each modality at full size, out-of-scope photos and a CT DICOM file."""
    folders = ["xray/nih_chestxray14_examples", "fundus/idrid_segmentation_train_cropped",
               "oct/kermany_oct2017_samples", "dermoscopy/isic_uda1_fullres", "pathology/crc_val_he_7k_examples",
               "pathology/openslide_os2_ki67_ihc_crops", "other/skimage_natural_photos"]
    files = [str(path) for folder in folders for path in image_files(data_root / folder)[:2]]
    return files + [str(data_root / "other/pydicom_test_files/CT_small.dcm")]


def test_encoder_reproduces_encode_on_real_images(shipped, exported, real_images):
    outputs = ("embedding", "pooled", "stage_pooled")
    want = shipped.encode(real_images, output=outputs, normalize=False, batch_size=5)
    got = OnnxEncoder(exported).encode(real_images, output=outputs, normalize=False, batch_size=5)
    for name in outputs:
        assert float((getattr(got, name) - getattr(want, name)).abs().max()) < TOLERANCE, name
    assert got.modality == want.modality
    assert got.modality_source == want.modality_source and "dicom" in got.modality_source
    assert got.unknown_reason == want.unknown_reason and "unknown" in got.modality
    assert torch.equal(got.expert_index, want.expert_index)
    assert float((got.confidence - want.confidence).abs().max()) < TOLERANCE
    assert float((got.routing - want.routing).abs().max()) < TOLERANCE
    assert got.provenance == want.provenance and got.provenance["weights_sha256"]


def test_graph_takes_a_dynamic_batch_of_1_and_7(shipped, exported, data_root):
    encoder = OnnxEncoder(exported)
    files = image_files(data_root / "dermoscopy/isic_uda1_fullres")[:7]
    pixels = shipped.preprocess(files, "dermoscopy")
    with torch.inference_mode():
        want = shipped(pixels, output_pyramid=True)
    for rows in (slice(0, 1), slice(0, 7)):
        pooled, logits = encoder.session.run(["pooled", "routing_logits"], {"pixel_values": pixels[rows].numpy()})
        assert pooled.shape == (rows.stop, shipped.config.num_features)
        assert np.abs(pooled - want.pooled[rows].numpy()).max() < TOLERANCE
        assert np.abs(logits - want.routing_logits[rows].numpy()).max() < TOLERANCE


def test_export_leaves_the_model_as_it_was(shipped, exported):
    assert not shipped.training
    assert all(module.fused_attn for module in shipped.modules() if hasattr(module, "fused_attn"))
    meta = json.loads(sidecar_path(exported).read_text())
    assert meta["outputs"] == ["pooled", "routing_logits", "stage_pooled", "expert_embeddings"]
    assert meta["config"]["preprocessing"] == shipped.config.preprocessing
    assert meta["config"]["modality_calibration"] == shipped.config.modality_calibration


def test_cli_exports_one_modality_and_the_encoder_keeps_to_it(shipped, tmp_path, data_root, capsys):
    out = tmp_path / "oct.onnx"
    assert main(["export", "onnx", "midol-micro", str(out), "--modality", "OCT"]) == 0
    assert str(out) in capsys.readouterr().out
    files = image_files(data_root / "oct/kermany_oct2017_samples")[:3]
    encoder = OnnxEncoder(out)
    assert json.loads(sidecar_path(out).read_text())["outputs"][-1] == "embedding"
    got = encoder.encode(files, normalize=False)
    want = shipped.encode(files, modality="oct", normalize=False)
    assert float((got.embedding - want.embedding).abs().max()) < TOLERANCE
    assert got.modality == ["oct"] * 3 and got.modality_source == ["forced"] * 3
    with pytest.raises(ValueError, match="exported for modality 'oct' only"):
        encoder.encode(files, modality="fundus")


def test_bad_exports_and_requests_are_refused(exported, tmp_path, real_images, capsys):
    encoder = OnnxEncoder(exported)
    with pytest.raises(ValueError, match="patch_tokens"):
        encoder.encode(real_images[:1], output="patch_tokens")
    copied = tmp_path / "copy.onnx"
    copied.write_bytes(exported.read_bytes())
    with pytest.raises(FileNotFoundError, match="copy.midol.json"):
        OnnxEncoder(copied)
    sidecar_path(copied).write_text(sidecar_path(exported).read_text())
    copied.write_bytes(exported.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="not the one its sidecar"):
        OnnxEncoder(copied)
    assert main(["export", "onnx", "midol-micro", str(tmp_path / "model.bin")]) == 1
    assert "must end in .onnx" in capsys.readouterr().err
