"""Training checkpoints: atomic writes, the last N kept, everything needed to resume exactly."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midol_hub.utils import atomic_write

PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and ints (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": pos,
        "numpy_gauss": (has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoint-<step>.pt`` via a temporary file and rename; delete all but the last ``keep``."""
    target = directory / f"checkpoint-{step:08d}.pt"
    with atomic_write(target) as tmp:
        torch.save(payload, tmp)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink()
    return target


def list_checkpoints(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("checkpoint-*.pt") if PATTERN.search(p.name))


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
