"""Reading every input type and the modality profiles' arithmetic."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from midol_hub import ImageReadError, MIDoLInputWarning, get_transform, load_model
from midol_hub.image_io import JPEG_OVERSAMPLE, read_file, unit_pixels
from midol_hub.modalities import IMAGENET_MEAN, IMAGENET_STD, ModalityProfile
from midol_hub.preprocessing import Preprocessor
from training.shared_data import fullres_parts

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
UINT8_RESIZE_TOLERANCE = 1 / 255 + 1e-6
"""One grey level: torch's uint8 resize rounds its output (0.995 levels at most over the 93 8-bit
full-resolution test files, ``benchmarks.encode.measure_eight_bit``)."""


def unnormalise(batch: torch.Tensor) -> torch.Tensor:
    return batch * STD + MEAN


@pytest.fixture
def rgb(rng) -> np.ndarray:
    return rng.integers(0, 256, size=(40, 52, 3), dtype=np.uint8)


def test_every_input_type_gives_the_same_tensor(micro, rgb, tmp_path, no_warnings):
    paths = []
    for suffix in ("png", "bmp", "tif"):
        Image.fromarray(rgb).save(tmp_path / f"img.{suffix}")
        paths.append(tmp_path / f"img.{suffix}")
    inputs = [
        Image.fromarray(rgb),
        rgb,
        rgb.transpose(2, 0, 1).copy(),  # CHW numpy
        torch.from_numpy(rgb).permute(2, 0, 1),  # CHW uint8 tensor
        torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,  # CHW float tensor in [0, 1]
        rgb.astype(np.float32) / 255,
        str(paths[0]),
        *paths,
    ]
    batch = micro.preprocess(inputs, "dermoscopy")
    assert batch.shape == (len(inputs), 3, 64, 64)
    eight_bit = [row for row, item in zip(batch, inputs) if getattr(item, "dtype", None) not in (torch.float32, np.float32)]
    assert len(eight_bit) == len(inputs) - 2
    for row in eight_bit[1:]:  # resized in uint8 (see RawImage)
        torch.testing.assert_close(row, batch[0], rtol=0, atol=0)
    for row in (batch[4], batch[5]):  # floats: resized as floats, within a grey level
        assert 0 < (unnormalise(row) - unnormalise(batch[0])).abs().max() <= UINT8_RESIZE_TOLERANCE


def test_jpeg_is_close_to_the_lossless_original(micro, tmp_path, no_warnings):
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    Image.fromarray(gradient).save(tmp_path / "g.jpg", quality=95)
    batch = micro.preprocess([gradient, tmp_path / "g.jpg"], "oct")
    assert (unnormalise(batch[0]) - unnormalise(batch[1])).abs().mean() < 0.01


@pytest.mark.parametrize("name", ["midol-micro", "midol-lite"])
def test_large_jpegs_are_decoded_smaller_and_embed_as_in_full(name, data_root):
    """A JPEG file is decoded at the DCT scale its model's input allows (``JPEG_OVERSAMPLE``); on
    real held-out full-resolution files the embedding stays that of the full decode (at twice the
    input side, one ISIC photo's ImageNet feature moved by 0.02). Read from the file, the uint8
    resize (see ``RawImage``) moves it a little more: at most one grey level moved the ImageNet
    start's features of one ISIC photo by a cosine of 0.003. The shipped weights, not random
    ones: a random head's draw moved the file-read embedding's cosine between 0.9949 and 0.9965."""
    model = load_model(name)
    size, parts = model.config.img_size, fullres_parts(data_root, "test")
    fundus = Path(parts["fundus"][0])
    full, reduced = read_file(fundus).pixels, read_file(fundus, input_size=size).pixels
    assert full.shape[:2] == (2848, 3409)
    assert min(reduced.shape[:2]) >= JPEG_OVERSAMPLE * size and reduced.shape[0] * 4 <= full.shape[0]
    for modality, files in (("fundus", parts["fundus"][:3]), ("dermoscopy", parts["dermoscopy"]), ("oct", parts["oct"][:8])):
        from_files = model.encode(files, modality=modality, output=("embedding", "pooled"))
        reduced = model.encode([unit_pixels(read_file(Path(f), input_size=size).pixels) for f in files],
                               modality=modality, output=("embedding", "pooled"))
        decoded_in_full = model.encode([read_file(Path(f)).pixels for f in files], modality=modality,
                                       output=("embedding", "pooled"))
        for output in ("embedding", "pooled"):
            def cosine(a, b):
                return float(torch.nn.functional.cosine_similarity(getattr(a, output), getattr(b, output)).min())
            assert cosine(reduced, decoded_in_full) > 0.999, (modality, output, cosine(reduced, decoded_in_full))
            assert cosine(from_files, decoded_in_full) > 0.995, (modality, output, cosine(from_files, decoded_in_full))


def test_resize_is_torchs_antialiased_bilinear_of_the_square(data_root):
    """Squares are resized channels-last (no strided copy of a full-resolution image), with the
    numbers of the plain (B, C, H, W) resize, alone or batched with images of the same shape; an
    8-bit colour file read for the model is resized in uint8, then scaled (see ``RawImage``)."""
    path = fullres_parts(data_root, "test")["dermoscopy"][0]
    pixels = read_file(path, input_size=224).pixels
    assert pixels.dtype == np.uint8 and read_file(path).pixels.dtype == np.float32
    profile = ModalityProfile(size=224, resize="crop")
    side = min(pixels.shape[:2])
    top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
    square = torch.from_numpy(pixels[top : top + side, left : left + side].copy()).permute(2, 0, 1)[None].contiguous()
    expected = torch.nn.functional.interpolate(square, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    expected = (expected / 255 - torch.tensor(profile.mean).view(1, 3, 1, 1)) / torch.tensor(profile.std).view(1, 3, 1, 1)
    alone = Preprocessor(profile).batch(path)
    as_floats = Preprocessor(profile).batch(unit_pixels(pixels))
    batched = Preprocessor(profile).batch([pixels[::-1].copy(), path, pixels[:, ::-1].copy()])
    assert side > 224 and alone.shape == (1, 3, 224, 224)
    torch.testing.assert_close(alone, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched[1:2], alone, rtol=0, atol=0)
    # the float path of the same pixels: at most one grey level apart, and not identical
    difference = (unnormalise(alone[0]) - unnormalise(as_floats[0])).abs()
    assert 0 < difference.max() <= UINT8_RESIZE_TOLERANCE, float(difference.max())


@pytest.mark.parametrize("profile", [ModalityProfile(size=64, resize="crop", crop_border=True),
                                     ModalityProfile(size=64, resize="whole", channels="gray")])
def test_eight_bit_files_preprocess_as_their_float_pixels(profile, data_root):
    """The uint8 path keeps every step of the float one: the fundus border found at the same
    threshold, luminance for grey profiles; real full-resolution fundus files, within a grey level."""
    files = fullres_parts(data_root, "test")["fundus"][:3]
    from_files = Preprocessor(profile).batch(files)
    as_floats = Preprocessor(profile).batch([unit_pixels(read_file(Path(f), input_size=64).pixels) for f in files])
    assert (unnormalise(from_files) - unnormalise(as_floats)).abs().max() <= UINT8_RESIZE_TOLERANCE


def test_sixteen_bit_png_uses_the_images_own_range(micro, tmp_path, no_warnings):
    ramp = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    raw = read_file(tmp_path / "ramp16.png")
    assert raw.pixels.min() == 0.0 and raw.pixels.max() == 1.0
    eight_bit = np.round((ramp - 1000) / 4000 * 255).astype(np.uint8)
    batch = micro.preprocess([tmp_path / "ramp16.png", ramp, eight_bit], "xray")
    torch.testing.assert_close(batch[0], batch[1])
    assert (unnormalise(batch[0]) - unnormalise(batch[2])).abs().max() < 1 / 255 + 1e-6


def test_exif_orientation_is_honoured(tmp_path):
    tall = np.zeros((60, 30, 3), dtype=np.uint8)
    tall[:10] = 255  # white band at the top
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers rotate 90 degrees clockwise
    Image.fromarray(tall).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    pixels = read_file(tmp_path / "rotated.jpg").pixels
    assert pixels.shape[:2] == (30, 60)
    assert pixels[:, -10:].mean() > 0.9 and pixels[:, :45].mean() < 0.1  # the band is now on the right


def test_gray_modalities_use_luminance_replicated_to_three_channels(micro, rgb):
    batch = unnormalise(micro.preprocess(rgb, "xray"))[0]
    torch.testing.assert_close(batch[0], batch[1])
    torch.testing.assert_close(batch[1], batch[2])
    color = unnormalise(micro.preprocess(rgb, "pathology"))[0]
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    whole = unnormalise(micro.preprocess(rgb, "auto"))[0]  # same geometry as xray: whole image
    luma_whole = 0.299 * whole[0] + 0.587 * whole[1] + 0.114 * whole[2]
    # auto resizes the 8-bit colour image in uint8 (see RawImage), xray its float luminance: within a grey level
    torch.testing.assert_close(batch[0], luma_whole, rtol=0, atol=UINT8_RESIZE_TOLERANCE)
    assert not torch.allclose(batch[0], luma)  # pathology crops, xray keeps the whole field


def test_crop_keeps_the_centre_and_whole_keeps_the_field():
    image = np.zeros((100, 200), dtype=np.uint8)
    image[:, :50] = 255  # left quarter white
    crop = unnormalise(Preprocessor(ModalityProfile(size=32, resize="crop")).batch(image))[0]
    whole = unnormalise(Preprocessor(ModalityProfile(size=32, resize="whole")).batch(image))[0]
    assert crop.abs().max() < 1e-5  # the centre 100x100 square is all black
    assert whole[:, :, :7].min() > 0.99 and whole[:, :, 9:].abs().max() < 1e-5
    assert 0.2 < whole.mean() < 0.3


def test_fundus_black_border_is_removed_before_resizing(micro, rng):
    disc = rng.integers(60, 256, size=(80, 80, 3), dtype=np.uint8)
    framed = np.zeros((100, 140, 3), dtype=np.uint8)
    framed[10:90, 30:110] = disc
    fundus = micro.preprocess(framed, "fundus")
    plain = micro.preprocess(disc, "dermoscopy")  # the disc alone, no border handling
    torch.testing.assert_close(fundus, plain)


def test_fundus_border_is_padded_to_a_square_not_cropped():
    wide = np.zeros((60, 100, 3), dtype=np.uint8)
    wide[:, 10:90] = 200  # bright region 60x80 touching top and bottom
    out = unnormalise(Preprocessor(ModalityProfile(size=80, crop_border=True)).batch(wide))[0]
    assert out[:, :9].abs().max() < 1e-5 and out[:, -9:].abs().max() < 1e-5  # black bands above and below
    assert (out[:, 20:60] - 200 / 255).abs().max() < 1e-4


def test_get_transform_matches_preprocess_and_pickles(micro, rgb):
    transform = get_transform(micro, "derm")
    restored = pickle.loads(pickle.dumps(transform))
    torch.testing.assert_close(restored(rgb), micro.preprocess(rgb, "dermoscopy")[0])
    by_name = get_transform("midol-micro", "dermoscopy")
    torch.testing.assert_close(by_name(rgb), transform(rgb))
    loader = torch.utils.data.DataLoader([rgb, rgb[:30]], batch_size=2, collate_fn=lambda xs: torch.stack([transform(x) for x in xs]))
    assert next(iter(loader)).shape == (2, 3, 64, 64)


def test_suspicious_values_warn_once_per_kind(micro):
    floats_0_255 = [np.full((64, 64), 200.0, dtype=np.float32) for _ in range(3)]
    with pytest.warns(MIDoLInputWarning) as record:
        micro.preprocess([*floats_0_255, np.ones((64, 64), dtype=np.uint8)], "oct")
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert any("expected [0, 1]" in m and "and 2 more" in m for m in messages)
    assert any("values only in 0..1" in m for m in messages)


def test_tiny_images_warn_about_upscaling(micro):
    with pytest.warns(MIDoLInputWarning, match=r"8x8 image is upscaled 8\.0x"):
        micro.preprocess(np.zeros((8, 8), dtype=np.uint8), "oct")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        micro.preprocess(np.zeros((28, 28), dtype=np.uint8), "oct")  # MedMNIST at 64 px: 2.3x is fine


@pytest.mark.parametrize(
    "item, message",
    [
        (np.zeros((0, 10), dtype=np.uint8), "image is empty"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "expected a 2-D .* got 4-D"),
        (np.zeros((10,), dtype=np.uint8), "got 1-D"),
        (np.zeros((8, 8, 5), dtype=np.uint8), "no channel axis of size 1, 3 or 4"),
        (np.full((8, 8), np.nan, dtype=np.float32), "NaN or Inf"),
        (torch.full((3, 8, 8), float("inf")), "NaN or Inf"),
        ({"not": "an image"}, "unsupported input type"),
    ],
)
def test_bad_arrays_are_named(micro, item, message):
    with pytest.raises(ImageReadError, match=r"input\[0\].*" + message):
        micro.preprocess([item], "oct")


def test_bad_files_are_named(micro, tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "full.png")
    blob = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    cases = {
        "notes.png": "not an image Pillow can read",
        "empty.png": "file is empty",
        "cut.png": "could not decode the image, the file may be truncated or corrupt",
        "missing.png": "no such file",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageReadError, match=rf"{name}: {reason}"):
            micro.preprocess(tmp_path / name, "oct")
    with pytest.raises(ImageReadError, match="is a directory"):
        micro.preprocess(tmp_path, "oct")


def test_empty_list_is_rejected(micro):
    with pytest.raises(ValueError, match="empty list of images; pass at least one image"):
        micro.preprocess([], "oct")

