"""Encoding large archives: DataLoader workers read and decode, results are written in parts as
they come, a killed run resumes where it stopped, and ``torchrun`` spreads the files over
processes.

``midol encode`` and ``midol index`` run this. A row is a binding: a worker reads a file's bytes
once, hashes them and decodes those same bytes (every frame of a multi-frame file in one pass),
so a row's path, content hash and embedding always belong together. Parts record path and hash
per row, never list positions, and only whole files. With N ranks (``torchrun
--nproc_per_node=N -m midol_hub.cli encode``) rank r encodes files r, r + N, ... into
``OUT.parts/rank-RRR-part-PPPPPP-TOKEN.npz``; rank 0 then merges the parts into OUT in input
order and removes them.

``OUT.parts/run.json`` records what the rows depend on (weights, preprocessing, outputs,
modality, frames, precision). ``resume`` refuses a run that differs in any of them, naming
it; a changed input list is continued exactly: files already encoded with the same content are
kept, new or changed files are encoded, files no longer given are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .encoding import Plan, check_frames, device_of, encode_planned, nonfinite_rows, plan_row, preprocess_planned
from .dicomweb import DICOMwebSource, Instance, is_dicomweb
from .errors import DICOMwebError, ImageReadError, ModalityMismatchWarning, NonFiniteError
from .image_io import file_frames
from .modalities import AUTO, canonical_modality
from .modeling_midol import MIDoLModel
from .preprocessing import WarningCollector
from .utils import atomic_write, from_rank_zero, state_sha256

PART = re.compile(r"rank-(\d{3})-part-(\d{6})-([0-9a-f]{8})\.npz$")
RUN_FILE = "run.json"
ROW_FIELDS = ("modality", "modality_source", "unknown_reason")
NON_FINITE = "the model's output is not finite (NaN or Inf); the weights are damaged: convert or download them again"


def default_workers() -> int:
    """DataLoader workers for decoding: the cores beyond two, at most 8. On two cores the main
    thread decodes while :func:`default_streams` forwards run beside it: a worker process there
    cost more in moving decoded images across processes than it saved (midol-lite over the
    full-resolution test files, 2 cores: 38-48 images/s with one worker, 68 without)."""
    return max(0, min(8, (os.cpu_count() or 1) - 2))


def default_streams(model: MIDoLModel) -> int:
    """Forwards in flight at once: two on a CPU with two or more torch threads, each with half of
    them, one on a GPU. Two single-threaded forwards of midol-lite gave 1.2-1.3 times the
    images/s of one on both cores of a 2-core machine (depthwise convolutions split badly across
    threads), and while they run the loader decodes the next batch."""
    return 2 if device_of(model).type == "cpu" and torch.get_num_threads() >= 2 else 1


@contextmanager
def _forward_threads(streams: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``streams`` threads for forwards; with more than one, torch's intra-op threads
    are shared out among them for the run and restored after it."""
    threads = torch.get_num_threads()
    if streams > 1:
        torch.set_num_threads(max(1, threads // streams))
    try:
        with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="midol-forward") as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def model_fingerprint(model: MIDoLModel) -> dict[str, str]:
    """What stored embeddings are checked against: the weights file's sha256 (the weights' own
    hash for weights that exist only in memory) and the preprocessing hash."""
    provenance = model.provenance
    weights = provenance.weights_sha256 if provenance is not None and provenance.weights_sha256 else None
    if weights is None:
        weights = "state:" + state_sha256(model.state_dict())
    return {"weights_sha256": weights, "preprocessing_sha256": model.config.preprocessing_hash()}


@dataclass
class _Item:
    """What a worker sends for a file: its rows (``kind="row"``), then one closing item:
    ``"done"``, ``"failed"`` (with ``error``) or ``"reused"`` (encoded by an earlier run); or
    ``"fatal"``: a DICOMweb server that cannot serve at all, which stops the run."""

    kind: str
    path: str
    sha256: str = ""
    frame: int | None = None
    pixels: torch.Tensor | None = None
    plan: Plan | None = None
    error: str = ""


class _FileRows(torch.utils.data.IterableDataset):
    """Batches of ``batch_size`` rows of files (or DICOMweb instances), each file read once,
    hashed and decoded from the same bytes in a worker; ``done`` maps path -> content hash of
    files that earlier parts already hold. A DICOMweb instance already held is not fetched
    again: DICOM gives changed content a new SOP Instance UID, so its URL names its content.
    A batch is counted in rows, not items: every file also sends a closing item, so batches of
    items would halve the forward's batch."""

    def __init__(self, files: Sequence[str], config: Any, forced: str | None, frames: str | int | None,
                 done: dict[str, str], batch_size: int) -> None:
        super().__init__()
        self.files, self.config, self.forced, self.frames, self.done = list(files), config, forced, frames, done
        self.batch_size = batch_size
        self._services: dict[str, DICOMwebSource] = {}

    def __iter__(self) -> Iterator[list[_Item]]:
        info = torch.utils.data.get_worker_info()
        share = self.files if info is None else self.files[info.id :: info.num_workers]
        batch: list[_Item] = []
        rows = 0
        for path in share:
            for item in self._file(path):
                is_row = item.kind == "row"
                # a full batch goes when the next row comes, so the closing items that follow its
                # rows go with it; closing items alone (files reused on resume) go in batch_size's too
                if (is_row and rows == self.batch_size) or len(batch) - rows == self.batch_size:
                    yield batch
                    batch, rows = [], 0
                batch.append(item)
                rows += is_row
        if batch:
            yield batch

    def _file(self, path: str) -> Iterator[_Item]:
        if is_dicomweb(path):
            yield from self._instance(path)
            return
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            yield _Item("failed", path, error="no such file (it was removed while the run went on?)")
            return
        except IsADirectoryError:
            yield _Item("failed", path, error="is a directory; pass the image files inside it")
            return
        except OSError as error:
            yield _Item("failed", path, error=f"cannot read the file ({error.strerror or error})")
            return
        yield from self._decoded(path, data)

    def _instance(self, url: str) -> Iterator[_Item]:
        if url in self.done:
            yield _Item("reused", url, self.done[url])
            return
        try:
            instance = Instance.parse(url)
            if instance.service not in self._services:  # one session per server and worker
                self._services[instance.service] = DICOMwebSource("dicomweb+" + instance.service)
            data = self._services[instance.service].fetch(instance)
        except (ImageReadError, ValueError) as error:
            yield _Item("failed", url, error=getattr(error, "reason", str(error)))
            return
        except DICOMwebError as error:
            yield _Item("fatal", url, error=str(error))
            return
        yield from self._decoded(url, data)

    def _decoded(self, path: str, data: bytes) -> Iterator[_Item]:
        sha256 = hashlib.sha256(data).hexdigest()
        if self.done.get(path) == sha256:
            yield _Item("reused", path, sha256)
            return
        try:
            for raw in file_frames(path, self.frames, data, input_size=self.config.img_size):
                plan = plan_row(self.config, self.forced, raw.dicom_modality)
                pixels = preprocess_planned(self.config, [raw], [plan], WarningCollector())[0]
                yield _Item("row", path, sha256, raw.frame, pixels, plan)
        except ImageReadError as error:
            yield _Item("failed", path, sha256, error=error.reason)
            return
        yield _Item("done", path, sha256)


def _collate(items: list) -> list:
    return items


@dataclass
class BulkResult:
    """The merged output: arrays by name (rows in input order), the manifest rows (path, content
    hash, frame, modality...) and the failures."""

    arrays: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    failures: list[dict[str, str]]


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def run_record(model: MIDoLModel, outputs: Sequence[str], modality: str, frames: str | int | None,
               dtype: torch.dtype | None) -> dict[str, Any]:
    """What the rows of a run depend on; a resume must match it."""
    location = model.provenance.location if model.provenance is not None else None
    return {"model": location, **model_fingerprint(model), "outputs": sorted(outputs),
            "modality": canonical_modality(modality, allow_auto=True), "frames": frames,
            "dtype": None if dtype is None else str(dtype).removeprefix("torch.")}


_RUN_OPTIONS = {"weights_sha256": "--model (weights)", "preprocessing_sha256": "preprocessing", "outputs": "--output",
                "modality": "--modality", "frames": "--frames", "dtype": "--dtype"}


def _check_run(directory: Path, run: dict[str, Any]) -> None:
    """Refuse to resume parts encoded under other settings, naming each difference."""
    try:
        recorded = json.loads((directory / RUN_FILE).read_text())
    except FileNotFoundError:
        raise FileExistsError(f"{directory} holds parts without a {RUN_FILE} (written by an older midol-hub); "
                              "delete the folder and encode again") from None
    changed = [f"{option}: {recorded.get(key)!r} then, {run[key]!r} now" for key, option in _RUN_OPTIONS.items()
               if recorded.get(key) != run[key]]
    if changed:
        model = f" (model {recorded.get('model')} then, {run.get('model')} now)" if recorded.get("model") != run.get("model") else ""
        raise ValueError(f"{directory}: cannot resume, the parts were encoded with other settings{model}: "
                         + "; ".join(changed) + ". Resume with the settings of the first run, or delete the folder to start again")


def _start_run(directory: Path, run: dict[str, Any], resume: bool) -> Exception | None:
    """Check a resume against the recorded run (or that there is nothing to resume) and record
    this run; the refusal, if any, is returned for every rank to raise."""
    try:
        if _part_files(directory) and not resume:
            raise FileExistsError(f"{directory} holds parts of an earlier run; pass --resume to continue it, "
                                  "or delete the folder to start again")
        if resume and _part_files(directory):
            _check_run(directory, run)
    except (FileExistsError, ValueError) as error:
        return error
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(directory / RUN_FILE) as tmp:
        Path(tmp).write_text(json.dumps(run, indent=2))
    return None


def _part_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if PART.match(p.name)) if directory.is_dir() else []


def _latest(directory: Path, names: Sequence[str] = ()) -> dict[str, tuple[str, Any]]:
    """Per path, its newest entry in the parts: ("rows", (part arrays, row positions)) or
    ("failed", failure); only the metadata columns plus ``names`` are read."""
    entries = []
    for part in _part_files(directory):  # each part read once; newest last
        with np.load(part) as data:
            arrays = {name: data[name] for name in ("paths", "sha256", "frames", "confidence", *ROW_FIELDS, *names)
                      if name in data.files}
            entries.append((int(data["written_ns"]), part.name, arrays, json.loads(str(data["failures"]))))
    latest: dict[str, tuple[str, Any]] = {}
    for _, _, arrays, failed in sorted(entries, key=lambda entry: entry[:2]):
        positions: dict[str, list[int]] = {}
        for position, path in enumerate(arrays["paths"].tolist()):
            positions.setdefault(path, []).append(position)
        for path, rows in positions.items():
            latest[path] = ("rows", (arrays, rows))
        for failure in failed:
            latest[failure["path"]] = ("failed", failure)
    return latest


def encode_files(model: MIDoLModel, files: Sequence[str], out: Path, *, modality: str, outputs: Sequence[str],
                 batch_size: int = 32, dtype: torch.dtype | None = None, workers: int | None = None,
                 errors: str = "raise", part_size: int = 1024, resume: bool = False, rank: int = 0,
                 world: int = 1, progress: bool = True, frames: str | int | None = None,
                 streams: int | None = None) -> int:
    """Encode this rank's share of ``files`` (paths, each once) into part files beside ``out``;
    returns how many of its files earlier parts already held with the same content (0 unless
    ``resume``). An unreadable file stops the run (naming it) unless ``errors="skip"``, which
    records it in the part instead. ``frames`` expands multi-frame files as in
    :meth:`MIDoLModel.encode`. ``streams`` forwards run at once (default :func:`default_streams`);
    their results are taken in the loader's order, so parts and failures do not depend on it."""
    from tqdm.auto import tqdm

    check_frames(frames)
    if len(set(files)) != len(files):
        raise ValueError("encode_files takes each path once")
    directory = parts_dir(out)
    refusal = _start_run(directory, run_record(model, outputs, modality, frames, dtype), resume) if rank == 0 else None
    refusal = from_rank_zero(refusal, world)  # rank 0 decides before any rank reads or writes the parts
    if refusal is not None:
        raise refusal
    done: dict[str, str] = {}  # path -> the content hash its newest entry was made from
    for path, (kind, entry) in _latest(directory).items():
        sha256 = entry["sha256"] if kind == "failed" else str(entry[0]["sha256"][entry[1][0]])
        if sha256:  # a file that could not even be read is tried again
            done[path] = sha256
    mine = [path for position, path in enumerate(files) if position % world == rank]
    forced = None if canonical_modality(modality, allow_auto=True) == AUTO else canonical_modality(modality)
    loader = torch.utils.data.DataLoader(_FileRows(mine, model.config, forced, frames, done, batch_size), batch_size=None,
                                         collate_fn=_collate, num_workers=default_workers() if workers is None else workers)
    encode_outputs = [o for o in outputs if o != "routing"] or ["embedding"]
    writer = uuid.uuid4().hex[:8]
    part_number = len(_part_files(directory))
    complete: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    encoded: dict[str, list[dict[str, Any]]] = {}
    conflicts: list[tuple[str, str]] = []
    reused = 0

    def fail(path: str, sha256: str, reason: str, non_finite: bool = False) -> None:
        encoded.pop(path, None)
        if errors == "raise":
            raise NonFiniteError(f"{path}: {reason}") if non_finite else ImageReadError(path, reason)
        failures.append({"path": path, "sha256": sha256, "error": reason})

    def flush() -> None:
        nonlocal complete, failures, part_number
        if not complete and not failures:
            return
        arrays: dict[str, np.ndarray] = {
            "paths": np.array([r["path"] for r in complete], dtype=str),
            "sha256": np.array([r["sha256"] for r in complete], dtype=str),
            "frames": np.array([-1 if r["frame"] is None else r["frame"] for r in complete], dtype=np.int64),
            "confidence": np.array([r["confidence"] for r in complete], dtype=np.float32),
        }
        for name in ROW_FIELDS:
            arrays[name] = np.array([r[name] or "" for r in complete], dtype=str)
        for name in outputs:
            arrays[name] = np.stack([r[name] for r in complete]) if complete else np.zeros((0, 0), dtype=np.float32)
        target = directory / f"rank-{rank:03d}-part-{part_number:06d}-{writer}.npz"
        with atomic_write(target) as tmp, open(tmp, "wb") as handle:  # a killed run leaves whole parts only
            np.savez(handle, **arrays, failures=np.array(json.dumps(failures)), written_ns=np.array(time.time_ns()))
        complete, failures, part_number = [], [], part_number + 1

    def take(items: list[_Item], rows: list[_Item], forward: Future) -> None:
        """Record a batch's rows (once its forward is done) and closing items, in the loader's order."""
        nonlocal reused
        if rows:
            encoding = forward.result()
            broken = set(nonfinite_rows(encoding, encode_outputs, model.config))
            for position, item in enumerate(rows):
                record = {"path": item.path, "sha256": item.sha256, "frame": item.frame, "finite": position not in broken,
                          "confidence": float(encoding.confidence[position]),
                          **{name: getattr(encoding, name)[position] for name in ROW_FIELDS}}
                for name in outputs:
                    record[name] = (encoding.routing if name == "routing" else getattr(encoding, name))[position].numpy()
                encoded.setdefault(item.path, []).append(record)
                if item.plan.conflict:
                    conflicts.append((item.path, item.plan.conflict))
        for item in items:
            if item.kind == "row":
                continue
            if item.kind == "fatal":
                flush()  # what is encoded stays: --resume goes on from here
                raise DICOMwebError(f"{item.error} (stopped at {item.path}; run the same command with --resume to go on)")
            bar.update(1)
            if item.kind == "reused":
                reused += 1
            elif item.kind == "failed":
                fail(item.path, item.sha256, item.error)
            else:
                records = encoded.pop(item.path, [])
                if all(r["finite"] for r in records):
                    complete.extend(records)
                else:
                    fail(item.path, item.sha256, NON_FINITE, non_finite=True)
        if len(complete) >= part_size:
            flush()

    def forward(rows: list[_Item]) -> Any:
        if not rows:  # a batch of closing items only
            return None
        return encode_planned(model, torch.stack([r.pixels for r in rows]), [r.plan for r in rows], encode_outputs,
                              list(range(len(rows))), [r.frame for r in rows], dtype=dtype)

    count = default_streams(model) if streams is None else streams
    with tqdm(total=len(mine), disable=not progress or rank != 0, unit="file", desc="encode") as bar, \
            _forward_threads(count) as pool:
        pending: deque[tuple[list[_Item], list[_Item], Future]] = deque()  # at most `count` forwards in flight
        for items in loader:
            rows = [item for item in items if item.kind == "row"]
            pending.append((items, rows, pool.submit(forward, rows)))
            if len(pending) >= count:
                take(*pending.popleft())
        while pending:
            take(*pending.popleft())
        flush()
    if conflicts:
        warnings.warn(f"{len(conflicts)} file(s) encoded as {forced!r} contradict their DICOM header, first: "
                      f"{conflicts[0][0]}: {conflicts[0][1]}; check --modality, or use --modality auto",
                      ModalityMismatchWarning, stacklevel=2)
    return reused


def merge_parts(out: Path, files: Sequence[str], outputs: Sequence[str]) -> BulkResult:
    """Every rank's parts, one entry per given file (its newest), rows in input order (file,
    then frame); files no longer given are dropped. Raises when a file has no entry (a rank
    that did not finish)."""
    latest = _latest(parts_dir(out), outputs)
    missing = [path for path in files if path not in latest]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(files)} file(s) have no rows in {parts_dir(out)}, first: "
                           f"{missing[0]}; run the same command with --resume to encode them")
    pieces: dict[str, list[np.ndarray]] = {}
    failures = []
    for path in files:
        kind, entry = latest[path]
        if kind == "failed":
            failures.append({"path": path, "error": entry["error"]})
            continue
        arrays, positions = entry
        positions = sorted(positions, key=lambda p: int(arrays["frames"][p]))
        for name, values in arrays.items():
            pieces.setdefault(name, []).append(values[positions])
    merged = {name: np.concatenate(chunks) for name, chunks in pieces.items()}
    count = len(merged.get("paths", []))
    rows = [{"row": row, "path": str(merged["paths"][row]), "sha256": str(merged["sha256"][row]),
             "frame": None if merged["frames"][row] < 0 else int(merged["frames"][row]),
             "modality": str(merged["modality"][row]), "confidence": round(float(merged["confidence"][row]), 6),
             "modality_source": str(merged["modality_source"][row]),
             "unknown_reason": str(merged["unknown_reason"][row]) or None} for row in range(count)]
    arrays = {name: merged.get(name, np.zeros((0, 0), dtype=np.float32)) for name in outputs}
    return BulkResult(arrays, rows, failures)


def remove_parts(out: Path) -> None:
    directory = parts_dir(out)
    for part in directory.iterdir():
        part.unlink()
    directory.rmdir()
