"""midol-hub: load M-IDoL medical foundation models and embed X-ray, fundus, OCT,
dermoscopy and pathology images in their modality's expert subspace.

    >>> from midol_hub import load_model
    >>> model = load_model("midol-micro", pretrained=False)
    >>> enc = model.encode(image, modality="oct")
"""

from __future__ import annotations

from typing import Any

from .adapters import load_lora, lora_classifier, save_lora
from .allocator import keep_freed_memory
from .calibration import calibrate
from .configuration_midol import MIDoLConfig
from .convert import convert_checkpoint
from .datasets import LabelledImages, from_csv, from_folder, from_npz, group_split
from .deploy import OnnxEncoder, export_onnx
from .encoding import Encoding, Failure
from .errors import (
    CheckpointError,
    DatasetError,
    ImageReadError,
    IndexDamagedError,
    IndexMismatchError,
    MIDoLInputWarning,
    ModalityMismatchError,
    ModalityMismatchWarning,
    ModelNotFoundError,
    WeightsMismatchError,
    WeightsNotAvailableError,
)
from .evaluation import (
    best_thresholds,
    classification_metrics,
    few_shot,
    fit_linear_probe,
    knn_classify,
    linear_probe,
    retrieval_scores,
    routing_report,
    segmentation_scores,
)
from .explain import (
    CAM_METHODS,
    ClassHeatmaps,
    class_heatmap,
    draw_class_heatmaps,
    draw_routing_maps,
    routing_map,
)
from .features import extract_features
from .image_processing_midol import MIDoLImageProcessor
from .loading import load_model
from .modalities import MODALITIES, ModalityProfile, canonical_modality
from .modeling_midol import MIDoLModel, MIDoLOutput, MoEProjector
from .preprocessing import ModalityTransform, get_transform
from .registry import DEFAULT_MODEL, get_entry, list_models
from .search import Hit, ImageIndex
from .tasks import (
    ClassificationModel,
    MIDoLForImageClassification,
    MIDoLForSemanticSegmentation,
    SegmentationModel,
    layerwise_lr_groups,
)
from .utils import run_command

__version__ = "0.1.0"


__all__: list[Any] = [
    "DEFAULT_MODEL",
    "MODALITIES",
    "CheckpointError",
    "ClassificationModel",
    "DatasetError",
    "MIDoLForImageClassification",
    "MIDoLForSemanticSegmentation",
    "LabelledImages",
    "SegmentationModel",
    "best_thresholds",
    "calibrate",
    "classification_metrics",
    "extract_features",
    "few_shot",
    "fit_linear_probe",
    "from_csv",
    "from_folder",
    "from_npz",
    "group_split",
    "knn_classify",
    "layerwise_lr_groups",
    "linear_probe",
    "retrieval_scores",
    "routing_report",
    "segmentation_scores",
    "Encoding",
    "Failure",
    "ImageReadError",
    "MIDoLConfig",
    "MIDoLImageProcessor",
    "MIDoLInputWarning",
    "MIDoLModel",
    "MIDoLOutput",
    "ModalityMismatchError",
    "ModalityMismatchWarning",
    "ModalityProfile",
    "ModalityTransform",
    "ModelNotFoundError",
    "MoEProjector",
    "WeightsMismatchError",
    "WeightsNotAvailableError",
    "canonical_modality",
    "convert_checkpoint",
    "get_entry",
    "get_transform",
    "list_models",
    "load_model",
    "routing_map",
    "draw_routing_maps",
    "class_heatmap",
    "draw_class_heatmaps",
    "ClassHeatmaps",
    "CAM_METHODS",
    "lora_classifier",
    "save_lora",
    "load_lora",
    "ImageIndex",
    "Hit",
    "IndexMismatchError",
    "IndexDamagedError",
    "run_command",
    "export_onnx",
    "OnnxEncoder",
    "keep_freed_memory",
]
