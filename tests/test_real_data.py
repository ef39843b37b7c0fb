"""Real images of all five modalities from $MIDOL_DATA (see its PROVENANCE.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from midol_hub.image_io import read_file
from midol_hub.preprocessing import _remove_black_border

REPO = Path(__file__).resolve().parents[1]

FILES = {
    "xray": ["xray/nih_chestxray14_examples/00000001_000.png", "xray/nih_chestxray14_examples/00027426_000.png"],
    "fundus": ["fundus/skimage_examples/retina.jpg", "fundus/skimage_examples/microaneurysms.png"],
    "oct": ["oct/kermany_oct2017_samples_b/test_cnv.jpeg", "oct/kermany_oct2017_samples_b/test_normal.jpeg",
            "oct/kermany_oct2017_samples_d/DME-7792808-22.jpeg"],
    "dermoscopy": ["dermoscopy/isic_uda1_fullres/ISIC_0000001.jpg", "dermoscopy/isic_uda1_250px/ISIC_0000150.jpg"],
    "pathology": ["pathology/crc_val_he_7k_examples/TUM-TCGA-AAHIDTWA.jpg",
                  "pathology/crc_val_he_7k_examples/STR-TCGA-AAMALCER.tif", "pathology/skimage_examples/ihc.png"],
}
NPZ = {
    "xray": "xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz",
    "fundus": "fundus/retinamnist/retinamnist.npz",
    "pathology": "pathology/bloodmnist/bloodmnist.npz",
}


@pytest.mark.parametrize("modality", sorted(FILES))
def test_real_files_encode_without_warnings(micro, data_root, modality, no_warnings):
    paths = [data_root / p for p in FILES[modality]]
    enc = micro.encode(paths, modality=modality, output=("embedding", "pooled"))
    assert enc.embedding.shape == (len(paths), 256)
    assert torch.isfinite(enc.pooled).all()
    torch.testing.assert_close(enc.embedding.norm(dim=-1), torch.ones(len(paths)))
    assert enc.modality == [modality] * len(paths)
    assert len({tuple(row.tolist()) for row in enc.pooled}) == len(paths)  # distinct images, distinct features


@pytest.mark.parametrize("modality", sorted(NPZ))
def test_medmnist_arrays_encode_without_warnings(micro, data_root, modality, no_warnings):
    with np.load(data_root / NPZ[modality]) as data:
        images = list(data["test_images"][:16])
    enc = micro.encode(images, modality=modality, batch_size=8)
    assert enc.embedding.shape == (16, 256)


def test_chest_xray_png_is_read_as_one_channel(data_root):
    pixels = read_file(data_root / FILES["xray"][0]).pixels
    assert pixels.shape == (512, 512, 1)
    expected = np.asarray(Image.open(data_root / FILES["xray"][0]).convert("L"), dtype=np.float32) / 255
    np.testing.assert_array_equal(pixels[:, :, 0], expected)


def test_fundus_photo_loses_its_black_frame(data_root):
    pixels = read_file(data_root / "fundus/skimage_examples/retina.jpg").pixels
    cropped = _remove_black_border(pixels, 0.04)
    assert cropped.shape[0] == cropped.shape[1] < pixels.shape[0]  # a tighter square around the disc
    assert pixels[:20, :20].max() < 0.1  # the corner of the original is black
