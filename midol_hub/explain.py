"""Why the model answered as it did: per-patch routing maps and class heatmaps.

- **Routing maps** (:func:`routing_map`). M-IDoL's router is a bias-free linear layer on the mean
  of the final-stage tokens, so the router logits of each token average *exactly* to the image's
  routing logits: the map of per-token logits is a faithful decomposition of the routing
  decision, not an approximation of it.
- **Class heatmaps** (:func:`class_heatmap`) for a fine-tuned classifier: class-activation maps
  on the last Swin stage from the ``grad-cam`` library (Grad-CAM by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .drawing import displayable, pyplot, save_figure
from .encoding import Encoding
from .image_io import read_any
from .modeling_midol import MIDoLModel
from .preprocessing import WarningCollector
from .tasks import MIDoLForImageClassification


def _encode_with_maps(model: MIDoLModel, images: Any, **encode_kwargs: Any) -> tuple[Encoding, torch.Tensor]:
    encoding = model.encode(images, modality="auto", output=("embedding", "pooled", "patch_tokens"), **encode_kwargs)
    weight = model.head.router.weight.detach().float().cpu()  # (E, D)
    return encoding, torch.einsum("bdhw,ed->behw", encoding.patch_tokens, weight)


def routing_map(model: MIDoLModel, images: Any, **encode_kwargs: Any) -> torch.Tensor:
    """(B, E, h, w) router logits of every final-stage token (h = w = S / 32 for Swin); their
    spatial mean is each image's routing logits. ``encode_kwargs`` go to :meth:`MIDoLModel.encode`
    (``frames=``, ``errors=``, ...); the rows follow that call's ``indices`` and ``frames``."""
    return _encode_with_maps(model, images, **encode_kwargs)[1]


def draw_routing_maps(model: MIDoLModel, paths: list[str], out_dir: str | Path, **encode_kwargs: Any) -> list[Path]:
    """One PNG per image: the image with the map of the expert ``auto`` chose laid over it, beside the
    maps of every expert on one colour scale; the title names the answer and its confidence."""
    return encode_and_draw_routing_maps(model, paths, out_dir, **encode_kwargs)[1]


def encode_and_draw_routing_maps(model: MIDoLModel, paths: list[str], out_dir: str | Path,
                                 **encode_kwargs: Any) -> tuple[Encoding, list[Path]]:
    """:func:`draw_routing_maps`, also returning the encoding the maps came from (with its
    ``embedding`` and ``pooled``), so a caller that needs both runs the model once."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoding, maps = _encode_with_maps(model, paths, **encode_kwargs)
    written = []
    for row, (index, frame) in enumerate(zip(encoding.indices, encoding.frames)):
        pixels = read_any(paths[index], index, WarningCollector(), frame).pixels
        image = displayable(pixels)
        chosen = int(encoding.expert_index[row])
        experts = maps[row].numpy()
        low, high = float(experts.min()), float(experts.max())
        figure = plt.figure(figsize=(4 + 1.6 * len(experts), 3.6), dpi=110)
        grid = figure.add_gridspec(2, 1 + len(experts), width_ratios=[2.5] + [1] * len(experts), height_ratios=[6, 1])
        main = figure.add_subplot(grid[:, 0])
        main.imshow(image, cmap="gray" if image.ndim == 2 else None)
        main.imshow(experts[chosen], cmap="magma", alpha=0.5, extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5),
                    interpolation="bilinear", vmin=low, vmax=high)
        main.set_axis_off()
        answer = encoding.modality[row]
        main.set_title(f"{Path(str(paths[index])).name}{'' if frame is None else f' [frame {frame}]'}\n"
                       f"{answer} (confidence {float(encoding.confidence[row]):.2f}; {encoding.modality_source[row]})",
                       fontsize=9)
        for e, expert in enumerate(experts):
            axes = figure.add_subplot(grid[0, 1 + e])
            shown = axes.imshow(expert, cmap="magma", vmin=low, vmax=high)
            axes.set_title(f"{encoding.experts[e]}\nmean {expert.mean():.2f}" + (" *" if e == chosen else ""), fontsize=8)
            axes.set_axis_off()
        figure.colorbar(shown, cax=figure.add_subplot(grid[1, 1:]), orientation="horizontal",
                        label="router logit per patch (the image's logit is the mean)")
        target = out_dir / f"{Path(str(paths[index])).stem}{'' if frame is None else f'-frame{frame}'}.png"
        written.append(save_figure(figure, target))
    return encoding, written


CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam")
"""Class-activation methods of the ``grad-cam`` library that :func:`class_heatmap` offers."""


@dataclass
class ClassHeatmaps:
    """Result of :func:`class_heatmap`.

    Attributes:
        heat: (B, S, S) in [0, 1] on the model's input grid (the preprocessed image).
        target: (B,) the class each map explains.
        probability: (B,) the model's probability of that class.
        pixels: (B, 3, S, S) the preprocessed images the maps lie on.
    """

    heat: torch.Tensor
    target: torch.Tensor
    probability: torch.Tensor
    pixels: torch.Tensor


class _Logits(nn.Module):
    """The classifier as grad-cam wants it: pixels -> logits."""

    def __init__(self, classifier: MIDoLForImageClassification) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixel_values).logits


def _nchw(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.permute(0, 3, 1, 2)  # timm's Swin stages are (B, H, W, C)


def _last_stage(backbone: nn.Module) -> tuple[nn.Module, Any]:
    """The layer whose activations a CAM weighs, and how to make them NCHW: a Swin's last stage, a
    CNN's final feature map (after its head convolution and norm)."""
    if hasattr(backbone, "layers"):
        return backbone.layers[-1], _nchw
    return (backbone.bn2 if hasattr(backbone, "bn2") else backbone.blocks[-1]), None


def class_heatmap(model: MIDoLForImageClassification, images: Any, target: int | Sequence[int] | None = None,
                  method: str = "gradcam", batch_size: int = 16) -> ClassHeatmaps:
    """Class-activation maps of a fine-tuned classifier on its backbone's last stage.

    Args:
        images: as :meth:`MIDoLModel.encode` takes them, preprocessed with the model's task modality.
        target: the class to explain: one for all images, one per image, or None for each
            image's predicted class. Multi-label models explain one label at a time.
        method: one of :data:`CAM_METHODS` (the ``grad-cam`` library's implementations).
    """
    try:
        from pytorch_grad_cam import (
            EigenCAM,
            GradCAM,
            GradCAMPlusPlus,
            HiResCAM,
            LayerCAM,
            XGradCAM,
        )
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise ImportError("class heatmaps need the grad-cam library: pip install 'midol-hub[explain]'") from None
    if not isinstance(model, MIDoLForImageClassification):
        raise TypeError(f"class_heatmap needs a MIDoLForImageClassification, got {type(model).__name__}; "
                        "for why modality='auto' chose an expert, use routing_map")
    methods = dict(zip(CAM_METHODS, (GradCAM, GradCAMPlusPlus, HiResCAM, XGradCAM, LayerCAM, EigenCAM)))
    if method not in methods:
        raise ValueError(f"method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    device = next(model.parameters()).device
    pixels = model.preprocess(images)
    classes = model.config.num_labels
    targets = None
    if target is not None:
        targets = torch.as_tensor([target] * len(pixels) if isinstance(target, int) else list(target), dtype=torch.long)
        if targets.shape != (len(pixels),):
            raise ValueError(f"target gives {targets.numel()} class(es) for {len(pixels)} image(s); give one, or one per image")
        if bool(((targets < 0) | (targets >= classes)).any()):
            raise ValueError(f"target classes must lie in 0..{classes - 1} ({', '.join(model.config.id2label.values())})")
    was_training = model.training
    model.eval()
    heat, probability, explained = [], [], []
    try:
        layer, reshape = _last_stage(model.midol.backbone)
        with methods[method](_Logits(model), target_layers=[layer], reshape_transform=reshape) as cam:
            for start in range(0, len(pixels), batch_size):
                chunk = pixels[start : start + batch_size]
                # without a target, grad-cam explains each image's top class from the same forward pass
                wanted = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets[start : start + batch_size]]
                maps = cam(chunk.to(device), targets=wanted)
                heat.append(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)))
                logits = cam.outputs.detach().float().cpu()
                chosen = logits.argmax(-1) if targets is None else targets[start : start + batch_size]
                scores = logits.sigmoid() if model.config.problem_type == "multi_label_classification" else logits.softmax(-1)
                probability.append(scores.gather(1, chosen[:, None]).squeeze(1))
                explained.append(chosen)
    finally:
        model.train(was_training)
    return ClassHeatmaps(torch.cat(heat), torch.cat(explained), torch.cat(probability), pixels)


def draw_class_heatmaps(model: MIDoLForImageClassification, paths: list[str], out_dir: str | Path,
                        target: int | None = None, method: str = "gradcam") -> list[Path]:
    """One PNG per image: the image as the classifier sees it (its task modality's preprocessing),
    beside the same with the class heatmap laid over it; the title names the explained class
    and the model's probability of it."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    maps = class_heatmap(model, paths, target=target, method=method)
    profile = model.config.profile(model.config.task_modality or "auto")
    mean, std = torch.tensor(profile.mean)[:, None, None], torch.tensor(profile.std)[:, None, None]
    names = model.config.id2label
    written = []
    for row, path in enumerate(paths):
        image = (maps.pixels[row] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        figure, (plain, overlaid) = plt.subplots(1, 2, figsize=(6.4, 3.6), dpi=110)
        for axes in (plain, overlaid):
            axes.imshow(image, interpolation="nearest")
            axes.set_axis_off()
        shown = overlaid.imshow(maps.heat[row].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        figure.colorbar(shown, ax=overlaid, fraction=0.046, pad=0.04, label=f"{method} heat")
        label = names.get(int(maps.target[row]), str(int(maps.target[row])))
        figure.suptitle(f"{Path(str(path)).name}: {label} (p={float(maps.probability[row]):.2f})", fontsize=9)
        written.append(save_figure(figure, out_dir / f"{Path(str(path)).stem}-{method}.png"))
    return written
