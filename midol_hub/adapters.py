"""LoRA adapters for classification, through ``peft``: train a few low-rank matrices in the Swin
attention (and the small task head) instead of the whole encoder, and share them without the
base weights.

An adapter folder holds peft's ``adapter_config.json`` and ``adapter_model.safetensors`` (the
LoRA matrices), ``midol_head.safetensors`` (the task head: its standardisation statistics and
linear classifier) and ``midol_task.json``: the classes, modality and feature of the task, and
the sha256 of the base weights it was trained on, so that :func:`load_lora` refuses other
weights instead of silently giving another model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import WeightsMismatchError
from .modeling_midol import MIDoLModel
from .tasks import MIDoLForImageClassification
from .utils import atomic_write, read_json_file

TASK_FILE = "midol_task.json"
HEAD_FILE = "midol_head.safetensors"
ATTENTION_LAYERS = ("qkv", "proj")
"""The Swin attention projections LoRA adapts by default."""
POINTWISE_CONVS = ("conv_pw", "conv_pwl")
"""A CNN's (EfficientNet's) 1x1 expansion and projection convolutions, LoRA's default there."""
HEAD = ("norm", "classifier")
"""The task head, trained and saved in full beside the adapter. Not peft's ``modules_to_save``:
that matches names by suffix, and ``norm`` would take every LayerNorm of the backbone with it."""


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'midol-hub[lora]'") from None
    return peft


def _target_pattern(targets: Sequence[str] | None, swin: bool = True) -> str:
    """Only the attention layers' projections, never e.g. the patch embedding's ``proj`` convolution;
    in a CNN the blocks' pointwise convolutions (``targets`` None: each backbone's default)."""
    if not swin:
        targets = POINTWISE_CONVS if targets is None else targets
        if not targets or set(targets) - set(POINTWISE_CONVS):
            raise ValueError(f"LoRA targets of a CNN backbone must be among {', '.join(POINTWISE_CONVS)}, got {list(targets)}")
        return rf"midol\.backbone\.blocks\.\d+\.\d+\.({'|'.join(targets)})"
    targets = ATTENTION_LAYERS if targets is None else targets
    unknown = [t for t in targets if t not in ATTENTION_LAYERS + ("fc1", "fc2")]
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be among qkv, proj (attention) and fc1, fc2 (MLP), got {list(targets)}")
    attention = [t for t in targets if t in ATTENTION_LAYERS]
    mlp = [t for t in targets if t not in ATTENTION_LAYERS]
    parts = ([rf"attn\.({'|'.join(attention)})"] if attention else []) + ([rf"mlp\.({'|'.join(mlp)})"] if mlp else [])
    return rf"midol\.backbone\.layers\.\d+\.blocks\.\d+\.({'|'.join(parts)})"


def _base_sha256(encoder: MIDoLModel) -> str | None:
    provenance = encoder.provenance
    return None if provenance is None else provenance.weights_sha256


def lora_classifier(encoder: MIDoLModel, class_names: list[str], modality: str, multilabel: bool = False,
                    feature: str = "embedding", rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    targets: Sequence[str] | None = None) -> Any:
    """A classifier on ``encoder`` whose encoder is frozen except for rank-``rank`` LoRA matrices
    on ``targets`` in every block (default: a Swin's attention projections, a CNN's pointwise
    convolutions); the task head trains in full. Returns a peft model."""
    peft = _peft()
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    model = MIDoLForImageClassification.from_encoder(encoder, class_names, modality, multilabel, feature)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=_target_pattern(targets, encoder.config.is_swin))
    wrapped = peft.get_peft_model(model, config)
    for name in HEAD:  # peft froze everything but the LoRA matrices
        getattr(model, name).requires_grad_(True)
    wrapped.midol_task = {"class_names": list(class_names), "modality": model.config.task_modality,
                          "multilabel": multilabel, "feature": feature, "base_weights_sha256": _base_sha256(encoder),
                          "base_model": encoder.provenance.location if encoder.provenance is not None else None}
    return wrapped


def save_lora(model: Any, directory: str | os.PathLike) -> Path:
    """Write the adapter (LoRA matrices, task head, task description) to ``directory``; the base
    weights are not in it (push the folder to the Hub as it is)."""
    if not hasattr(model, "midol_task"):
        raise TypeError("save_lora needs a model from lora_classifier or load_lora")
    directory = Path(directory)
    model.save_pretrained(directory)
    task_model = model.get_base_model()
    head = {f"{name}.{key}": value.detach().contiguous() for name in HEAD
            for key, value in getattr(task_model, name).state_dict().items()}
    with atomic_write(directory / HEAD_FILE) as tmp:
        save_file(head, tmp)
    with atomic_write(directory / TASK_FILE) as tmp:
        Path(tmp).write_text(json.dumps(model.midol_task, indent=2))
    return directory


def load_lora(encoder: MIDoLModel, directory: str | os.PathLike) -> Any:
    """The fine-tuned classifier back from ``encoder`` (the base it was trained on) and an adapter
    folder written by :func:`save_lora`, in eval mode."""
    peft = _peft()
    directory = Path(directory)
    task_file = directory / TASK_FILE
    missing = [name for name in (TASK_FILE, HEAD_FILE, "adapter_config.json", "adapter_model.safetensors")
               if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: not a midol LoRA adapter (no {', '.join(missing)}); write one with save_lora")
    fix = "save the adapter again with save_lora"
    task = read_json_file(task_file, "adapter's task file", ("class_names", "modality", "multilabel", "feature"), fix)
    read_json_file(directory / "adapter_config.json", "peft adapter config", ("peft_type", "target_modules"), fix)
    wanted, found = task.get("base_weights_sha256"), _base_sha256(encoder)
    if wanted is not None and found != wanted:
        raise WeightsMismatchError(
            f"{directory}: the adapter was trained on base weights {wanted[:12]} ({task.get('base_model')}), but the "
            f"encoder given has {found[:12] if found else 'unknown (modified or random) weights'}; load that base model"
        )
    model = MIDoLForImageClassification.from_encoder(encoder, task["class_names"], task["modality"], task["multilabel"],
                                                     task["feature"])
    try:
        head = load_file(directory / HEAD_FILE)
        for name in HEAD:
            getattr(model, name).load_state_dict({key.split(".", 1)[1]: value for key, value in head.items()
                                                  if key.startswith(f"{name}.")})
        wrapped = peft.PeftModel.from_pretrained(model, str(directory.resolve()), local_files_only=True)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{directory}: the adapter's files do not load ({type(error).__name__}: {first}); {fix}") from None
    wrapped.midol_task = task
    return wrapped.eval()
