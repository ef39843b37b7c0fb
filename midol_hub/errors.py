"""Exceptions and warnings raised by midol_hub; each message names the input and the fix."""

from __future__ import annotations


class ImageReadError(ValueError):
    """An input could not be turned into an image (unreadable, truncated, empty, wrong shape...)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class ModelNotFoundError(FileNotFoundError):
    """``load_model`` could not resolve a name, path or Hub id to a model."""


class WeightsNotAvailableError(RuntimeError):
    """A registry model has no published weights to load."""


class WeightsMismatchError(RuntimeError):
    """A weights file does not fit its config (missing, unexpected or mis-shaped tensors)."""


class ModalityMismatchError(ValueError):
    """``strict_modality=True`` and the router is confident an image is another modality."""


class MIDoLInputWarning(UserWarning):
    """An input looks suspicious (value range, size) but can still be encoded."""


class ModalityMismatchWarning(UserWarning):
    """The requested modality disagrees with a calibrated router's confident choice."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted (unsafe, unknown layout, inconsistent shapes)."""


class DatasetError(ValueError):
    """Data that cannot be used as given (a labelled set, a training root, a shard); the message
    says what to fix."""


class IndexMismatchError(ValueError):
    """An image index asked to take or compare embeddings of other weights or preprocessing
    than it was built with."""


class IndexDamagedError(RuntimeError):
    """An image index folder whose files cannot be read as an index."""


class NonFiniteError(ValueError):
    """Weights or model outputs holding NaN or Inf: refused, never stored or returned."""


class WriterBusyError(RuntimeError):
    """Another process is writing this index or encode output; the message names it."""


class DICOMwebError(RuntimeError):
    """A DICOMweb server that cannot be reached, refuses the credentials or fails a request."""
