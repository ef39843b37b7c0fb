"""Turn whatever the user passes (paths, PIL images, arrays, tensors) into pixel arrays.

Every reader returns a :class:`RawImage`: an (H, W, C) array plus a ``source`` string that
names the input in error messages. Intensities are scaled to [0, 1] here, because only the
reader knows what the numbers mean (8-bit, 16-bit, DICOM rescale and VOI LUT...).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError
from .utils import DICOM_SUFFIXES

Warn = Callable[[str, str], None]
"""``warn(kind, message)``: report a suspicious input once per kind."""


@dataclass
class RawImage:
    """Pixels as float32 (H, W, C) in [0, 1], C in {1, 2, 3, 4}, and where they came from.

    8-bit RGB read for a model (``input_size``: a file, DICOM, PIL image, array or tensor)
    keeps its uint8 (H, W, 3) pixels: preprocessing resizes them before scaling, in torch's
    vectorised uint8 resize, and so never makes a float copy of the decoded image. The model's
    input moves by one grey level at most from the float path's
    (``benchmarks.encode.measure_eight_bit``). Grey images stay float (torch's uint8 resize of
    one channel is the slower). :func:`unit_pixels` gives either form as floats.

    ``dicom_modality`` is the DICOM header's Modality (0008,0060) code, for DICOM files that
    state one; ``frame`` the frame or page read from a multi-frame file."""

    pixels: np.ndarray
    source: str
    dicom_modality: str | None = None
    frame: int | None = None


FRAME_HINT = "pass frames='all' (one row per frame), frames='middle' or a frame index"

JPEG_OVERSAMPLE = 3
"""A JPEG read for a model is decoded at the smallest of its DCT scales (1, 1/2, 1/4, 1/8) whose
sides stay at least this many times the model's input side (``input_size``), then resized as
any image: a 3,400 x 2,800 fundus photo for a 224 px input is decoded at 1/4, in a twelfth of
the time (its preprocessing then runs on a sixteenth of the pixels). Measured on the held-out
full-resolution fundus, dermoscopy and OCT JPEGs with midol-micro and ImageNet EfficientNet-Lite0:
no embedding moves by a cosine of more than 1e-3 (``tests/test_preprocessing.py``); at twice the
input side, scaled decoding's coarser colour moved one ISIC photo's ImageNet feature by 0.02."""


def unit_pixels(pixels: np.ndarray) -> np.ndarray:
    """A :class:`RawImage`'s pixels as float32 in [0, 1], whichever form it holds them in."""
    if pixels.dtype == np.uint8:
        unit = pixels.astype(np.float32)
        unit /= 255.0
        return unit
    return pixels


def multi_frame_message(count: int, dicom: bool) -> str:
    """Why a multi-frame input without ``frames=`` is refused, and what to pass."""
    what = f"multi-frame DICOM with {count} frames" if dicom else f"holds {count} frames (a multi-page or animated image)"
    return f"{what}; {FRAME_HINT}"


def is_dicom_file(item: Any) -> bool:
    """A path named .dcm / .dicom or with the DICM preamble (preamble-less DICOM is found when read)."""
    if not isinstance(item, (str, os.PathLike)):
        return False
    path = Path(item)
    return path.suffix.lower() in DICOM_SUFFIXES or (path.is_file() and path.stat().st_size > 132 and _has_dicom_preamble(path))


def frame_count(item: Any, source: str) -> int:
    """Frames (pages) of an input: a multi-frame DICOM's NumberOfFrames, a multi-page TIFF's or
    animated image's pages; 1 for everything else. Reads headers only."""
    if isinstance(item, Image.Image):
        return int(getattr(item, "n_frames", 1))
    if not isinstance(item, (str, os.PathLike)):
        return 1
    path = Path(item)
    if not path.is_file() or path.stat().st_size == 0 or path.suffix.lower() in (".jpg", ".jpeg", ".bmp"):
        return 1  # missing or empty files fail with their own message when read; these formats hold one image
    if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path):
        dataset = _dcmread(path, source, header_only=True)
        return int(getattr(dataset, "NumberOfFrames", 1) or 1)
    try:
        with Image.open(path) as image:
            return int(getattr(image, "n_frames", 1))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        dataset = _forced_dicom(path, source, header_only=True)
        return 1 if dataset is None else int(getattr(dataset, "NumberOfFrames", 1) or 1)


CHANNEL_AXIS_SIZES = (1, 2, 3, 4)  # gray, gray + alpha, RGB, RGBA
AMBIGUOUS_LEADING = (1, 3, 4)  # (C, H, W) images that a stack of C grayscale images looks like


def split_images(images: Any, channels_first: bool | None = None) -> list:
    """One list entry per image, whatever the user passed.

    Lists and tuples are taken as they are; a 4-D tensor is a (B, C, H, W) batch. Numpy
    arrays follow their layout: 2-D is one grayscale image; 4-D is a batch, (N, H, W, C) when
    the last axis has 1-4 channels, else (N, C, H, W); 3-D is one (H, W, C) image when the
    last axis has 1-4 channels, a stack of grayscale images (N, H, W) when the leading size
    is anything but 1, 3 or 4, and ambiguous otherwise: (3, H, W) is as much three grayscale
    images as one channels-first RGB image, so it raises and names both fixes.
    ``channels_first`` (numpy only) states the layout instead: True reads (C, H, W) and
    (N, C, H, W), False reads (H, W, C) and (N, H, W, C).
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("got an empty list of images; pass at least one image")
        return list(images)
    if isinstance(images, torch.Tensor):
        return list(images.unbind(0)) if images.ndim == 4 else [images]
    if isinstance(images, np.ndarray):
        return _split_array(images, channels_first)
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)) or not hasattr(images, "__iter__"):
        return [images]
    return split_images(list(images), channels_first)  # any other iterable of images


def _split_array(array: np.ndarray, channels_first: bool | None) -> list:
    shape = tuple(array.shape)
    if array.ndim == 4:
        if channels_first or (channels_first is None and shape[-1] not in CHANNEL_AXIS_SIZES and shape[1] in CHANNEL_AXIS_SIZES):
            return list(array.transpose(0, 2, 3, 1))
        if channels_first is None and shape[-1] not in CHANNEL_AXIS_SIZES:
            raise ImageReadError(
                "input", f"4-D array of shape {shape} has no channel axis of size 1-4; pass (N, H, W, C) or (N, C, H, W)"
            )
        return list(array)
    if array.ndim != 3 or channels_first is False:
        return [array]
    if channels_first:
        return [array.transpose(1, 2, 0)]
    if shape[-1] in CHANNEL_AXIS_SIZES:
        return [array]
    if shape[0] in AMBIGUOUS_LEADING:
        raise ImageReadError(
            "input",
            f"a numpy array of shape {shape} is either one channels-first image or a stack of {shape[0]} grayscale "
            f"images; pass list(x) for a stack of images, or x.transpose(1, 2, 0) (or channels_first=True) for one image",
        )
    return list(array)  # (N, H, W): a stack of grayscale images, as MedMNIST stores them


def describe(item: Any, index: int) -> str:
    """A short name for an input, used in every message about it."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return f"input[{index}] ({type(item).__module__.split('.')[0]}.{type(item).__name__})"


def read_any(item: Any, index: int, warn: Warn, frame: int | None = None, input_size: int | None = None) -> RawImage:
    """Read one user input of any supported type (``frame``: which frame of a multi-frame file
    or PIL image; a multi-frame input without one raises, naming ``frames=``; ``input_size``: the
    model's input side, for reduced-size JPEG decoding, see :data:`JPEG_OVERSAMPLE`)."""
    source = describe(item, index)
    if isinstance(item, (str, os.PathLike)):
        return read_file(Path(item), frame, input_size)
    if isinstance(item, Image.Image):
        return RawImage(_pil_to_unit(_pil_frame(item, source, frame), source, from_file=False, warn=warn,
                                     input_size=input_size), source, frame=frame)
    if isinstance(item, np.ndarray):
        return RawImage(_scaled(_hwc(item, source, channels_first=False), source, warn, input_size), source)
    if isinstance(item, torch.Tensor):
        array = item.detach().cpu()
        if array.dtype == torch.bfloat16 or array.dtype == torch.float16:
            array = array.float()
        return RawImage(_scaled(_hwc(array.numpy(), source, channels_first=True), source, warn, input_size), source)
    raise ImageReadError(
        source,
        "unsupported input type; pass a file path, PIL image, numpy array, torch tensor or a list of them",
    )


def read_file(path: Path, frame: int | None = None, input_size: int | None = None) -> RawImage:
    """Decode an image file (PNG, JPEG, TIFF, BMP, GIF, DICOM), honouring EXIF orientation.

    A multi-frame file needs ``frame`` (which frame or page to read); without it, it raises
    rather than decode the first page only. DICOM written without its 128-byte preamble is read
    when it parses as DICOM with pixel data. With ``input_size`` (the model's input side) a large
    JPEG is decoded at a reduced size (:data:`JPEG_OVERSAMPLE`); without it, in full."""
    return next(file_frames(path, frame, input_size=input_size))


def select_frames(count: int, frames: str | int | None, source: str, dicom: bool) -> list[int | None]:
    """Which frames of an input with ``count`` frames to read: ``None`` (a single-frame input
    only), ``"all"``, ``"middle"`` or a frame index; ``[None]`` for a single-frame input."""
    if isinstance(frames, int) and not isinstance(frames, bool) and not 0 <= frames < count:
        raise ImageReadError(source, f"has {count} frame(s); frame {frames} does not exist")
    if count == 1:
        return [None]
    if frames is None:
        raise ImageReadError(source, multi_frame_message(count, dicom))
    if frames == "all":
        return list(range(count))
    return [count // 2 if frames == "middle" else int(frames)]


def file_frames(path: Path | str, frames: str | int | None = None, data: bytes | None = None,
                input_size: int | None = None) -> Iterator[RawImage]:
    """The frames of one file that ``frames`` selects (see :func:`select_frames`), decoded in
    one pass: the file is opened once and its pages are read in order, so every frame costs the
    same at page 3,000 as at page 3. ``data``: the file's bytes, when the caller has read them
    already (a content hash then binds exactly the bytes decoded); ``path`` then only names
    them (it may be a DICOMweb instance URL). ``input_size``: see :func:`read_file`."""
    source = str(path)
    path = Path(source)
    if data is None:
        if not path.exists():
            raise ImageReadError(source, "no such file")
        if path.is_dir():
            raise ImageReadError(source, "is a directory; pass the image files inside it")
        if path.stat().st_size == 0:
            raise ImageReadError(source, "file is empty (0 bytes)")
    elif not data:
        raise ImageReadError(source, "file is empty (0 bytes)")

    def handle() -> Path | BinaryIO:
        return path if data is None else io.BytesIO(data)

    if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(handle()):
        yield from _dicom_frames(_dcmread(handle(), source), source, frames, input_size)
        return
    try:
        opened = _open_image(handle(), source)
    except ImageReadError as error:
        dataset = _forced_dicom(handle(), source) if "not an image Pillow can read" in error.reason else None
        if dataset is None:
            raise
        yield from _dicom_frames(dataset, source, frames, input_size)
        return
    with opened as image:
        selected = select_frames(int(getattr(image, "n_frames", 1)), frames, source, dicom=False)
        for frame in selected:  # ascending: each seek walks on from the page before
            yield RawImage(_decode_page(image, source, frame, input_size), source, frame=frame)


def decode_image(file: Path | BinaryIO, source: str, frame: int | None = None) -> RawImage:
    """Decode a PNG, JPEG, TIFF, BMP or GIF from a path or an open binary stream (a tar member, say)."""
    with _open_image(file, source) as image:
        select_frames(int(getattr(image, "n_frames", 1)), frame, source, dicom=False)
        return RawImage(_decode_page(image, source, frame), source, frame=frame)


def _open_image(file: Path | BinaryIO, source: str) -> Image.Image:
    try:
        return Image.open(file)
    except UnidentifiedImageError:
        raise ImageReadError(
            source, "not an image Pillow can read (supported: PNG, JPEG, TIFF, BMP, GIF; DICOM with midol-hub[dicom])"
        ) from None
    except Image.DecompressionBombError as error:
        raise ImageReadError(source, _bomb_message(error)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(source, f"could not decode the image, the file may be truncated or corrupt ({error})") from None


def _bomb_message(error: Exception) -> str:
    return (f"image is larger than Pillow's decompression-bomb limit ({error}); if you trust the file, "
            "raise PIL.Image.MAX_IMAGE_PIXELS before encoding")


def _decode_page(image: Image.Image, source: str, frame: int | None, input_size: int | None = None) -> np.ndarray:
    """One page of an open image file, EXIF orientation applied, as unit floats; a JPEG at the
    reduced size that ``input_size`` allows (:data:`JPEG_OVERSAMPLE`)."""
    try:
        if frame is not None:
            image.seek(frame)
        if input_size and image.format == "JPEG":
            side = JPEG_OVERSAMPLE * input_size
            image.draft(image.mode, (side, side))  # both sides stay >= side, whatever the orientation
        image.load()
        page = ImageOps.exif_transpose(image)
        return _pil_to_unit(page, source, from_file=True, warn=None, input_size=input_size)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageReadError(source, _bomb_message(error)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(source, f"could not decode the image, the file may be truncated or corrupt ({error})") from None


def _pil_frame(image: Image.Image, source: str, frame: int | None) -> Image.Image:
    """The requested page of a caller's PIL image (left on the page it was on)."""
    pages = int(getattr(image, "n_frames", 1))
    if frame is None:
        if pages > 1:
            raise ImageReadError(source, multi_frame_message(pages, dicom=False))
        return image
    if not 0 <= frame < pages:
        raise ImageReadError(source, f"has {pages} frame(s); frame {frame} does not exist")
    position = image.tell()
    image.seek(frame)
    page = image.copy()
    image.seek(position)
    return page


def _has_dicom_preamble(file: Path | BinaryIO) -> bool:
    if isinstance(file, Path):
        with open(file, "rb") as handle:
            return _has_dicom_preamble(handle)
    file.seek(128)
    found = file.read(4) == b"DICM"
    file.seek(0)
    return found


def _pil_to_unit(image: Image.Image, source: str, *, from_file: bool, warn: Warn | None,
                 input_size: int | None = None) -> np.ndarray:
    mode = image.mode
    if mode == "1":
        image = image.convert("L")
    elif mode in ("P", "PA"):
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.size == 0:
        raise ImageReadError(source, f"image is empty ({image.width}x{image.height} pixels)")
    if array.ndim == 2:
        array = array[:, :, None]
    if from_file and array.dtype != np.uint8:
        return _minmax(array)  # 16-bit and float files: use the image's own range
    return _scaled(array, source, warn, input_size)


def _scaled(array: np.ndarray, source: str, warn: Warn | None, input_size: int | None) -> np.ndarray:
    """:func:`array_to_unit`, except that 8-bit RGB read for a model stays uint8 (see :class:`RawImage`)."""
    if input_size and array.dtype == np.uint8 and array.shape[-1] == 3:
        _check_eight_bit(array, source, warn)
        return array if array.flags.writeable else array.copy()  # torch.from_numpy needs a writable array
    return array_to_unit(array, source, warn)


def _hwc(array: np.ndarray, source: str, *, channels_first: bool) -> np.ndarray:
    """Bring a 2-D or 3-D array to (H, W, C); tensors are CHW, numpy arrays HWC or CHW."""
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        channels_last = array.shape[-1] in (1, 2, 3, 4)
        channels_lead = array.shape[0] in (1, 2, 3, 4)
        if channels_first and channels_lead:
            array = array.transpose(1, 2, 0)
        elif not channels_first and not channels_last and channels_lead:
            array = array.transpose(1, 2, 0)
        elif not channels_last:
            layout = "(C, H, W)" if channels_first else "(H, W, C) or (C, H, W)"
            raise ImageReadError(
                source, f"shape {tuple(array.shape)} has no channel axis of size 1, 3 or 4; expected {layout}"
            )
    else:
        raise ImageReadError(
            source,
            f"expected a 2-D (H, W) or 3-D image, got {array.ndim}-D shape {tuple(array.shape)}; "
            "pass a batch as a list of images or a 4-D torch tensor (B, C, H, W)",
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(source, f"image is empty (shape {tuple(array.shape)})")
    return array


def array_to_unit(array: np.ndarray, source: str, warn: Warn | None) -> np.ndarray:
    """Scale an (H, W, C) array to float32 [0, 1] by its dtype's convention.

    uint8 is divided by 255; wider integers (12/16-bit scans) use the image's own min..max;
    floats are taken to be in [0, 1] already. Suspicious ranges are reported through ``warn``.
    """
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        _check_eight_bit(array, source, warn)
        unit = array.astype(np.float32)
        unit /= 255.0  # in place: one float copy of a full-resolution image, not two
        return unit
    if np.issubdtype(array.dtype, np.integer):
        return _minmax(array)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise ImageReadError(source, "contains NaN or Inf values; clean or mask them before encoding")
        low, high = float(array.min()), float(array.max())
        if warn is not None and (low < -1e-3 or high > 1 + 1e-3):
            warn(
                "float-range",
                f"{source}: float image with values in [{low:.3g}, {high:.3g}], expected [0, 1] "
                "(divide 0..255 data by 255; pass normalised tensors with preprocessed=True)",
            )
        return array
    raise ImageReadError(source, f"unsupported pixel dtype {array.dtype}")


def _check_eight_bit(array: np.ndarray, source: str, warn: Warn | None) -> None:
    if warn is not None and 0 < array.max() <= 1:
        warn("uint8-range", f"{source}: uint8 image with values only in 0..1 (a mask or pre-scaled image?)")


def _minmax(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros_like(array)
    return (array - low) / (high - low)


def _decoder_state(syntax: Any) -> str:
    """``"available"``, ``"missing"`` (a plugin would decode it) or ``"unsupported"`` (none would)."""
    from pydicom.pixels import get_decoder

    try:
        return "available" if get_decoder(syntax).is_available else "missing"
    except NotImplementedError:
        return "unsupported"


def _pydicom(source: str):
    try:
        import pydicom
    except ImportError:
        raise ImportError(f"{source} is a DICOM file; reading DICOM needs the dicom extra: pip install 'midol-hub[dicom]'") from None
    return pydicom


def _dcmread(path: Path | BinaryIO, source: str, header_only: bool = False) -> Any:
    """The dataset of a DICOM file (with its preamble, or named .dcm / .dicom)."""
    pydicom = _pydicom(source)
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except pydicom.errors.InvalidDicomError:
        dataset = _forced_dicom(path, source, header_only)
        if dataset is None:
            raise ImageReadError(source, "not a readable DICOM file (no DICOM header, even without a preamble)") from None
        return dataset
    except Exception as error:  # pydicom raises many types for broken files
        raise ImageReadError(source, f"not a readable DICOM file ({error})") from None


def _forced_dicom(path: Path | BinaryIO, source: str, header_only: bool = False) -> Any | None:
    """A file without the 128-byte preamble read as DICOM when it parses as DICOM with pixel data; else None."""
    if not isinstance(path, Path):
        path.seek(0)
    try:
        pydicom = _pydicom(source)
        dataset = pydicom.dcmread(path, force=True)
        if "PixelData" not in dataset or "Rows" not in dataset:
            return None
        if "TransferSyntaxUID" not in dataset.file_meta:  # written without a file meta group: the default syntax
            dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        return dataset
    except Exception:  # not DICOM at all: the caller reports the original error
        return None


def _dicom_frames(dataset: Any, source: str, frames: str | int | None,
                  input_size: int | None = None) -> Iterator[RawImage]:
    count = int(getattr(dataset, "NumberOfFrames", 1) or 1) if "PixelData" in dataset else 1
    for frame in select_frames(count, frames, source, dicom=True):
        yield _read_dicom(dataset, source, frame, input_size)


def _read_dicom(dataset: Any, source: str, frame: int | None = None, input_size: int | None = None) -> RawImage:
    """Read a DICOM image (one frame of a multi-frame file): modality LUT (rescale), VOI LUT or
    window, MONOCHROME1 inversion; the header's Modality code travels with the pixels. 8-bit
    colour read for a model (``input_size``) stays uint8, as from any other file (:class:`RawImage`).

    Colour data is scaled by its BitsStored range; windowed grayscale by the window's output
    range; grayscale without a window by its own minimum and maximum."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if "PixelData" not in dataset:
        raise ImageReadError(source, "DICOM file has no pixel data (a structured report or presentation state?)")
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frame is None and frames > 1:
        raise ImageReadError(source, multi_frame_message(frames, dicom=True))
    if frame is not None and not 0 <= frame < frames:
        raise ImageReadError(source, f"has {frames} frame(s); frame {frame} does not exist")
    code = str(getattr(dataset, "Modality", "") or "").strip().upper() or None
    try:
        if frames > 1:
            dataset.pixel_array_options(index=frame)  # decode this frame only
        pixels = dataset.pixel_array
    except Exception as error:
        syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None)
        decoder = _decoder_state(syntax) if syntax is not None and syntax.is_compressed else "available"
        if decoder == "unsupported":
            raise ImageReadError(
                source, f"cannot decode compressed DICOM pixel data ({syntax.name}): pydicom has no decoder for it; "
                "convert the file to an uncompressed or JPEG transfer syntax first"
            ) from None
        if decoder == "missing":
            raise ImageReadError(
                source,
                f"cannot decode compressed DICOM pixel data ({syntax.name}): no decoder for it is installed. "
                "Install the decoders with: pip install 'midol-hub[dicom]'",
            ) from None
        raise ImageReadError(source, f"DICOM pixel data is damaged or truncated and cannot be decoded ({error})") from None
    bits = int(getattr(dataset, "BitsStored", 8) or 8)
    if getattr(dataset, "PhotometricInterpretation", "") == "PALETTE COLOR":  # indices into a colour table
        entry_bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
        colour = apply_color_lut(pixels, dataset).astype(np.float32) / (2**entry_bits - 1)
        return RawImage(np.clip(colour, 0.0, 1.0), source, code, frame)
    if getattr(dataset, "SamplesPerPixel", 1) == 3 and bits == 8 and pixels.dtype == np.uint8:
        return RawImage(_scaled(np.ascontiguousarray(pixels[:, :, :3]), source, None, input_size), source, code, frame)
    if getattr(dataset, "SamplesPerPixel", 1) == 3:  # colour of any depth: scaled by its stored bit range
        colour = np.clip(np.asarray(pixels)[:, :, :3].astype(np.float32) / (2**bits - 1), 0.0, 1.0)
        return RawImage(colour, source, code, frame)
    pixels = apply_modality_lut(pixels, dataset)
    if "WindowCenter" in dataset or "VOILUTSequence" in dataset:
        # the window's output range, found by windowing the extreme stored values, maps to [0, 1]
        signed = int(getattr(dataset, "PixelRepresentation", 0) or 0) == 1
        extremes = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
        low, high = sorted(apply_voi_lut(apply_modality_lut(extremes, dataset), dataset, prefer_lut=True).tolist())
        windowed = apply_voi_lut(pixels, dataset, prefer_lut=True).astype(np.float32)
        unit = np.clip((windowed - low) / max(high - low, 1e-12), 0.0, 1.0) if high > low else _minmax(windowed)
    else:
        unit = _minmax(np.asarray(pixels))  # no window: the slice's own range
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        unit = 1.0 - unit
    return RawImage(unit[:, :, None], source, code, frame)
