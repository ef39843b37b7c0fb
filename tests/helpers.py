"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from midol_hub import MIDoLConfig, MIDoLModel, get_entry

from .reference_swin import relative_position_index

REPO = Path(__file__).resolve().parents[1]


def midol(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``midol ARGS`` in a fresh process (one thread, this checkout importable from ``cwd``)."""
    return subprocess.run([sys.executable, "-m", "midol_hub.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=env or {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def start_midol(*args: str) -> subprocess.Popen:
    """``midol ARGS`` started in the background, its output piped as text."""
    return subprocess.Popen([sys.executable, "-m", "midol_hub.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def write_dicom(path, pixels: np.ndarray, modality: str, preamble: bool = True, **attributes: str) -> None:
    """A DICOM file of real pixels: MONOCHROME2 (8 or 16 bits) or RGB, one frame or (F, H, W) frames;
    ``attributes`` set more elements (StudyInstanceUID, say)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.Modality, ds.PatientID = modality, "test"
    for name, value in attributes.items():
        setattr(ds, name, value)
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3
    ds.set_pixel_data(pixels, "RGB" if colour else "MONOCHROME2", 8 * pixels.dtype.itemsize)
    if not preamble:
        ds.preamble = None
    ds.save_as(path, enforce_file_format=preamble)


def kill_after_parts(cli_args: list[str], parts: Path, count: int) -> int:
    """Run ``midol CLI_ARGS`` and SIGKILL it once ``parts`` holds ``count`` part files (a run
    killed half-way); returns how many parts it had written."""
    import time

    process = subprocess.Popen([sys.executable, "-m", "midol_hub.cli", *cli_args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("*.npz")) if parts.exists() else []) < count:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its decoding workers, which else hold its lock a moment longer
    process.wait()
    return len(list(parts.glob("*.npz")))


def make_micro(seed: int = 0, **overrides) -> MIDoLModel:
    """A seeded random midol-micro model (no download, no warning)."""
    torch.manual_seed(seed)
    config = get_entry("midol-micro").make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return MIDoLModel(config).eval()



def free_port() -> int:
    """A TCP port the OS has just handed out (so concurrent suites do not collide on fixed ports)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args: str, ranks: int = 2, timeout: int = 600, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` on a free local port, one thread per rank."""
    command = torchrun_command(*args, ranks=ranks)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def torchrun_command(*args: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            f"--nproc_per_node={ranks}", *args]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, found by their parent pids (torchrun starts its
    workers in sessions of their own, so a process group would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    family, queue = [], [pid]
    while queue:
        current = queue.pop()
        family.append(current)
        queue += children.get(current, [])
    for member in family:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


# A small Swin in Microsoft's layout and a Tutel MoE head, for the conversion tests
ARCH = dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4, img_size=64, patch_size=2)
E, HIDDEN, K = 5, 64, 128


def microsoft_backbone(seed: int) -> dict[str, torch.Tensor]:
    """Random Swin weights in Microsoft's layout, with its persistent buffers."""
    torch.manual_seed(seed)
    timm_model = MIDoLModel(MIDoLConfig(**ARCH, hidden_dim=HIDDEN)).backbone
    state = {}
    for key, value in timm_model.state_dict().items():
        if "relative_position_index" in key or "attn_mask" in key:
            continue
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        state[key] = torch.randn_like(value) * 0.1 + (1.0 if key.endswith("norm.weight") or "norm1.weight" in key or "norm2.weight" in key else 0.0)
    for i, depth in enumerate(ARCH["depths"]):
        for j in range(depth):
            state[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = relative_position_index(4)
    # stage 0 at 32x32 tokens has 64 windows of 16 tokens: the mask tells the image size
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 16, 16)
    return state


def tutel_state(seed: int, local_experts: int = E) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    p, d = "mlp._moe_layer.", 256
    return {
        p + "gates.0.wg.weight": torch.randn(E, d) * 0.05,
        p + "experts.batched_fc1_w": torch.randn(local_experts, HIDDEN, d) * 0.05,
        p + "experts.batched_fc2_w": torch.randn(local_experts, HIDDEN, d) * 0.05,
        p + "experts.batched_fc1_bias": torch.randn(local_experts, HIDDEN) * 0.1,
        p + "experts.batched_fc2_bias": torch.randn(local_experts, d) * 0.1,
        "last_layer.weight_g": torch.ones(K, 1),
        "last_layer.weight_v": torch.randn(K, d),
    }


def prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


COMMIT_OLD = "a" * 40
COMMIT_NEW = "b" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, model_dir: Path, refs: tuple[str, ...]) -> None:
    """Lay out files the way huggingface_hub stores them: blobs by hash, snapshots as symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


