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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .errors import ImageReadError
from .image_io import read_any
from .preprocessing import Preprocessor, WarningCollector

if TYPE_CHECKING:
    from .modeling_midol import MIDoLModel

PART = re.compile(r"rank-(\d{3})-part-(\d{6})\.npz$")


def default_workers() -> int:
    """DataLoader workers for decoding: the cores the model's own thread leaves, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class _Images(torch.utils.data.Dataset):
    """File i -> (i, normalised tensor) or (i, error message), read and preprocessed in a worker."""

    def __init__(self, files: Sequence[str], indices: list[int], preprocessor: Preprocessor) -> None:
        self.files, self.indices, self.preprocessor = files, indices, preprocessor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | str]:
        index = self.indices[position]
        try:
            raw = read_any(self.files[index], index, WarningCollector())
            return index, self.preprocessor.from_raw([raw], WarningCollector())[0]
        except ImageReadError as error:
            return index, error.reason


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
                 skip_errors: bool = False, part_size: int = 1024, resume: bool = False, rank: int = 0,
                 world: int = 1, progress: bool = True) -> int:
    """Encode this rank's share of ``files`` into part files beside ``out``; returns how many of
    its files earlier parts already held (0 unless ``resume``). An unreadable file stops the run
    (naming it) unless ``skip_errors``, which records it in the part instead."""
    from tqdm.auto import tqdm

    directory = parts_dir(out)
    directory.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(files), world))
    existing = sorted(p for p in directory.iterdir() if (m := PART.match(p.name)) and int(m.group(1)) == rank)
    if existing and not resume:
        raise FileExistsError(f"{directory} holds parts of an earlier run; pass --resume to continue it, "
                              "or delete the folder to start again")
    done: set[int] = set()
    for part in existing:
        with np.load(part) as data:
            done.update(data["indices"].tolist())
            done.update(json.loads(str(data["failures"]))["indices"])
    todo = [i for i in mine if i not in done]
    preprocessor = Preprocessor(model.config.profile(modality))
    loader = torch.utils.data.DataLoader(_Images(files, todo, preprocessor), batch_size=batch_size, collate_fn=_collate,
                                         num_workers=default_workers() if workers is None else workers)
    encode_outputs = [o for o in outputs if o != "routing"] or ["embedding"]
    buffer: list[tuple[list[int], Any]] = []
    failures: dict[str, list] = {"indices": [], "paths": [], "errors": []}
    buffered, part_number = 0, len(existing)

    def flush() -> None:
        nonlocal buffer, failures, buffered, part_number
        if not buffer and not failures["indices"]:
            return
        arrays = _concat_parts(buffer, outputs)
        target = directory / f"rank-{rank:03d}-part-{part_number:06d}.npz"
        tmp = target.with_name("." + target.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays, failures=np.array(json.dumps(failures)))
        os.replace(tmp, target)  # a killed run leaves whole parts only
        buffer, failures, buffered, part_number = [], {"indices": [], "paths": [], "errors": []}, 0, part_number + 1

    with tqdm(total=len(todo), disable=not progress or rank != 0, unit="img", desc="encode") as bar:
        for items in loader:
            good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
            for index, reason in ((i, x) for i, x in items if not isinstance(x, torch.Tensor)):
                if not skip_errors:
                    raise ImageReadError(str(files[index]), reason)
                failures["indices"].append(index)
                failures["paths"].append(str(files[index]))
                failures["errors"].append(reason)
            if good:
                encoding = model.encode(torch.stack([x for _, x in good]), modality=modality, output=encode_outputs,
                                        batch_size=batch_size, dtype=dtype, preprocessed=True)
                buffer.append(([i for i, _ in good], encoding))
                buffered += len(good)
            bar.update(len(items))
            if buffered >= part_size:
                flush()
        flush()
    return len(mine) - len(todo)


def _concat_parts(buffer: list[tuple[list[int], Any]], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    indices = [i for ids, _ in buffer for i in ids]
    encodings = [encoding for _, encoding in buffer]
    arrays = {"indices": np.array(indices, dtype=np.int64)}
    for name in outputs:
        if name == "routing":
            arrays[name] = np.concatenate([e.routing.numpy() for e in encodings]) if encodings else np.zeros((0, 0))
        elif encodings:
            arrays[name] = np.concatenate([getattr(e, name).numpy() for e in encodings])
    arrays["modality"] = np.array([m for e in encodings for m in e.modality], dtype=str)
    arrays["confidence"] = np.concatenate([e.confidence.numpy() for e in encodings]) if encodings else np.zeros(0)
    return arrays


def merge_parts(out: Path, files: Sequence[str], outputs: Sequence[str]) -> BulkResult:
    """All ranks' parts, rows sorted into input order."""
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    indices, modality, confidence, failures = [], [], [], []
    for part in sorted(p for p in parts_dir(out).iterdir() if PART.match(p.name)):
        with np.load(part) as data:
            indices.append(data["indices"])
            modality.append(data["modality"])
            confidence.append(data["confidence"])
            for name in outputs:
                if name in data.files:
                    pieces[name].append(data[name])
            failed = json.loads(str(data["failures"]))
            failures += [{"index": i, "path": p, "error": e}
                         for i, p, e in zip(failed["indices"], failed["paths"], failed["errors"])]
    order_of = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    order = np.argsort(order_of, kind="stable")
    arrays = {name: np.concatenate(chunks)[order] for name, chunks in pieces.items() if chunks}
    modality_all = np.concatenate(modality)[order] if modality else np.zeros(0, dtype=str)
    confidence_all = np.concatenate(confidence)[order] if confidence else np.zeros(0)
    rows = [{"row": row, "path": str(files[int(i)]), "modality": str(m), "confidence": round(float(c), 6)}
            for row, (i, m, c) in enumerate(zip(order_of[order], modality_all, confidence_all))]
    failures.sort(key=lambda f: f["index"])
    return BulkResult(arrays, rows, [{"path": f["path"], "error": f["error"]} for f in failures])


def remove_parts(out: Path) -> None:
    directory = parts_dir(out)
    for part in directory.iterdir():
        part.unlink()
    directory.rmdir()
