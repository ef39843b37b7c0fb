"""Encode speed: overhead over the raw forward, CPU efficiency, bf16 speed-up and accuracy,
and end-to-end folder encoding against the forward pass alone; for midol-lite (a CNN backbone),
encode against timm's own forward of the same backbone and ``midol encode`` of the
full-resolution test files against that forward, with midol-micro's speed beside it;
preprocessing of 8-bit images resized in uint8 against floats; and the speed-up of
:func:`midol_hub.allocator.keep_freed_memory` over glibc's default settings."""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from midol_hub import MIDoLConfig, MIDoLModel, get_entry, load_model
from training.shared_data import data_root, fullres_parts

from .common import interleaved_medians


def real_image_paths(limit: int) -> list[str]:
    """``limit`` full-resolution test files, one of each modality in turn while it has files left
    (the first ``limit`` in folder order were all radiograph PNGs); all of them repeated when
    fewer."""
    turns = itertools.zip_longest(*fullres_parts(data_root(), "test").values())
    paths = [path for turn in turns for path in turn if path is not None]
    return (paths * (limit // len(paths) + 1))[:limit]


def measure(arch: str = "midol-swin-base", batch: int = 8, repeats: int = 5) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = load_model(arch, pretrained=False)
        model_bf16 = load_model(arch, pretrained=False, dtype=torch.bfloat16)
        plain = MIDoLModel(MIDoLConfig(**{**get_entry(arch).config, "fused_attention": False})).eval()
    model_bf16.load_state_dict(model.state_dict())
    plain.load_state_dict(model.state_dict())
    size = model.config.img_size
    pixels = torch.randn(batch, 3, size, size)

    def raw_forward():
        with torch.inference_mode():
            model.head(model.backbone(pixels))

    def plain_forward():  # timm's own Swin attention path, for comparison
        with torch.inference_mode():
            plain.head(plain.backbone(pixels))

    def encode():
        model.encode(pixels, modality="oct", preprocessed=True, batch_size=batch)

    def encode_bf16():
        model_bf16.encode(pixels, modality="oct", preprocessed=True, batch_size=batch)

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    seconds = interleaved_medians(
        {"raw": raw_forward, "plain": plain_forward, "encode": encode, "bf16": encode_bf16, "mm": lambda: torch.mm(a, b)},
        repeats=repeats,
    )
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(pixels)
    flops = counter.get_total_flops()
    encode_gflops = flops / seconds["encode"] / 1e9
    mm_gflops = 2 * 4096**3 / seconds["mm"] / 1e9

    paths = real_image_paths(4 * batch)
    with torch.inference_mode():
        reference = model.encode(paths[:16], modality="auto").embedding
        low = model_bf16.encode(paths[:16], modality="auto").embedding
    folder = interleaved_medians({"folder": lambda: model.encode(paths, modality="auto", batch_size=batch)}, repeats=max(1, repeats // 2))
    forward_per_image = seconds["raw"] / batch
    return {
        "encode_overhead_ratio": seconds["raw"] / seconds["encode"],
        "cpu_efficiency_ratio": encode_gflops / mm_gflops,
        "cpu_efficiency_ratio_timm_attention": flops / seconds["plain"] / 1e9 / mm_gflops,
        "encode_gflops": encode_gflops,
        "mm_gflops": mm_gflops,
        "bf16_speedup_ratio": seconds["encode"] / seconds["bf16"],
        "bf16_cos_min": float(F.cosine_similarity(reference, low).min()),
        "folder_vs_forward_ratio": forward_per_image * len(paths) / folder["folder"],
        "encode_images_per_s": batch / seconds["encode"],
    }


def measure_cnn(name: str = "midol-lite", batch: int = 16, repeats: int = 5, files: int = 64) -> dict[str, float]:
    """``name`` (its shipped weights where it has them) against timm's forward of the same backbone,
    in timm's default layout and in channels_last (the one MIDoLModel gives a CNN's activations):
    ``model.encode`` of preprocessed batches, in fp32 and in bf16 (the precision ``dtype="auto"``
    picks where bf16 is native), and ``midol encode``'s path (``midol_hub.bulk``: decode in workers,
    JPEG draft decoding, preprocess, encode) over ``files`` full-resolution test files, with its
    default forward streams and with one (``midol_hub.bulk.default_streams``)."""
    from midol_hub.bulk import encode_files, remove_parts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = get_entry(name)
        model = load_model(name, pretrained=entry.has_weights)
        model_bf16 = load_model(name, pretrained=False, dtype=torch.bfloat16)
        micro = load_model("midol-micro")
    model_bf16.load_state_dict(model.state_dict())
    backbone = timm.create_model(model.config.backbone, pretrained=False, num_classes=0).eval()
    backbone.load_state_dict(model.backbone.state_dict())
    size = model.config.img_size
    pixels, micro_pixels = torch.randn(batch, 3, size, size), torch.randn(batch, 3, micro.config.img_size, micro.config.img_size)
    paths = real_image_paths(files)

    def timm_forward(layout: torch.memory_format = torch.contiguous_format):
        inputs = pixels.contiguous(memory_format=layout)
        return lambda: _inference(backbone, inputs)

    def bulk(streams: int | None = None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "features.npz"
            encode_files(model, paths, out, modality="auto", outputs=(model.config.default_feature,), batch_size=batch,
                         progress=False, streams=streams)
            remove_parts(out)

    seconds = interleaved_medians({
        "timm": timm_forward(),
        "timm_channels_last": timm_forward(torch.channels_last),  # the layout MIDoLModel gives a CNN
        "encode": lambda: model.encode(pixels, modality="oct", preprocessed=True, batch_size=batch),
        "encode_bf16": lambda: model_bf16.encode(pixels, modality="oct", preprocessed=True, batch_size=batch),
        "micro": lambda: micro.encode(micro_pixels, modality="oct", preprocessed=True, batch_size=batch),
        "bulk": bulk,  # side by side with the forward it is compared with: this machine's speed drifts
        "bulk_one_stream": lambda: bulk(streams=1),  # one forward at a time, as before default_streams
    }, repeats=repeats)
    folder = seconds["bulk"]
    forward_images_per_s = batch / seconds["timm"]
    feature = model.config.default_feature
    real = model.preprocess(paths[:16], "auto")
    reference, low = (getattr(m.encode(real, modality="oct", preprocessed=True, output=feature), feature) for m in (model, model_bf16))
    return {
        "lite_encode_vs_timm_ratio": seconds["timm"] / seconds["encode"],
        "lite_encode_vs_timm_channels_last_ratio": seconds["timm_channels_last"] / seconds["encode"],
        "timm_channels_last_vs_contiguous_ratio": seconds["timm"] / seconds["timm_channels_last"],
        "lite_encode_images_per_s": batch / seconds["encode"],
        "lite_bf16_speedup_ratio": seconds["encode"] / seconds["encode_bf16"],
        "lite_bf16_cos_min": float(F.cosine_similarity(reference, low.float()).min()),
        "micro_encode_images_per_s": batch / seconds["micro"],
        "midol_encode_fullres_vs_forward_ratio": len(paths) / folder / forward_images_per_s,
        "midol_encode_fullres_images_per_s": len(paths) / folder,
        "midol_encode_fullres_one_stream_vs_forward_ratio": len(paths) / seconds["bulk_one_stream"] / forward_images_per_s,
        "midol_encode_fullres_vs_channels_last_forward_ratio": len(paths) / folder / (batch / seconds["timm_channels_last"]),
    }


def _inference(model: torch.nn.Module, inputs: torch.Tensor) -> None:
    with torch.inference_mode():
        model(inputs)


def measure_frames(pages: tuple[int, int] = (30, 3000), size: int = 32) -> dict[str, float]:
    """Per-frame read time of ``frames="all"`` on a multi-page TIFF of 3,000 pages against one of
    30, side by side: reading in one pass makes it a ratio near 1 (re-opening the file for every
    page made it grow with the page count: 0.06 s per frame at 300 pages, 0.51 s at 3,000)."""
    from PIL import Image

    from midol_hub.image_io import file_frames

    per_frame = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for count in pages:
            path = Path(folder) / f"stack-{count}.tif"
            images = [Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)) for _ in range(count)]
            images[0].save(path, save_all=True, append_images=images[1:])
            start = time.perf_counter()
            read = sum(1 for _ in file_frames(path, "all"))
            per_frame[count] = (time.perf_counter() - start) / read
    small, large = pages
    return {f"tiff_frame_ms_{small}_pages": 1e3 * per_frame[small], f"tiff_frame_ms_{large}_pages": 1e3 * per_frame[large],
            "tiff_frame_time_ratio": per_frame[large] / per_frame[small]}


def measure_eight_bit(size: int = 224, repeats: int = 5) -> dict[str, float]:
    """Preprocessing of the 8-bit RGB full-resolution test files (decoded for a ``size`` input, as
    ``encode`` reads them) kept uint8 until resized (``RawImage``), against scaling them to floats
    first (the reader's float copy timed with it), with ``midol encode``'s ``auto`` profile; and
    the largest difference of the two inputs, in grey levels."""
    from midol_hub.image_io import RawImage, read_file, unit_pixels
    from midol_hub.preprocessing import Preprocessor, WarningCollector

    paths = [path for part in fullres_parts(data_root(), "test").values() for path in part]
    raws = [raw for raw in (read_file(Path(path), input_size=size) for path in paths) if raw.pixels.dtype == np.uint8]
    preprocessor, warn = Preprocessor(MIDoLConfig(img_size=size).profile("auto")), WarningCollector()

    def as_floats() -> torch.Tensor:
        return torch.cat([preprocessor.from_raw([RawImage(unit_pixels(raw.pixels), raw.source)], warn) for raw in raws])

    def eight_bit() -> torch.Tensor:
        return torch.cat([preprocessor.from_raw([raw], warn) for raw in raws])

    seconds = interleaved_medians({"float": as_floats, "uint8": eight_bit}, repeats=repeats)
    grey_levels = 255 * ((as_floats() - eight_bit()) * preprocessor.std).abs().max().item()  # undo the normalisation
    return {"eight_bit_files": float(len(raws)),
            "eight_bit_preprocess_speedup": seconds["float"] / seconds["uint8"],
            "eight_bit_max_grey_levels": grey_levels}


ALLOCATOR_PROBE = """
import sys, time, warnings
import torch
from midol_hub import load_model
from midol_hub.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
warnings.simplefilter("ignore")
model = load_model(sys.argv[2], pretrained=False)
pixels = torch.randn(int(sys.argv[3]), 3, model.config.img_size, model.config.img_size)
model.encode(pixels, modality="oct", preprocessed=True)
start = time.perf_counter()
for _ in range(4):
    model.encode(pixels, modality="oct", preprocessed=True)
print(4 * len(pixels) / (time.perf_counter() - start))
"""


def measure_allocator(name: str = "midol-lite", batch: int = 16, repeats: int = 3) -> dict[str, float]:
    """``model.encode`` images/s in fresh processes with glibc's default allocator settings and
    with :func:`midol_hub.allocator.keep_freed_memory`, alternated: the setting is process-wide
    and cannot be undone, so each side gets its own processes."""
    rates: dict[str, list[float]] = {"default": [], "keep": []}
    for _ in range(repeats):
        for mode, values in rates.items():
            result = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode, name, str(batch)],
                                    capture_output=True, text=True, check=True)
            values.append(float(result.stdout.split()[-1]))
    default, keep = statistics.median(rates["default"]), statistics.median(rates["keep"])
    return {"allocator_speedup_ratio": keep / default, "allocator_default_images_per_s": default,
            "allocator_kept_images_per_s": keep}
