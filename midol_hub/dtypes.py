"""Precision names users may pass (``"bf16"``, ``"fp32"``, ``"auto"``...), the torch dtypes they
mean, and whether this machine computes bf16 natively."""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path

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
AUTO = "auto"
BF16_CPU_SLOWDOWN = 6  # measured on an AVX2 CPU without native bf16: bf16_speedup_ratio 0.16 (issue 19)


def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native bf16 features as PyTorch detects them: AVX-512 BF16 and AMX tiles."""
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return tuple(name for name, check in checks.items() if getattr(torch.cpu, check, lambda: False)())


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively: CUDA with bf16 support, or a CPU with AVX-512 BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_bf16_flags())


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device | str = "cpu") -> torch.dtype | None:
    """``None`` or a torch dtype as given; a name from ``_DTYPES`` as its dtype; ``"auto"`` as bf16 where
    ``device`` computes it natively, else fp32. Asking for bf16 on a CPU without native bf16 warns
    once (it is several times slower there). Anything else is a ValueError."""
    if isinstance(dtype, str) and dtype.strip().lower() == AUTO:
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype is not None and not isinstance(dtype, torch.dtype):
        key = str(dtype).lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {AUTO}, {', '.join(_DTYPES)} or a torch.dtype")
        dtype = _DTYPES[key]
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not native_bf16("cpu"):
        _warn_slow_bf16()
    return dtype


@functools.cache
def _warn_slow_bf16() -> None:
    warnings.warn(f"this CPU has no native bf16 (no AVX-512 BF16, no AMX): bf16 runs about {BF16_CPU_SLOWDOWN}x slower "
                  "than fp32 here; use dtype='auto' (fp32 on this machine)", UserWarning, stacklevel=4)


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def supported_precisions(device: torch.device | str = "cpu") -> dict[str, object]:
    """What ``midol info`` prints about this machine: its CPU, native bf16, and what ``dtype="auto"`` picks."""
    return {"device": str(device), "cpu": cpu_name(), "cores": os.cpu_count(), "native_bf16": native_bf16(device),
            "cpu_bf16_features": list(cpu_bf16_flags()), "auto": str(parse_dtype(AUTO, device)).removeprefix("torch.")}
