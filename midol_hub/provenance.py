"""Where a loaded model came from, so every embedding can be traced to exact weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

from .utils import file_sha256

WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class Provenance:
    """Origin of a model's weights and a fingerprint of its preprocessing.

    Attributes:
        source: ``"hub"``, ``"local"``, ``"embedded"`` (shipped in the package), ``"random"``
            (``pretrained=False``) or ``"modified"`` (changed after loading: trained, or new
            weights loaded into it; ``derived_from`` names the original).
        location: Hub repo id, local path, or registry name.
        preprocessing_sha256: hash of the preprocessing profiles in the config.
        revision: the revision asked for (Hub only).
        commit: the resolved Hub commit hash.
        weights_path: the safetensors file the weights were read from.
        weights_sha256: sha256 of that file, computed while loading.
        derived_from: for ``"modified"``, ``source:location@weights_sha256`` of the original.
    """

    source: str
    location: str
    preprocessing_sha256: str
    revision: str | None = None
    commit: str | None = None
    weights_path: str | None = None
    weights_sha256: str | None = None
    derived_from: str | None = None

    @classmethod
    def of_file(cls, source: str, location: str, preprocessing_sha256: str, weights_path: str | os.PathLike,
                revision: str | None = None, commit: str | None = None) -> Provenance:
        """Provenance of weights read from ``weights_path``, hashing the file now (at load time)."""
        return cls(source, location, preprocessing_sha256, revision, commit, str(Path(weights_path)),
                   file_sha256(weights_path))

    def modified(self, preprocessing_sha256: str) -> Provenance:
        """The provenance of these weights after they were changed in memory."""
        return Provenance("modified", self.location, preprocessing_sha256,
                          derived_from=f"{self.source}:{self.location}@{self.weights_sha256}")

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__dataclass_fields__}


def resolve_weights_file(name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None,
                         subfolder: str = "") -> tuple[str, Path, str | None] | None:
    """Where ``from_pretrained(name_or_path)`` read its weights: (source, file, Hub commit), or None."""
    local = Path(name_or_path) / subfolder / WEIGHTS_NAME
    if local.is_file():
        return "local", local, None
    filename = f"{subfolder}/{WEIGHTS_NAME}" if subfolder else WEIGHTS_NAME
    cached = try_to_load_from_cache(str(name_or_path), filename, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        path = Path(cached)
        return "hub", path, path.parents[len(Path(filename).parts) - 1].name
    return None
