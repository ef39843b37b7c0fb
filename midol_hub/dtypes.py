"""Precision names users may pass (``"bf16"``, ``"fp32"``...) and the torch dtypes they mean."""

from __future__ import annotations

import torch

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None`` or a torch dtype as given; a name from ``_DTYPES`` as its dtype; else ValueError."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or a torch.dtype")
    return _DTYPES[key]
