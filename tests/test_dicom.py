"""DICOM input: modality LUT, VOI window, MONOCHROME1, compressed syntaxes and their errors."""

from __future__ import annotations

import sys

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from midol_hub import ImageReadError
from midol_hub.image_io import read_file


def minmax(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    return (array - array.min()) / (array.max() - array.min())


@pytest.fixture
def ct_path(data_root):
    return data_root / "other" / "pydicom_test_files" / "CT_small.dcm"


@pytest.fixture
def mr_path(data_root):
    return data_root / "other" / "pydicom_test_files" / "MR_small.dcm"


def test_ct_slice_gets_its_rescale_and_full_range(ct_path):
    ds = pydicom.dcmread(ct_path)
    pixels = read_file(ct_path).pixels
    assert pixels.shape == (128, 128, 1)
    np.testing.assert_allclose(pixels[:, :, 0], minmax(apply_modality_lut(ds.pixel_array, ds)), atol=1e-6)


def test_mr_slice_is_windowed_by_its_voi(mr_path):
    ds = pydicom.dcmread(mr_path)
    pixels = read_file(mr_path).pixels[:, :, 0]
    windowed = minmax(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds))
    np.testing.assert_allclose(pixels, windowed, atol=1e-6)
    # WindowCenter 600 / width 1600 clips the brightest tissue that plain min-max would keep
    assert (pixels >= 1 - 1e-6).mean() > (minmax(ds.pixel_array) >= 1 - 1e-6).mean()


def test_monochrome1_is_inverted(ct_path, tmp_path):
    ds = pydicom.dcmread(ct_path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    np.testing.assert_allclose(read_file(tmp_path / "inverted.dcm").pixels, 1 - read_file(ct_path).pixels, atol=1e-6)


def test_jpeg2000_compressed_dicom_decodes_like_the_original(ct_path, tmp_path):
    ds = pydicom.dcmread(ct_path)
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "j2k.dcm")
    assert pydicom.dcmread(tmp_path / "j2k.dcm").file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(read_file(tmp_path / "j2k.dcm").pixels, read_file(ct_path).pixels)


def test_dicom_without_a_suffix_is_recognised_by_its_preamble(ct_path, tmp_path):
    (tmp_path / "IM0001").write_bytes(ct_path.read_bytes())
    np.testing.assert_array_equal(read_file(tmp_path / "IM0001").pixels, read_file(ct_path).pixels)


def test_compressed_dicom_without_a_decoder_says_what_to_install(ct_path, tmp_path):
    ds = pydicom.dcmread(ct_path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # no JPEG-LS decoder is installed
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jpegls.dcm")
    with pytest.raises(ImageReadError, match=r"jpegls\.dcm: cannot decode compressed DICOM pixel data \(JPEG-LS"):
        read_file(tmp_path / "jpegls.dcm")


def test_dicom_without_pixel_data_is_named(ct_path, tmp_path):
    ds = pydicom.dcmread(ct_path)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(ImageReadError, match=r"nopixels\.dcm: DICOM file has no pixel data"):
        read_file(tmp_path / "nopixels.dcm")


def test_missing_pydicom_points_to_the_extra(ct_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"CT_small\.dcm.*pip install 'midol-hub\[dicom\]'"):
        read_file(ct_path)
