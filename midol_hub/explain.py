"""Why ``modality="auto"`` chose an expert: per-patch routing maps.

M-IDoL's router is a bias-free linear layer on the mean of the final-stage tokens, so the router
logits of each token average *exactly* to the image's routing logits: the map of per-token logits
is a faithful decomposition of the routing decision, not an approximation of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .encoding import Encoding
from .image_io import read_any
from .modeling_midol import MIDoLModel
from .preprocessing import WarningCollector
from .utils import atomic_write


def _encode_with_maps(model: MIDoLModel, images: Any, **encode_kwargs: Any) -> tuple[Encoding, torch.Tensor]:
    encoding = model.encode(images, modality="auto", output="patch_tokens", **encode_kwargs)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoding, maps = _encode_with_maps(model, paths, **encode_kwargs)
    written = []
    for row, (index, frame) in enumerate(zip(encoding.indices, encoding.frames)):
        pixels = read_any(paths[index], index, WarningCollector(), frame).pixels
        image = pixels[:, :, 0] if pixels.shape[-1] in (1, 2) else pixels[:, :, :3]
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
        with atomic_write(target) as tmp:
            figure.savefig(tmp, format="png", bbox_inches="tight")
        plt.close(figure)
        written.append(target)
    return written
