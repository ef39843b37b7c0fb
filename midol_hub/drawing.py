"""The one place that sets up matplotlib and writes figures (atomically) for the pictures the
package draws: routing maps, class heatmaps, search results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .utils import atomic_write


def displayable(pixels: np.ndarray) -> np.ndarray:
    """A decoded image's (H, W, C) pixels as shown: grey (H, W) for one channel (and grey with
    alpha), RGB (H, W, 3) otherwise (alpha dropped)."""
    return pixels[:, :, 0] if pixels.shape[-1] in (1, 2) else pixels[:, :, :3]


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, or a clear error without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("drawing needs matplotlib: pip install 'midol-hub[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, target: Path) -> Path:
    """Write ``figure`` as a PNG to ``target`` (whole or not at all) and close it."""
    with atomic_write(target) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")
    pyplot().close(figure)
    return target
