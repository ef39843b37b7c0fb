"""Imaging modalities and their preprocessing profiles.

M-IDoL routes every image to one expert subspace, one per modality in the paper's framing.
Each modality also has a *profile*: how raw pixels become the model's input tensor. Profiles
are plain data stored in the model config, so a checkpoint carries its own preprocessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

MODALITIES: tuple[str, ...] = ("xray", "fundus", "oct", "dermoscopy", "pathology")
"""Canonical modality names, in the order of the default expert assignment."""

AUTO = "auto"
SHARED = "shared"
"""Name of the single expert of a plain-DINO (one-expert) head, which serves every modality."""
UNASSIGNED = "unassigned"
"""Name of an expert that calibration found serving none of the modalities."""
UNKNOWN = "unknown"
"""What ``modality="auto"`` reports for an image outside every calibrated modality."""

_ALIASES: dict[str, str] = {
    "x-ray": "xray",
    "x_ray": "xray",
    "cxr": "xray",
    "radiograph": "xray",
    "chest-xray": "xray",
    "chest_xray": "xray",
    "cfp": "fundus",
    "retina": "fundus",
    "fundus-photo": "fundus",
    "fundus_photo": "fundus",
    "octa": "oct",
    "retinal-oct": "oct",
    "derm": "dermoscopy",
    "dermatoscopy": "dermoscopy",
    "skin": "dermoscopy",
    "histopathology": "pathology",
    "histology": "pathology",
    "path": "pathology",
    "wsi": "pathology",
    "h&e": "pathology",
}

DICOM_MODALITIES: dict[str, str | None] = {
    "CR": "xray", "DX": "xray",  # computed and digital radiography, whatever the body part
    "OP": "fundus",  # ophthalmic photography
    "OPT": "oct",  # ophthalmic tomography
    "SM": "pathology",  # slide microscopy
    "DMS": "dermoscopy",
    "XC": None,  # external-camera photography: clinical skin photos, dermoscopy stored before DMS, anything else
    "MG": UNKNOWN,  # mammography: an X-ray, but of a kind the chest-radiograph expert never saw
    "IO": UNKNOWN,  # intra-oral (dental) radiography: likewise
}
"""What the DICOM Modality tag (0008,0060) decides for ``modality="auto"``: a modality, or ``None``
for "let the router decide". Every code not listed (CT, MR, US, NM, PT, XA, RF, ES, OT, SEG,
...) is ``"unknown"``."""


def dicom_modality(code: str) -> str | None:
    """The modality a DICOM Modality code names, ``"unknown"``, or ``None`` (the router decides)."""
    return DICOM_MODALITIES.get(code.strip().upper(), UNKNOWN)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def canonical_modality(name: str, *, allow_auto: bool = False) -> str:
    """Map a modality name or alias (case-insensitive) to its canonical name.

    Raises ``ValueError`` listing the valid names when ``name`` is unknown.
    """
    if not isinstance(name, str):
        raise TypeError(f"modality must be a string such as 'xray', got {type(name).__name__}")
    key = name.strip().lower()
    if allow_auto and key == AUTO:
        return AUTO
    if key in MODALITIES:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    valid = ", ".join(((AUTO,) if allow_auto else ()) + MODALITIES)
    raise ValueError(
        f"unknown modality {name!r}; valid names are {valid} "
        f"(aliases such as 'cxr', 'cfp', 'derm', 'histopathology' also work)"
    )


def expert_index_for(expert_modalities: list[str], modality: str, shared_experts: dict[str, int] | None = None) -> int:
    """Index of the expert that serves ``modality`` (a one-expert head serves them all): its own,
    else the one it shares with another modality (``shared_experts``, found by calibration)."""
    key = canonical_modality(modality)
    if list(expert_modalities) == [SHARED]:
        return 0
    if key not in expert_modalities and key in (shared_experts or {}):
        return int(shared_experts[key])
    if key not in expert_modalities:
        served = ", ".join(m for m in expert_modalities if m != UNASSIGNED)
        raise ValueError(
            f"this model has no expert for {key!r} (its experts serve {served}); "
            "use modality='auto' to let the router choose, or another model"
        )
    return list(expert_modalities).index(key)


ResizePolicy = Literal["crop", "whole"]
ChannelPolicy = Literal["gray", "rgb"]


@dataclass(frozen=True)
class ModalityProfile:
    """How one modality's images become model input.

    Attributes:
        size: side of the square input, in pixels.
        resize: ``"crop"`` scales the shortest side to ``size`` and takes the centre square
            (keeps aspect; for lesion photos and tiles); ``"whole"`` scales the whole image to
            ``size`` x ``size`` (keeps the full field of view; for radiographs and OCT B-scans).
        channels: ``"gray"`` reads the image as one luminance channel and replicates it to three
            (the network always sees three channels); ``"rgb"`` keeps colour.
        mean, std: per-channel normalisation applied after scaling intensities to [0, 1].
        crop_border: remove the black frame around a fundus photograph before resizing.
        border_threshold: intensity in [0, 1] below which a border pixel counts as black.
    """

    size: int
    resize: ResizePolicy = "crop"
    channels: ChannelPolicy = "rgb"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_border: bool = False
    border_threshold: float = 0.04

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"profile size must be positive, got {self.size}")
        if self.resize not in ("crop", "whole"):
            raise ValueError(f"profile resize must be 'crop' or 'whole', got {self.resize!r}")
        if self.channels not in ("gray", "rgb"):
            raise ValueError(f"profile channels must be 'gray' or 'rgb', got {self.channels!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("profile mean and std need three values each, std > 0")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModalityProfile:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; valid keys are {sorted(known)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


def default_profiles(size: int, mean: tuple[float, float, float] = IMAGENET_MEAN,
                     std: tuple[float, float, float] = IMAGENET_STD) -> dict[str, ModalityProfile]:
    """The profiles used by the registry models, plus the generic ``auto`` profile.

    All modalities share one normalisation, the backbone's: ImageNet statistics for the Swin
    models, because M-IDoL's official pretraining normalises every image that way, and
    ``mean``/``std`` for a backbone whose ImageNet weights expect others (grayscale scans are
    replicated to RGB first).
    ``auto`` is what ``modality="auto"`` uses before the router has picked an expert:
    the whole field of view in colour, which matches every grayscale profile exactly.
    """
    return {
        "xray": ModalityProfile(size=size, resize="whole", channels="gray", mean=mean, std=std),
        "fundus": ModalityProfile(size=size, resize="crop", channels="rgb", crop_border=True, mean=mean, std=std),
        "oct": ModalityProfile(size=size, resize="whole", channels="gray", mean=mean, std=std),
        "dermoscopy": ModalityProfile(size=size, resize="crop", channels="rgb", mean=mean, std=std),
        "pathology": ModalityProfile(size=size, resize="crop", channels="rgb", mean=mean, std=std),
        AUTO: ModalityProfile(size=size, resize="whole", channels="rgb", mean=mean, std=std),
    }
