"""Frozen-feature extraction with an on-disk cache, so repeated probes never re-encode.

The cache key covers the weights, the preprocessing, the modality, the output and the
content of every image: change any of them and the features are computed afresh.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from .modeling_midol import MIDoLModel


def weights_fingerprint(model: MIDoLModel) -> str:
    """sha256 of the weights file when the model holds exactly its weights (the provenance turns
    ``"modified"`` once they change in memory), else of the parameters, with their dtype."""
    dtype = str(next(model.parameters()).dtype)
    provenance = model.provenance
    if provenance is not None and provenance.weights_sha256:
        return f"{provenance.weights_sha256}:{dtype}"
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def content_hash(image: Any) -> str:
    """sha256 of a file's bytes or an array's values (with its shape and dtype)."""
    digest = hashlib.sha256()
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    else:
        array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def cache_key(model: MIDoLModel, images: Sequence[Any], modality: str, output: str) -> str:
    digest = hashlib.sha256()
    for part in (weights_fingerprint(model), model.config.preprocessing_hash(), modality, output):
        digest.update(part.encode())
    for image in images:
        digest.update(content_hash(image).encode())
    return digest.hexdigest()


def extract_features(
    model: MIDoLModel,
    images: Sequence[Any],
    modality: str,
    output: str = "embedding",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Features (N, D) of ``images`` (``output`` is ``"embedding"`` or ``"pooled"``), cached on disk."""
    def compute() -> torch.Tensor:
        return getattr(model.encode(list(images), modality=modality, output=(output,), batch_size=batch_size,
                                    progress=progress), output)

    if cache_dir is None:
        return compute()
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cache_key(model, images, modality, output)}.safetensors"
    if path.is_file():  # written whole and renamed into place: never partial
        return load_file(path)["features"]
    # one process computes a key; others wait for it and read its file
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return load_file(path)["features"]
        features = compute()
        handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(handle)
        try:
            save_file({"features": features.contiguous()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return features
