"""Where a loaded model came from, so every embedding can be traced to exact weights."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Provenance:
    """Origin of a model's weights and a fingerprint of its preprocessing.

    Attributes:
        source: ``"hub"``, ``"local"`` or ``"random"`` (``pretrained=False``).
        location: Hub repo id, local path, or registry name.
        revision: the revision asked for (Hub only).
        commit: the resolved Hub commit hash.
        weights_path: the safetensors file the weights were read from.
        preprocessing_sha256: hash of the preprocessing profiles in the config.
    """

    source: str
    location: str
    preprocessing_sha256: str
    revision: str | None = None
    commit: str | None = None
    weights_path: str | None = None
    _weights_sha256: str | None = field(default=None, repr=False)

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the weights file, computed on first use (hashing 350 MB takes a moment)."""
        if self._weights_sha256 is None and self.weights_path is not None:
            digest = hashlib.sha256()
            with open(self.weights_path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
            self._weights_sha256 = digest.hexdigest()
        return self._weights_sha256

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "location": self.location,
            "revision": self.revision,
            "commit": self.commit,
            "weights_path": self.weights_path and str(Path(self.weights_path)),
            "weights_sha256": self.weights_sha256,
            "preprocessing_sha256": self.preprocessing_sha256,
        }
