"""Configuration of an M-IDoL model: backbone, MoE head, experts and preprocessing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import field
from typing import Any

from transformers import PreTrainedConfig

from .modalities import (
    AUTO,
    MODALITIES,
    SHARED,
    UNASSIGNED,
    ModalityProfile,
    canonical_modality,
    default_profiles,
    expert_index_for,
)

VECTOR_OUTPUTS = ("embedding", "pooled")
"""The outputs that are one vector per image: what an index holds, ``.npy`` files and maps draw."""


class MIDoLConfig(PreTrainedConfig):
    r"""Everything needed to rebuild an M-IDoL model and feed it correctly.

    Backbone (any timm model with pooled features and ``forward_intermediates``):
        backbone: timm architecture name, e.g. ``"swin_base_patch4_window7_224"`` (the paper's)
            or ``"tf_efficientnet_lite0"`` (midol-lite's).
        embed_dim, depths, num_heads, window_size, patch_size: overrides of the timm defaults
            for a Swin backbone (``swin_*``), ignored by others; the paper's Swin-B is
            128 / (2, 2, 18, 2) / (4, 8, 16, 32) / 7 / 4.
        img_size: the input side (a Swin is built for it; a CNN takes it as its input size).
        feature_dim: width of a non-Swin backbone's pooled feature (a Swin's follows from
            ``embed_dim`` and ``depths``).
        fused_attention: window attention through ``scaled_dot_product_attention`` (same
            result within float rounding, about 20% faster on CPU; timm leaves it off for Swin).
    MoE projection head:
        num_experts: expert FFNs (one per modality in the paper's framing).
        top_k: experts mixed per image in the training forward (Tutel weights them by their
            softmax gate probability, not renormalised; the official head uses 4). ``encode``
            always reads one expert's subspace.
        gate_noise: in training mode the gates see ``N(0, 1) * gate_noise / num_experts``
            added to the router logits, as Tutel's ``gate_noise`` (official: 1.0).
        hidden_dim: hidden width of each expert FFN (d -> hidden -> d, GELU).
        num_prototypes: width K of the weight-normalised prototype layer used in pretraining.
        keep_prototypes: whether this checkpoint holds the prototype layer (inference does
            not need it; training and conversions of training checkpoints do).
    Experts and modalities:
        expert_modalities: the modality each expert serves, indexed by expert; ``["shared"]``
            for the one-expert head of the plain DINO baseline; ``"unassigned"`` for an
            expert that calibration found serving no modality.
        modality_calibration: ``None`` until experts were assigned to modalities by routing
            labelled images (:func:`midol_hub.calibrate`); then the routing accuracy per
            modality, the confusion matrix, the ``shared_experts`` of modalities without an
            expert of their own and the out-of-scope detector that makes
            ``modality="auto"`` answer ``"unknown"``. Only a calibrated model warns when an
            image looks like another modality.
        mismatch_threshold: router probability above which a calibrated model considers an
            image to belong to another modality than the one requested.
    Provenance of the weights:
        pretraining: how the weights were pretrained, recorded by ``training.export``: the
            objective and every option that differs between the official code and ours
            (routing form, top-k, gate noise, clipping, initialisation, steps), and the record
            of the model it started from (``init_pretraining``), so the whole lineage.
        backbone_only: the head was not converted (its experts are untrained): ``encode``
            returns pooled features and refuses expert embeddings.
    Preprocessing:
        preprocessing: one :class:`~midol_hub.modalities.ModalityProfile` dict per modality,
            plus ``"auto"``.
        default_output: the ``encode`` outputs returned when none are requested; the first of
            them that is a vector (``default_feature``) is also what ``midol index`` stores.
    Downstream tasks (:mod:`midol_hub.tasks`):
        task_modality: the modality whose expert and preprocessing a fine-tuned model uses.
        task_feature: ``"embedding"`` (the expert subspace) or ``"pooled"`` (the backbone).
        decoder_dim: channels of the segmentation decoder.
    """

    model_type = "midol"

    backbone: str = "swin_base_patch4_window7_224"
    embed_dim: int = 128
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    window_size: int = 7
    img_size: int = 224
    patch_size: int = 4
    feature_dim: int | None = None
    drop_path_rate: float = 0.0
    fused_attention: bool = True
    num_experts: int = 5
    top_k: int = 4
    gate_noise: float = 1.0
    hidden_dim: int = 2048
    num_prototypes: int = 65536
    keep_prototypes: bool = False
    expert_modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    modality_calibration: dict | None = None
    mismatch_threshold: float = 0.6
    pretraining: dict | None = None
    backbone_only: bool = False
    preprocessing: dict | None = None
    default_output: list[str] = field(default_factory=lambda: ["embedding"])
    task_modality: str | None = None
    task_feature: str = "embedding"
    decoder_dim: int = 128

    def __post_init__(self, **kwargs: Any) -> None:
        if self.preprocessing is None:
            self.preprocessing = {k: p.to_dict() for k, p in default_profiles(self.img_size).items()}
        self.depths = [int(d) for d in self.depths]
        self.num_heads = [int(h) for h in self.num_heads]
        self.expert_modalities = [m if m in (SHARED, UNASSIGNED) else canonical_modality(m) for m in self.expert_modalities]
        self.default_output = list(self.default_output)
        super().__post_init__(**kwargs)
        self.validate_midol()

    def validate_midol(self) -> None:
        """Check the values that would otherwise fail deep inside the model."""
        if not self.is_swin and not self.feature_dim:
            raise ValueError(f"backbone {self.backbone!r} is not a Swin: set feature_dim to the width of its pooled feature")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} need the same length")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if SHARED in self.expert_modalities and self.expert_modalities != [SHARED]:
            raise ValueError(f"'{SHARED}' names the single expert of a one-expert head, got {self.expert_modalities}")
        if len(self.expert_modalities) != self.num_experts:
            raise ValueError(
                f"expert_modalities lists {len(self.expert_modalities)} modalities "
                f"but the head has num_experts={self.num_experts}"
            )
        for name, profile in self.preprocessing.items():
            if name != AUTO:
                canonical_modality(name)
            ModalityProfile.from_dict(profile)
        if self.task_feature not in VECTOR_OUTPUTS:
            raise ValueError(f"task_feature must be 'embedding' or 'pooled', got {self.task_feature!r}")
        if self.backbone_only and "embedding" in self.default_output:
            raise ValueError("a backbone-only model has no trained experts: its default_output cannot hold 'embedding'")
        if AUTO not in self.preprocessing:
            raise ValueError("preprocessing needs an 'auto' profile for modality='auto'")

    @property
    def is_swin(self) -> bool:
        """Whether the backbone is a timm Swin Transformer (built from embed_dim, depths, ...)."""
        return self.backbone.startswith("swin")

    @property
    def num_features(self) -> int:
        """Width of the pooled backbone feature (and of each expert embedding)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1) if self.is_swin else int(self.feature_dim)

    @property
    def default_feature(self) -> str:
        """The vector users get by default: the first ``"embedding"`` or ``"pooled"`` of
        ``default_output`` (``"embedding"`` when it names neither)."""
        return next((o for o in self.default_output if o in VECTOR_OUTPUTS), "embedding")

    def profile(self, modality: str) -> ModalityProfile:
        """The preprocessing profile of ``modality`` (a name, alias or ``"auto"``)."""
        key = canonical_modality(modality, allow_auto=True)
        if key not in self.preprocessing:
            raise ValueError(
                f"this model has no preprocessing profile for {key!r}; "
                f"it has {', '.join(sorted(self.preprocessing))}"
            )
        return ModalityProfile.from_dict(self.preprocessing[key])

    def expert_for(self, modality: str) -> int:
        """Index of the expert that serves ``modality`` (a one-expert head serves them all; a
        modality calibration gave no expert of its own shares the one its images are routed to)."""
        return expert_index_for(self.expert_modalities, modality, self.shared_experts)

    @property
    def shared_experts(self) -> dict[str, int]:
        """{modality: expert} of calibrated modalities without an expert of their own."""
        return dict((self.modality_calibration or {}).get("shared_experts", {}))

    def preprocessing_hash(self) -> str:
        """sha256 of the canonical preprocessing settings, to key caches and provenance."""
        blob = json.dumps(self.preprocessing, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def calibration_hash(self) -> str:
        """sha256 of the experts' modalities and the modality calibration: what ``auto``'s answers,
        and so its embeddings, depend on besides the weights."""
        blob = json.dumps([self.expert_modalities, self.modality_calibration], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()
