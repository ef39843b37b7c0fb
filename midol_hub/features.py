"""Frozen-feature extraction with an on-disk cache, so repeated probes never re-encode.

The cache key covers the weights, the preprocessing, the modality calibration (which expert
serves a modality, which modality ``"auto"`` names), the modality, the output and the content
of every image: change any of them and the features are computed afresh.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from .modeling_midol import MIDoLModel
from .utils import atomic_write, content_sha256, state_sha256


def weights_fingerprint(model: MIDoLModel) -> str:
    """sha256 of the weights file when the model holds exactly its weights (the provenance turns
    ``"modified"`` once they change in memory), else of the parameters, with their dtype."""
    dtype = str(next(model.parameters()).dtype)
    provenance = model.provenance
    if provenance is not None and provenance.weights_sha256:
        return f"{provenance.weights_sha256}:{dtype}"
    return state_sha256(model.state_dict())


def cache_key(model: MIDoLModel, images: Sequence[Any], modality: str, output: str) -> str:
    digest = hashlib.sha256()
    config = model.config  # the calibration maps modalities to experts: a recalibrated model embeds anew
    for part in (weights_fingerprint(model), config.preprocessing_hash(), config.calibration_hash(), modality, output):
        digest.update(part.encode())
    for image in images:
        digest.update(content_sha256(image).encode())
    return digest.hexdigest()


def extract_features(
    model: MIDoLModel,
    images: Sequence[Any],
    modality: str,
    output: str | Sequence[str] = "embedding",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Features (N, D) of ``images`` (``output`` is ``"embedding"`` or ``"pooled"``), cached on disk;
    for several outputs (a list), ``{output: features}`` from one pass over the images."""
    outputs = (output,) if isinstance(output, str) else tuple(output)

    def compute() -> dict[str, torch.Tensor]:
        encoding = model.encode(list(images), modality=modality, output=outputs, batch_size=batch_size, progress=progress)
        return {name: getattr(encoding, name).contiguous() for name in outputs}

    def answer(features: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        return features[output] if isinstance(output, str) else {name: features[name] for name in outputs}

    if cache_dir is None:
        return answer(compute())
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cache_key(model, images, modality, ','.join(outputs))}.safetensors"
    if path.is_file():  # written whole and renamed into place: never partial
        return answer(load_file(path))
    # one process computes a key; others wait for it and read its file
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return answer(load_file(path))
        features = compute()
        with atomic_write(path) as tmp:
            save_file(features, tmp)
    return answer(features)
