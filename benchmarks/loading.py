"""Loading cost: peak memory added by load_model per byte of weights, and its time against
timm's create_model + load_state_dict of the same weights, each in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from midol_hub import load_model

PROBE = """
import json, os, sys, time
import torch

def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

import midol_hub, timm
from safetensors.torch import load_file
directory, how = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_mb("VmRSS:")
start = time.perf_counter()
if how == "midol":
    model = midol_hub.load_model(directory)
else:
    config = json.load(open(os.path.join(directory, "config.json")))
    model = midol_hub.MIDoLModel(midol_hub.MIDoLConfig.from_dict(config))
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
seconds = time.perf_counter() - start
with torch.no_grad():
    model(torch.zeros(1, 3, model.config.img_size, model.config.img_size))
print(json.dumps({"seconds": seconds, "peak_mb": status_mb("VmHWM:") - before}))
"""


def _probe(directory: Path, how: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, str(directory), how], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(arch: str = "midol-swin-base", repeats: int = 3) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        load_model(arch, pretrained=False).save_pretrained(tmp)
        size_mb = (Path(tmp) / "model.safetensors").stat().st_size / 2**20
        ours, timm_way = [], []
        for _ in range(repeats):  # interleaved, fresh processes
            ours.append(_probe(Path(tmp), "midol"))
            timm_way.append(_probe(Path(tmp), "timm"))
    median = lambda runs, key: sorted(r[key] for r in runs)[len(runs) // 2]  # noqa: E731
    return {
        "load_peak_rss_ratio": median(ours, "peak_mb") / size_mb,
        "load_time_ratio": median(ours, "seconds") / median(timm_way, "seconds"),
        "load_seconds": median(ours, "seconds"),
    }
