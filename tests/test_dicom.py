"""DICOM input: modality LUT, VOI window, MONOCHROME1, compressed syntaxes and their errors."""

from __future__ import annotations

import sys

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000MC, JPEG2000Lossless, JPEGLSLossless

from midol_hub import ImageReadError, image_io
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


def dicom_linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 'LINEAR' window, written out, with output in [0, 1]."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def test_mr_slice_is_windowed_by_its_voi(mr_path):
    ds = pydicom.dcmread(mr_path)
    pixels = read_file(mr_path).pixels[:, :, 0]
    expected = dicom_linear_window(apply_modality_lut(ds.pixel_array, ds).astype(np.float64), 600, 1600)
    np.testing.assert_allclose(pixels, expected, atol=1e-4)
    # the window maps to the display range as a viewer shows it: no per-image stretch
    assert pixels.min() > 0.2 and pixels.max() == pytest.approx(1.0)
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


def garbled(ct_path, tmp_path, syntax) -> str:
    ds = pydicom.dcmread(ct_path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "compressed.dcm")
    return tmp_path / "compressed.dcm"


def test_compressed_dicom_errors_tell_a_missing_decoder_from_damaged_data(ct_path, tmp_path, monkeypatch):
    path = garbled(ct_path, tmp_path, JPEGLSLossless)
    # the dicom extra decodes JPEG-LS, so these bytes are damaged data, not a missing decoder
    with pytest.raises(ImageReadError, match=r"compressed\.dcm: DICOM pixel data is damaged or truncated"):
        read_file(path)
    monkeypatch.setattr(image_io, "_decoder_state", lambda syntax: "missing")
    with pytest.raises(ImageReadError, match=r"cannot decode compressed DICOM pixel data \(JPEG-LS.*pip install"):
        read_file(path)


def test_compressed_dicom_no_plugin_decodes_is_named(ct_path, tmp_path):
    with pytest.raises(ImageReadError, match=r"JPEG 2000 Part 2.*pydicom has no decoder for it"):
        read_file(garbled(ct_path, tmp_path, JPEG2000MC))


def test_truncated_uncompressed_dicom_is_damaged_not_missing_a_decoder(ct_path, tmp_path):
    ds = pydicom.dcmread(ct_path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(tmp_path / "half.dcm")
    with pytest.raises(ImageReadError, match=r"half\.dcm: DICOM pixel data is damaged or truncated") as error:
        read_file(tmp_path / "half.dcm")
    assert "pip install" not in str(error.value)


def test_sixteen_bit_colour_dicom_is_scaled_by_bits_stored(ct_path, tmp_path):
    ds = pydicom.dcmread(ct_path)
    rgb = np.stack([np.full((8, 8), v, dtype=np.uint16) for v in (0, 2048, 4095)], axis=-1)  # 12 bits stored
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 8, 3, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration = 16, 12, 11, 0, 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "rgb16.dcm")
    pixels = read_file(tmp_path / "rgb16.dcm").pixels
    np.testing.assert_allclose(pixels[0, 0], [0.0, 2048 / 4095, 1.0], atol=1e-6)  # a uint8 cast would wrap 2048 to 0


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
