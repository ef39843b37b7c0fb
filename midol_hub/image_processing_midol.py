"""The transformers image processor of an M-IDoL model: its five modality profiles in one object.

``AutoImageProcessor.from_pretrained(model_dir)`` returns it (after ``import midol_hub``), and
``pipeline("image-feature-extraction")`` / ``pipeline("image-classification")`` use it. It
holds the same profiles as ``model.config.preprocessing`` (``save_pretrained`` writes both
from the config) and runs the same :class:`~midol_hub.preprocessing.Preprocessor`, so
``processor(images, modality="oct")["pixel_values"]`` equals ``model.preprocess(images, "oct")``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoImageProcessor
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .configuration_midol import MIDoLConfig
from .modalities import AUTO, ModalityProfile, canonical_modality, expert_index_for
from .preprocessing import Preprocessor


class MIDoLImageProcessor(BaseImageProcessor):
    """Images (paths, PIL, numpy, tensors, 16-bit, DICOM) -> ``pixel_values`` (B, 3, S, S), plus
    ``expert_index`` (B,) when a modality is forced, which ``model(**inputs)`` honours.

    Args:
        preprocessing: one :class:`~midol_hub.modalities.ModalityProfile` dict per modality, plus ``"auto"``.
        expert_modalities: the modality of each expert, as in the model config.
        shared_experts: {modality: expert} of modalities without an expert of their own, as in
            the model config.
        default_modality: the modality used when a call names none (``"auto"``, or a fine-tuned
            model's task modality).
    """

    model_input_names = ["pixel_values"]

    def __init__(self, preprocessing: dict | None = None, expert_modalities: list[str] | None = None,
                 default_modality: str = AUTO, shared_experts: dict[str, int] | None = None, **kwargs: Any) -> None:
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        if preprocessing is None or expert_modalities is None:
            config = MIDoLConfig()
            preprocessing, expert_modalities = config.preprocessing, config.expert_modalities
        self.preprocessing = {name: ModalityProfile.from_dict(p).to_dict() for name, p in preprocessing.items()}
        self.expert_modalities = list(expert_modalities)
        self.shared_experts = dict(shared_experts or {})
        self.default_modality = canonical_modality(default_modality, allow_auto=True)

    @classmethod
    def from_config(cls, config: MIDoLConfig) -> MIDoLImageProcessor:
        """The processor of a model with this config (a task model defaults to its task modality)."""
        return cls(config.preprocessing, config.expert_modalities, config.task_modality or AUTO, config.shared_experts)

    def preprocess(self, images: Any, modality: str | None = None, return_tensors: str | None = "pt",
                   channels_first: bool | None = None, **kwargs: Any) -> BatchFeature:
        """Preprocess ``images`` with ``modality``'s profile (default: ``default_modality``)."""
        if kwargs:
            raise TypeError(f"MIDoLImageProcessor got unexpected argument(s) {sorted(kwargs)}; it takes modality, "
                            "return_tensors and channels_first")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"MIDoLImageProcessor returns PyTorch tensors; return_tensors={return_tensors!r} is not supported")
        key = canonical_modality(modality or self.default_modality, allow_auto=True)
        if key not in self.preprocessing:
            raise ValueError(f"this processor has no profile for {key!r}; it has {', '.join(sorted(self.preprocessing))}")
        pixels = Preprocessor(ModalityProfile.from_dict(self.preprocessing[key])).batch(images, channels_first=channels_first)
        data = {"pixel_values": pixels}
        if key != AUTO:
            expert = expert_index_for(self.expert_modalities, key, self.shared_experts)
            data["expert_index"] = torch.full((pixels.shape[0],), expert, dtype=torch.long)
        return BatchFeature(data=data)

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)


AutoImageProcessor.register(MIDoLConfig, slow_image_processor_class=MIDoLImageProcessor, exist_ok=True)
