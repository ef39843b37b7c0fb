"""Keep freed CPU tensor memory in the process, so forwards and training steps stop paying page faults.

glibc's ``malloc`` gives every allocation above a threshold (128 KiB, raised as such blocks are
freed, up to 32 MiB) its own ``mmap`` and gives the top of its heap back to the system after
large frees. A forward of batch 16 at 224 px allocates activations of 10-80 MB, layer after
layer: each comes back from the kernel as fresh zeroed pages, so the CPU spends about as long
in the kernel faulting pages in as in the convolutions (EfficientNet-Lite0 on 2 cores: 1.6 s
system time beside 1.7 s user time for 64 images). :func:`keep_freed_memory` turns both off
through ``mallopt``: freed blocks stay in the heap for the next batch, and the process keeps
its peak memory (plus up to :data:`TRIM_THRESHOLD`) until it exits. ``python -m benchmarks.run``
measures the speed-up (``allocator_speedup_ratio``) in separate processes side by side.

The ``midol`` commands and ``training`` call it; a script that encodes or trains many batches
on the CPU can call it once at its start. Libraries that share the process with other work are
better off without it: memory the process frees is not returned to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

TRIM_THRESHOLD = 1 << 30
"""Free memory at the heap's top that glibc still keeps (bytes); beyond it, it gives it back."""

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no per-allocation ``mmap``, heap trimmed only past
    :data:`TRIM_THRESHOLD`). Returns whether it applies: True on Linux with glibc (also when
    already applied), False elsewhere (macOS, Windows, musl), where it changes nothing."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # one arena: other threads' arenas are mmap'd heaps of at most 64 MiB that shrink after frees
    _applied = all(mallopt(option, value) for option, value in
                   ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _applied
