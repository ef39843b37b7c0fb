"""Downstream models on an M-IDoL encoder: image classification and semantic segmentation.

Both are transformers ``PreTrainedModel`` classes sharing :class:`MIDoLConfig` (with
``num_labels``, ``id2label``, ``problem_type`` and ``task_modality``), so ``save_pretrained``
/ ``from_pretrained`` and the Auto classes work as for any Hub model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.modeling_outputs import ImageClassifierOutput, SemanticSegmenterOutput

from .configuration_midol import MIDoLConfig
from .modalities import canonical_modality
from .modeling_midol import MIDoLModel, backbone_stages


class _TaskModel(PreTrainedModel):
    config_class = MIDoLConfig
    base_model_prefix = "midol"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hf_init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)) and module.weight is not None:
            hf_init.ones_(module.weight)
            hf_init.zeros_(module.bias)

    @classmethod
    def from_encoder(cls, encoder: MIDoLModel, class_names: list[str], modality: str, multilabel: bool = False,
                     feature: str = "embedding") -> Any:
        """A new task model whose encoder starts from ``encoder``'s weights, in eval mode like
        ``from_pretrained``'s (training loops switch it with ``model.train()``)."""
        fields = encoder.config.to_dict()
        for key in ("transformers_version", "model_type", "architectures"):
            fields.pop(key, None)
        config = MIDoLConfig(**{**fields, "keep_prototypes": False, "task_feature": feature})
        config.expert_for(modality)  # raises when the encoder has no expert for it
        config.task_modality = canonical_modality(modality)
        config.id2label = dict(enumerate(class_names))
        config.label2id = {name: i for i, name in enumerate(class_names)}
        config.problem_type = "multi_label_classification" if multilabel else "single_label_classification"
        model = cls(config)
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.prototypes")}
        model.midol.load_state_dict(state)
        return model.eval()

    def expert_index(self, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.config.task_modality is None:
            return None
        return torch.full((batch,), self.config.expert_for(self.config.task_modality), dtype=torch.long, device=device)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Write the model and its ``preprocessor_config.json`` (defaulting to the task modality),
        so ``pipeline(..., model=save_directory)`` preprocesses as ``preprocess`` does."""
        from .image_processing_midol import MIDoLImageProcessor

        super().save_pretrained(save_directory, *args, **kwargs)
        MIDoLImageProcessor.from_config(self.config).save_pretrained(save_directory)

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images -> normalised batch with the task modality's preprocessing profile."""
        return self.midol.preprocess(images, self.config.task_modality or "auto")


class MIDoLForImageClassification(_TaskModel):
    """Encoder feature (L2-normalised expert embedding, or pooled) -> per-feature standardisation -> linear classifier.

    The standardisation is a BatchNorm without affine parameters, as in MAE's linear probe: a
    per-sample LayerNorm would keep the offset that all embeddings share and drown the features
    that tell classes apart.
    """

    def __init__(self, config: MIDoLConfig) -> None:
        super().__init__(config)
        self.midol = MIDoLModel(config)
        self.norm = nn.BatchNorm1d(config.num_features, affine=False, eps=1e-6)
        self.classifier = nn.Linear(config.num_features, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                expert_index: torch.Tensor | None = None) -> ImageClassifierOutput:
        """Logits (B, num_labels), and with ``labels`` the loss of ``config.problem_type``:
        cross-entropy on class indices (B,), or binary cross-entropy on 0/1 targets (B, num_labels)."""
        if expert_index is None:
            expert_index = self.expert_index(pixel_values.shape[0], pixel_values.device)
        out = self.midol(pixel_values, expert_index=expert_index)
        # the features as encode and extract_features give them (the embedding L2-normalised), so a
        # linear probe fitted on extracted features is this head exactly
        features = F.normalize(out.embedding, dim=-1) if self.config.task_feature == "embedding" else out.pooled
        logits = self.classifier(self.norm(features))
        loss = None
        if labels is not None:
            if self.config.problem_type == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels.long())
        return ImageClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def load_linear_probe(self, probe: Any) -> MIDoLForImageClassification:
        """Make the head the fitted :class:`~midol_hub.evaluation.LinearProbe` exactly: its
        feature mean and std go into the standardising norm, its weights into the classifier."""
        self.norm.running_mean.copy_(probe.mean)
        self.norm.running_var.copy_(probe.std**2 - self.norm.eps)  # so that sqrt(var + eps) is the std
        self.classifier.weight.copy_(probe.weight)
        self.classifier.bias.copy_(probe.bias)
        return self

    @torch.inference_mode()
    def predict(self, images: Any) -> torch.Tensor:
        """Probabilities (B, num_labels): softmax, or sigmoid for multi-label models."""
        logits = self(self.preprocess(images).to(next(self.parameters()).device)).logits.float()
        return logits.sigmoid() if self.config.problem_type == "multi_label_classification" else logits.softmax(-1)


class MIDoLForSemanticSegmentation(_TaskModel):
    """The backbone's feature levels (a Swin's four stages) fused top-down (FPN / U-Net style) into per-pixel logits."""

    def __init__(self, config: MIDoLConfig) -> None:
        super().__init__(config)
        self.midol = MIDoLModel(config)
        channels = [level["num_chs"] for level in self.midol.backbone.feature_info]
        dim = config.decoder_dim
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in channels)
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(8, dim), nn.GELU()) for _ in channels
        )
        self.classifier = nn.Conv2d(dim, config.num_labels, kernel_size=1)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                expert_index: torch.Tensor | None = None) -> SemanticSegmenterOutput:
        """Logits (B, num_labels, H, W) at the input resolution, and with ``labels`` (B, H, W)
        the loss: cross-entropy + soft Dice."""
        if expert_index is None:
            expert_index = self.expert_index(pixel_values.shape[0], pixel_values.device)
        pyramid = self.midol(pixel_values, expert_index=expert_index, output_pyramid=True).pyramid
        x = None
        for level in reversed(range(len(pyramid))):
            lateral = self.lateral[level](pyramid[level])
            x = lateral if x is None else lateral + F.interpolate(x, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            x = self.fuse[level](x)
        logits = F.interpolate(self.classifier(x), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        loss = None if labels is None else F.cross_entropy(logits, labels.long()) + dice_loss(logits, labels)
        return SemanticSegmenterOutput(loss=loss, logits=logits)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (1..C-1), from logits (B, C, H, W) and
    class indices (B, H, W); class 0 is background."""
    probs = logits.softmax(1)
    one_hot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    intersection = (probs * one_hot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    return 1 - ((2 * intersection + 1) / (total + 1))[1:].mean()


def layerwise_lr_groups(model: _TaskModel | MIDoLModel, lr: float, decay: float,
                        weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise lr decay (as RETFound / BEiT): the patch embedding gets
    ``lr * decay ** (L + 1)``, Swin block b gets ``lr * decay ** (L - b)``, the head ``lr``.
    ``model`` is a task model (fine-tuning) or an :class:`MIDoLModel` (pretraining from an
    ImageNet start, whose MoE head is the "head"). Each group keeps its ``lr_scale``, and
    ``no_decay`` marks the groups without weight decay (biases, norms, position tables).

    Not timm's ``param_groups_layer_decay``: for Swin it counts the final norm as one more
    layer, so every backbone scale is one decay step higher than RETFound's (and it leaves the
    task head out); tests/test_downstream.py checks that difference.
    """
    backbone, module = ("midol.backbone.", model.midol.backbone) if isinstance(model, _TaskModel) else ("backbone.", model.backbone)
    if not model.config.is_swin:
        return _cnn_layer_groups(model, backbone, module, lr, decay, weight_decay)
    depths = model.config.depths
    num_layers = sum(depths)
    starts = [sum(depths[:i]) for i in range(len(depths))]

    def layer_id(name: str) -> int:
        if name.startswith(backbone + "patch_embed"):
            return 0
        if name.startswith(backbone + "layers."):
            parts = name[len(backbone):].split(".")
            stage = int(parts[1])
            if parts[2] == "blocks":
                return starts[stage] + int(parts[3]) + 1
            return starts[stage] + 1  # downsample runs before the stage's first block
        return num_layers + 1

    return _decayed_groups(model, layer_id, num_layers, lr, decay, weight_decay)


def _cnn_layer_groups(model: nn.Module, backbone: str, module: nn.Module, lr: float, decay: float,
                      weight_decay: float) -> list[dict[str, Any]]:
    """The same for a CNN backbone (EfficientNet, ``module``, its parameters named ``backbone...``):
    the stem is layer 0, the blocks 1..N in order, the head convolution N + 1, the task head ``lr``."""
    places = [(s, b) for s, stage in enumerate(backbone_stages(module)) for b in range(len(stage))]
    num_layers = len(places) + 1

    def layer_id(name: str) -> int:
        if not name.startswith(backbone):
            return num_layers + 1
        parts = name[len(backbone):].split(".")
        if parts[0] == "blocks":
            return places.index((int(parts[1]), int(parts[2]))) + 1
        return 0 if parts[0] in ("conv_stem", "bn1") else num_layers

    return _decayed_groups(model, layer_id, num_layers, lr, decay, weight_decay)


def _decayed_groups(model: nn.Module, layer_id: Any, num_layers: int, lr: float, decay: float,
                    weight_decay: float) -> list[dict[str, Any]]:
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "relative_position" in name
        key = (layer_id(name), no_decay)
        if key not in groups:
            scale = decay ** (num_layers + 1 - key[0])
            groups[key] = {"params": [], "lr": lr * scale, "lr_scale": scale, "no_decay": no_decay,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(param)
    return list(groups.values())


ClassificationModel = MIDoLForImageClassification
"""The name before midol-hub 0.2, kept as an alias."""
SegmentationModel = MIDoLForSemanticSegmentation
"""The name before midol-hub 0.2, kept as an alias."""

AutoModelForImageClassification.register(MIDoLConfig, MIDoLForImageClassification, exist_ok=True)
AutoModelForSemanticSegmentation.register(MIDoLConfig, MIDoLForSemanticSegmentation, exist_ok=True)
