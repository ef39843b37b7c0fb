"""Convert official M-IDoL checkpoints (Microsoft Swin layout + Tutel MoE head) to midol_hub models.

Accepted inputs:
  * the official training checkpoint: ``{"student", "teacher", "optimizer", "epoch", "args", "dino_loss"}``
    (student keys carry DDP's ``module.`` prefix; the teacher is used by default);
  * the released ``M-IDoL.pth``: a flat dict of ``backbone.*`` (and ``head.*``) tensors;
  * a bare Swin state dict in Microsoft's or timm's layout, or Microsoft's ImageNet release
    ``{"model": ...}`` (backbone only, as an initialisation for training);
  * any of these stored as ``.safetensors``.

Pickles are read with ``torch.load(weights_only=True)``: only tensors, containers and
``argparse.Namespace`` are allowed, so a checkpoint that would run code is refused.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.models.swin_transformer import checkpoint_filter_fn

from .configuration_midol import MIDoLConfig
from .errors import CheckpointError, WeightsMismatchError
from .modalities import MODALITIES
from .modeling_midol import MIDoLModel, nonfinite_tensors
from .registry import get_entry

SAFE_GLOBALS = [argparse.Namespace]
TUTEL_PREFIX = "mlp._moe_layer."
OFFICIAL_TOP_K = 4  # MoEHead(top_value=4) in the official code
TUTEL_EXPERT_KEYS = ("experts.batched_fc1_w", "experts.batched_fc1_bias", "experts.batched_fc2_w", "experts.batched_fc2_bias")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint without executing code: safetensors, or a weights-only pickle."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(error))
        if refused is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated)") from None
        raise CheckpointError(
            f"{path}: refused to unpickle: it references {refused.group(1)}, beyond tensors and "
            "argparse.Namespace, so loading it could run code. Nothing was executed. If you trust the "
            "file, re-save its state dict with torch.save(state_dict) or as safetensors."
        ) from None
    except Exception as error:  # torch.load raises many types for damaged files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(checkpoint).__name__}")
    return checkpoint


def convert_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    use: str = "teacher",
    arch: str | None = None,
    img_size: int | None = None,
    backbone_only: bool = False,
) -> MIDoLModel:
    """Turn an official checkpoint into a :class:`MIDoLModel`, saved to ``out_dir`` when given.

    ``use`` picks ``"teacher"`` (default, as DINO evaluates) or ``"student"`` from a training
    checkpoint. ``arch`` takes the architecture from a registry name instead of inferring it
    from tensor shapes; ``img_size`` overrides the inferred input size (default 224).
    A checkpoint without a complete MoE head (none, a per-rank part, another head layout) is
    refused unless ``backbone_only=True``: the model is then marked backbone-only, ``encode``
    returns its pooled features and refuses expert embeddings.
    """
    if use not in ("teacher", "student"):
        raise ValueError(f"use must be 'teacher' or 'student', got {use!r}")
    checkpoint = read_checkpoint(src)
    state, args = _select_state(checkpoint, use, src)
    backbone_state, head_state = _split(state)
    if not backbone_state:
        raise CheckpointError(f"{src}: no Swin backbone tensors found (expected patch_embed.*, layers.*, norm.*)")

    problem = _head_problem(head_state)
    if problem is not None and not backbone_only:
        raise CheckpointError(
            f"{src}: {problem}, so the converted experts would be random. To convert the Swin backbone alone, pass "
            "backbone_only=True (midol convert --backbone-only): encode then returns its pooled features."
        )
    damaged = nonfinite_tensors({**backbone_state, **({} if backbone_only else head_state)})
    if damaged:
        raise CheckpointError(f"{src}: {len(damaged)} tensor(s) hold NaN or Inf, first: {damaged[0]}; the checkpoint is "
                              "damaged (or saved from a diverged run): convert an earlier one")
    config = _config_from_shapes(backbone_state, {} if backbone_only else head_state, args, arch, img_size, backbone_only)
    model = MIDoLModel(config)
    converted = {f"backbone.{k}": v for k, v in checkpoint_filter_fn(backbone_state, model.backbone).items()}
    head = {} if backbone_only else _convert_head(head_state, config)
    converted.update(head)
    expected = model.state_dict()
    misshaped = [f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
                 for key, value in converted.items() if key in expected and value.shape != expected[key].shape]
    if misshaped:
        raise WeightsMismatchError(f"{src}: {len(misshaped)} tensor(s) do not fit the architecture inferred from the "
                                   f"others, first: {misshaped[0]}; the checkpoint is inconsistent (edited or damaged)")
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if head or not k.startswith("head.")]
    if missing or unexpected:
        raise WeightsMismatchError(
            f"{src}: converted weights do not fit the inferred architecture "
            f"(missing: {', '.join(missing[:8]) or 'none'}; unexpected: {', '.join(unexpected[:8]) or 'none'})"
        )
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def _select_state(checkpoint: dict, use: str, src: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Pick the network weights out of the checkpoint's wrapper, and its training args if any."""
    args = checkpoint.get("args")
    if "teacher" in checkpoint or "student" in checkpoint:
        if use not in checkpoint:
            raise CheckpointError(f"{src}: training checkpoint has no {use!r} weights")
        state = checkpoint[use]
    elif isinstance(checkpoint.get("model"), dict):
        state = checkpoint["model"]
    elif isinstance(checkpoint.get("state_dict"), dict):
        state = checkpoint["state_dict"]
    else:
        state = checkpoint
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{src}: no tensors found in the checkpoint")
    return tensors, args


def _split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate backbone and MoE-head tensors; a bare Swin state dict has no prefix."""
    has_prefix = any(k.startswith("backbone.") for k in state)
    backbone, head = {}, {}
    for key, value in state.items():
        if has_prefix and key.startswith("backbone."):
            backbone[key.removeprefix("backbone.")] = value
        elif key.startswith("head.") and (has_prefix or TUTEL_PREFIX in key or "last_layer" in key):
            head[key.removeprefix("head.")] = value
        elif not has_prefix and not key.startswith("head"):
            backbone[key] = value
    return backbone, head


def _config_from_shapes(
    backbone: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    args: Any,
    arch: str | None,
    img_size: int | None,
    backbone_only: bool = False,
) -> MIDoLConfig:
    if arch is not None:
        entry = get_entry(arch)
        if entry is None:
            raise CheckpointError(f"unknown --arch {arch!r}")
        base: dict[str, Any] = dict(entry.config)
    else:
        base = _swin_shapes(backbone)
    if img_size is not None:
        base["img_size"] = img_size
    gate = head.get(TUTEL_PREFIX + "gates.0.wg.weight")
    fc1 = head.get(TUTEL_PREFIX + "experts.batched_fc1_w")
    if gate is not None and fc1 is not None and fc1.shape[0] == gate.shape[0]:
        base.update(num_experts=gate.shape[0], hidden_dim=fc1.shape[1], top_k=min(OFFICIAL_TOP_K, gate.shape[0]))
        prototypes = _prototype_tensors(head)
        if prototypes is not None:
            base.update(num_prototypes=prototypes[1].shape[0], keep_prototypes=True)
    elif args is not None and getattr(args, "out_dim", None):
        base["num_prototypes"] = int(args.out_dim)
    num_experts = base.get("num_experts", 5)
    base.setdefault("expert_modalities", _default_experts(num_experts))
    if backbone_only:
        base.update(backbone_only=True, default_output=["pooled"])
    return MIDoLConfig(**base)


def _default_experts(num_experts: int) -> list[str]:
    if num_experts != len(MODALITIES):
        raise CheckpointError(
            f"the checkpoint has {num_experts} experts; midol_hub assigns one expert per modality "
            f"({len(MODALITIES)}). Pass --arch or calibrate expert_modalities after conversion."
        )
    return list(MODALITIES)


def _swin_shapes(backbone: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer embed dim, patch size, depths, heads, window and image size from tensor shapes."""
    try:
        proj = backbone["patch_embed.proj.weight"]
    except KeyError:
        raise CheckpointError("cannot infer the Swin architecture: patch_embed.proj.weight is missing") from None
    blocks: dict[int, set[int]] = defaultdict(set)
    heads: dict[int, int] = {}
    for key, value in backbone.items():
        match = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage].add(block)
            if key.endswith("attn.relative_position_bias_table"):
                heads[stage] = value.shape[1]
    stages = sorted(blocks)
    table = backbone["layers.0.blocks.0.attn.relative_position_bias_table"]
    window = (math.isqrt(table.shape[0]) + 1) // 2
    shape = {
        "embed_dim": proj.shape[0],
        "patch_size": proj.shape[-1],
        "depths": [len(blocks[s]) for s in stages],
        "num_heads": [heads[s] for s in stages],
        "window_size": window,
        "img_size": 224,
    }
    mask = backbone.get("layers.0.blocks.1.attn_mask")  # Microsoft layout keeps the shift mask: (nW, w*w, w*w)
    if mask is not None:
        shape["img_size"] = math.isqrt(mask.shape[0]) * window * shape["patch_size"]
    return shape


def _prototype_tensors(head: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    for g_key, v_key in (
        ("last_layer.weight_g", "last_layer.weight_v"),
        ("last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"),
    ):
        if g_key in head and v_key in head:
            return head[g_key], head[v_key]
    return None


def _head_problem(head: dict[str, torch.Tensor]) -> str | None:
    """Why ``head`` is not a complete Tutel MoE head, or None when it is."""
    if not head:
        return "the checkpoint holds no MoE head"
    gate = head.get(TUTEL_PREFIX + "gates.0.wg.weight")
    if gate is None:
        sample = ", ".join(sorted(head)[:3])
        return f"its head is not a Tutel MoE head (keys such as {sample}: a plain DINO head?)"
    missing = [name for name in TUTEL_EXPERT_KEYS if TUTEL_PREFIX + name not in head]
    if missing:
        return f"its MoE head lacks {', '.join(missing)}"
    experts = head[TUTEL_PREFIX + "experts.batched_fc1_w"].shape[0]
    if experts != gate.shape[0]:
        return (f"its MoE head holds {experts} of {gate.shape[0]} experts (a multi-GPU Tutel checkpoint saved by one "
                "rank; re-save it with all experts gathered)")
    return None


def _convert_head(head: dict[str, torch.Tensor], config: MIDoLConfig) -> dict[str, torch.Tensor]:
    """Map a complete Tutel MoE head (see ``_head_problem``) onto MoEProjector."""
    gate = head[TUTEL_PREFIX + "gates.0.wg.weight"]
    fc1 = head[TUTEL_PREFIX + "experts.batched_fc1_w"]
    num_experts, dim = config.num_experts, config.num_features
    out = {
        "head.router.weight": gate,
        "head.fc1_weight": fc1,
        "head.fc1_bias": head[TUTEL_PREFIX + "experts.batched_fc1_bias"].reshape(num_experts, -1),
        "head.fc2_weight": head[TUTEL_PREFIX + "experts.batched_fc2_w"],
        "head.fc2_bias": head[TUTEL_PREFIX + "experts.batched_fc2_bias"].reshape(num_experts, dim),
    }
    prototypes = _prototype_tensors(head)
    if prototypes is not None:
        out["head.prototypes.parametrizations.weight.original0"] = prototypes[0]
        out["head.prototypes.parametrizations.weight.original1"] = prototypes[1]
    return out
