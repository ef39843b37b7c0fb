"""ONNX Runtime against torch: the same Swin-B ``encode`` call on the same batch, fp32 on the CPU,
through :class:`midol_hub.OnnxEncoder` and through the torch model."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from midol_hub import OnnxEncoder, export_onnx, load_model

from .common import interleaved_medians


def measure(arch: str = "midol-swin-base", batch: int = 8, repeats: int = 5) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = load_model(arch, pretrained=False)
    size = model.config.img_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        encoder = OnnxEncoder(export_onnx(model, Path(folder) / "model.onnx"))
        calls = {name: (lambda run=run: run(pixels, modality="oct", preprocessed=True, batch_size=batch, normalize=False))
                 for name, run in (("torch", model.encode), ("onnxruntime", encoder.encode))}
        seconds = interleaved_medians(calls, repeats=repeats)
        difference = (calls["torch"]().embedding - calls["onnxruntime"]().embedding).abs().max()
    return {
        "onnxruntime_vs_torch_ratio": seconds["torch"] / seconds["onnxruntime"],
        "onnxruntime_max_abs_diff": float(difference),
        "onnxruntime_images_per_s": batch / seconds["onnxruntime"],
        "torch_images_per_s": batch / seconds["torch"],
    }
