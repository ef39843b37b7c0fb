"""Encoding large archives: DataLoader workers decode, results are written in parts as they come,
a killed run resumes where it stopped, and ``torchrun`` spreads the files over processes.

``midol encode`` runs this. With N ranks (``torchrun --nproc_per_node=N -m midol_hub.cli encode``)
rank r encodes files r, r + N, ... (on its own GPU when there are GPUs) into
``OUT.parts/rank-RRR-part-PPPPPP.npz``; rank 0 then merges every part into OUT and its manifest,
in input order, and removes the parts.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .encoding import (
    Failure,
    Plan,
    concat_encodings,
    encode_planned,
    expand_frames,
    plan_row,
    preprocess_planned,
)
from .errors import ImageReadError, ModalityMismatchWarning
from .image_io import read_any
from .modalities import AUTO, canonical_modality
from .modeling_midol import MIDoLModel
from .preprocessing import WarningCollector
from .utils import atomic_write

PART = re.compile(r"rank-(\d{3})-part-(\d{6})\.npz$")
ROW_FIELDS = ("modality", "modality_source", "unknown_reason")


def default_workers() -> int:
    """DataLoader workers for decoding: the cores the model's own thread leaves, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class _Rows(torch.utils.data.Dataset):
    """Row i (a file, or one frame of it) -> (i, normalised tensor, plan) or (i, error message),
    read, planned and preprocessed in a worker."""

    def __init__(self, files: Sequence[str], rows: list[tuple[int, int | None]], config: Any, forced: str | None) -> None:
        self.files, self.rows, self.config, self.forced = files, rows, config, forced

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | str, Plan | None]:
        index, frame = self.rows[position]
        try:
            raw = read_any(self.files[index], index, WarningCollector(), frame)
            plan = plan_row(self.config, self.forced, raw.dicom_modality)
            return position, preprocess_planned(self.config, [raw], [plan], WarningCollector())[0], plan
        except ImageReadError as error:
            return position, error.reason, None


def _collate(items: list) -> list:
    return items


@dataclass
class BulkResult:
    """The merged output: arrays by name (rows in input order), the manifest rows and the failures."""

    arrays: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    failures: list[dict[str, str]]


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def encode_files(model: MIDoLModel, files: Sequence[str], out: Path, *, modality: str, outputs: Sequence[str],
                 batch_size: int = 32, dtype: torch.dtype | None = None, workers: int | None = None,
                 errors: str = "raise", part_size: int = 1024, resume: bool = False, rank: int = 0,
                 world: int = 1, progress: bool = True, frames: str | int | None = None) -> int:
    """Encode this rank's share of ``files`` into part files beside ``out``; returns how many of
    its rows earlier parts already held (0 unless ``resume``). An unreadable file stops the run
    (naming it) unless ``errors="skip"``, which records it in the part instead. ``frames`` expands
    multi-frame files as in :meth:`MIDoLModel.encode`."""
    from tqdm.auto import tqdm

    directory = parts_dir(out)
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in directory.iterdir() if (m := PART.match(p.name)) and int(m.group(1)) == rank)
    if existing and not resume:
        raise FileExistsError(f"{directory} holds parts of an earlier run; pass --resume to continue it, "
                              "or delete the folder to start again")
    done: set[tuple[int, int]] = set()
    failed_before: set[int] = set()
    for part in existing:
        with np.load(part) as data:
            done.update(zip(data["indices"].tolist(), data["frames"].tolist()))
            failed_before.update(json.loads(str(data["failures"]))["indices"])
    counting_failures: list[Failure] = []
    mine = [i for i in range(rank, len(files), world) if i not in failed_before]
    expanded = expand_frames([files[i] for i in mine], frames, errors, counting_failures)
    rows = [(mine[position], frame) for _, position, frame in expanded]
    todo = [row for row in rows if (row[0], -1 if row[1] is None else row[1]) not in done]
    forced = None if canonical_modality(modality, allow_auto=True) == AUTO else canonical_modality(modality)
    loader = torch.utils.data.DataLoader(_Rows(files, todo, model.config, forced), batch_size=batch_size,
                                         collate_fn=_collate, num_workers=default_workers() if workers is None else workers)
    encode_outputs = [o for o in outputs if o != "routing"] or ["embedding"]
    buffer: list = []
    failures: dict[str, list] = {"indices": [], "paths": [], "errors": []}
    for failure in counting_failures:
        failures["indices"].append(mine[failure.index])
        failures["paths"].append(failure.source)
        failures["errors"].append(failure.error)
    buffered, part_number = 0, len(existing)
    conflicts: list[tuple[str, str]] = []

    def flush() -> None:
        nonlocal buffer, failures, buffered, part_number
        if not buffer and not failures["indices"]:
            return
        arrays = _concat_parts(buffer, outputs, model.config, encode_outputs, model.provenance)
        target = directory / f"rank-{rank:03d}-part-{part_number:06d}.npz"
        with atomic_write(target) as tmp, open(tmp, "wb") as handle:  # a killed run leaves whole parts only
            np.savez(handle, **arrays, failures=np.array(json.dumps(failures)))
        buffer, failures, buffered, part_number = [], {"indices": [], "paths": [], "errors": []}, 0, part_number + 1

    with tqdm(total=len(todo), disable=not progress or rank != 0, unit="img", desc="encode") as bar:
        for items in loader:
            good = [(todo[p], x, plan) for p, x, plan in items if plan is not None]
            for position, reason, _ in (item for item in items if item[2] is None):
                index = todo[position][0]
                if errors == "raise":
                    raise ImageReadError(str(files[index]), reason)
                failures["indices"].append(index)
                failures["paths"].append(str(files[index]))
                failures["errors"].append(reason)
            conflicts += [(str(files[todo[p][0]]), plan.conflict) for p, _, plan in items if plan is not None and plan.conflict]
            if good:
                buffer.append(encode_planned(model, torch.stack([x for _, x, _ in good]), [plan for _, _, plan in good],
                                             encode_outputs, [row[0] for row, _, _ in good],
                                             [row[1] for row, _, _ in good], dtype=dtype))
                buffered += len(good)
            bar.update(len(items))
            if buffered >= part_size:
                flush()
        flush()
    if conflicts:
        warnings.warn(f"{len(conflicts)} file(s) encoded as {forced!r} contradict their DICOM header, first: "
                      f"{conflicts[0][0]}: {conflicts[0][1]}; check --modality, or use --modality auto",
                      ModalityMismatchWarning, stacklevel=2)
    return len(rows) - len(todo)


def _concat_parts(buffer: list, outputs: Sequence[str], config: Any, encode_outputs: Sequence[str],
                  provenance: Any) -> dict[str, np.ndarray]:
    encoding = concat_encodings(buffer, config, encode_outputs, provenance)
    arrays = {"indices": np.array(encoding.indices, dtype=np.int64),
              "frames": np.array([-1 if f is None else f for f in encoding.frames], dtype=np.int64),
              "confidence": encoding.confidence.numpy()}
    for name in outputs:
        arrays[name] = (encoding.routing if name == "routing" else getattr(encoding, name)).numpy()
    for name in ROW_FIELDS:
        arrays[name] = np.array(["" if v is None else v for v in getattr(encoding, name)], dtype=str)
    return arrays


def merge_parts(out: Path, files: Sequence[str], outputs: Sequence[str]) -> BulkResult:
    """All ranks' parts, rows sorted into input order (file, then frame)."""
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in (*outputs, "indices", "frames", "confidence", *ROW_FIELDS)}
    failures = []
    for part in sorted(p for p in parts_dir(out).iterdir() if PART.match(p.name)):
        with np.load(part) as data:
            for name in pieces:
                if name in data.files and len(data["indices"]):
                    pieces[name].append(data[name])
            failed = json.loads(str(data["failures"]))
            failures += [{"index": i, "path": p, "error": e}
                         for i, p, e in zip(failed["indices"], failed["paths"], failed["errors"])]
    merged = {name: np.concatenate(chunks) for name, chunks in pieces.items() if chunks}
    if "indices" not in merged:
        merged = {name: np.zeros(0) for name in pieces}
    order = np.lexsort((merged["frames"], merged["indices"]))
    merged = {name: values[order] for name, values in merged.items()}
    rows = [{"row": row, "path": str(files[int(i)]), "frame": None if f < 0 else int(f),
             "modality": str(m), "confidence": round(float(c), 6), "modality_source": str(s), "unknown_reason": str(r) or None}
            for row, (i, f, m, c, s, r) in enumerate(zip(merged["indices"], merged["frames"], merged["modality"],
                                                          merged["confidence"], merged["modality_source"],
                                                          merged["unknown_reason"]))]
    failures.sort(key=lambda f: f["index"])
    arrays = {name: merged[name] for name in outputs if name in merged}
    return BulkResult(arrays, rows, [{"path": f["path"], "error": f["error"]} for f in failures])


def remove_parts(out: Path) -> None:
    directory = parts_dir(out)
    for part in directory.iterdir():
        part.unlink()
    directory.rmdir()
