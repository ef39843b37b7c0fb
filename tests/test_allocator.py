"""``midol_hub.allocator.keep_freed_memory``: freed tensor memory is reused, not faulted in anew."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, resource, sys, torch
from midol_hub.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(10):  # 64 MiB allocated, written and freed, as a forward's activations are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def probe(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_freed_tensor_memory_is_reused_without_page_faults():
    default, kept = probe("default"), probe("keep")
    assert kept["applied"] is True  # CI and these machines run Linux with glibc
    pages = (64 << 20) // 4096
    # glibc's default: each 64 MiB block is a fresh mmap, faulted in page by page; kept: the heap
    # holds the freed block for the next one (an occasional re-fault where the heap moved)
    assert min(default["faults"][1:]) > pages // 2
    assert sum(kept["faults"][1:]) < sum(default["faults"][1:]) / 4
    assert sorted(kept["faults"][1:])[4] < pages // 100
