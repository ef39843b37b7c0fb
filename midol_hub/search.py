"""Similar-case search: an on-disk index of embeddings, one sub-index per modality (each in its
expert's subspace), searched with FAISS or kept in Milvus.

An index folder holds:

- ``index.json``: the format, the model's provenance (weights and preprocessing hashes: the
  index refuses embeddings of other weights or preprocessing), the label columns and the
  search settings (``exact_limit``: above it a modality gets an approximate index).
- with the embedded backend (FAISS, the default), ``rows.sqlite``: one row per indexed image
  (or frame): path, content hash, modality, where it came from, confidence, labels and the
  L2-normalised embedding. Every batch is committed in one transaction, so a killed build keeps
  every batch committed before it and nothing half-written; this table is the index's only
  record. ``faiss/``: per-modality FAISS files, derived from the table and rebuilt when they
  are missing, behind it or damaged.
- with ``backend="milvus"``, the same rows in Milvus collections (one per modality), for an
  archive past one machine: every site's ``torchrun`` ranks encode their share and rank 0
  writes to the one Milvus.
- ``pending.json`` and ``pending.npz.parts/`` while a build runs: the files being encoded and
  the parts :mod:`midol_hub.bulk` writes (workers, parts, ``--resume``, torchrun ranks), as
  ``midol encode`` does.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import warnings
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bulk import model_fingerprint
from .dicomweb import instance_uids, is_dicomweb
from .errors import IndexDamagedError, IndexMismatchError, NonFiniteError, WriterBusyError
from .configuration_midol import VECTOR_OUTPUTS
from .modalities import AUTO, UNKNOWN, canonical_modality
from .modeling_midol import MIDoLModel
from .utils import atomic_write, barrier, file_sha256, from_rank_zero, lock_for_ranks

INDEX_FORMAT = "midol-index"
INDEX_VERSION = 1
EXACT_LIMIT = 50_000
"""Rows of one modality up to which search is exact (FAISS ``IndexFlatIP``)."""
MIN_EXACT_LIMIT = 16
"""The smallest ``exact_limit``: from 16 rows on, 4 sqrt(N) IVF lists are no more than the rows that train them."""
RECALL_TARGET = 0.95
"""Recall@10 against exact search that an approximate sub-index is tuned to reach."""


@dataclass
class Hit:
    """One neighbour of a query."""

    path: str
    score: float
    modality: str
    rank: int
    frame: int | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def uids(self) -> dict[str, str]:
        """Study, Series and SOP Instance UIDs of a hit indexed over DICOMweb ({} for a file)."""
        return instance_uids(self.path)

    def to_dict(self) -> dict[str, Any]:
        row = {"path": self.path, "score": round(self.score, 6), "modality": self.modality, "rank": self.rank}
        if self.frame is not None:
            row["frame"] = self.frame
        return {**row, **self.uids, **self.labels}


def decode_text(data: bytes) -> str:
    """Text of a file written by any common tool: UTF-8 (with or without a byte-order mark),
    UTF-16 with its mark (Excel's "Unicode text"), else Windows-1252 / Latin-1."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_labels(csv_path: str | Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Label columns and, per resolved file path (or DICOMweb instance URL), its labels, from a
    CSV with a ``path`` column (relative paths are relative to the CSV's folder)."""
    csv_path = Path(csv_path)
    try:
        text = decode_text(csv_path.read_bytes())
    except OSError as error:
        raise ValueError(f"{csv_path}: cannot read the labels CSV ({error.strerror or error})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "path" not in reader.fieldnames:
        raise ValueError(f"{csv_path}: a labels CSV needs a 'path' column, found {reader.fieldnames}")
    columns = [c for c in reader.fieldnames if c != "path"]
    labels = {}
    for line, row in enumerate(reader, start=2):
        if None in row or any(value is None for value in row.values()):
            raise ValueError(f"{csv_path}: row {line} has another number of fields than the header "
                             f"({len(reader.fieldnames)}); fix that row")
        if is_dicomweb(row["path"]):  # a PACS instance, by its URL
            labels[row["path"]] = {c: row[c] for c in columns}
            continue
        path = Path(row["path"])
        labels[str((path if path.is_absolute() else csv_path.parent / path).resolve())] = {c: row[c] for c in columns}
    return columns, labels


Neighbour = tuple[float, str, int, str, str]
"""(score, path, frame (-1: single-frame file), modality, labels as JSON) as a store returns it."""


class FaissStore:
    """The embedded backend: rows in ``rows.sqlite`` (the record), FAISS sub-indices in ``faiss/``
    derived from it."""

    def __init__(self, directory: Path, dim: int, exact_limit: int) -> None:
        self.path, self.folder, self.dim, self.exact_limit = directory / "rows.sqlite", directory / "faiss", dim, exact_limit
        try:
            with closing(self._connect()) as db:
                result = db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as error:
            raise IndexDamagedError(f"{self.path}: damaged ({error})") from None
        if result != "ok":
            raise IndexDamagedError(f"{self.path}: damaged ({result})")
        self._cache: dict[str, tuple[str, Any, np.ndarray]] = {}

    @staticmethod
    def create(directory: Path) -> None:
        with closing(sqlite3.connect(directory / "rows.sqlite")) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT NOT NULL, "
                       "frame INTEGER NOT NULL, modality TEXT NOT NULL, source TEXT NOT NULL, confidence REAL NOT NULL, "
                       "labels TEXT NOT NULL, embedding BLOB NOT NULL, UNIQUE (sha256, frame))")
            db.execute("CREATE INDEX IF NOT EXISTS rows_modality ON rows (modality)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)

    def known(self, hashes: Sequence[str]) -> set[str]:
        found: set[str] = set()
        with closing(self._connect()) as db:
            for start in range(0, len(hashes), 500):  # SQLite's bound-parameter limit
                chunk = list(hashes[start : start + 500])
                found.update(sha for (sha,) in db.execute(
                    f"SELECT DISTINCT sha256 FROM rows WHERE sha256 IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def known_paths(self, paths: Sequence[str]) -> set[str]:
        found: set[str] = set()
        with closing(self._connect()) as db:
            for start in range(0, len(paths), 500):
                chunk = list(paths[start : start + 500])
                found.update(path for (path,) in db.execute(
                    f"SELECT DISTINCT path FROM rows WHERE path IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def counts(self) -> dict[str, int]:
        with closing(self._connect()) as db:
            return dict(db.execute("SELECT modality, COUNT(*) FROM rows GROUP BY modality ORDER BY modality"))

    def add(self, rows: Sequence[dict[str, Any]], embeddings: np.ndarray) -> int:
        with closing(self._connect()) as db, db:  # one transaction: all of these rows or none
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO rows (path, sha256, frame, modality, source, confidence, labels, embedding) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(row["path"], row["sha256"], _frame(row), row["modality"], row["modality_source"],
                  float(row["confidence"]), json.dumps(row.get("labels") or {}), vector.tobytes())
                 for row, vector in zip(rows, embeddings)],
            )
            return db.total_changes - before

    def _sub_index(self, modality: str) -> tuple[Any, np.ndarray]:
        """(FAISS index, row ids) of one modality, cached on disk and in memory, rebuilt from the
        table when missing, behind it or damaged."""
        faiss = _faiss()
        with closing(self._connect()) as db:
            count, last = db.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM rows WHERE modality = ?", (modality,)).fetchone()
        stamp = f"{count}:{last}"
        cached = self._cache.get(modality)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
        index_file, ids_file = self.folder / f"{modality}.faiss", self.folder / f"{modality}.ids.npy"
        meta_file = self.folder / f"{modality}.json"
        read = _read_cached(faiss, meta_file, index_file, ids_file, stamp)
        if read is not None:
            index, ids = read
        else:
            with closing(self._connect()) as db:
                fetched = db.execute("SELECT id, embedding FROM rows WHERE modality = ? ORDER BY id", (modality,)).fetchall()
            ids = np.array([i for i, _ in fetched], dtype=np.int64)
            vectors = np.frombuffer(b"".join(blob for _, blob in fetched), dtype=np.float32).reshape(len(ids), self.dim)
            index, built = build_faiss_index(vectors, self.exact_limit)
            try:
                self.folder.mkdir(exist_ok=True)
                with atomic_write(index_file) as tmp:
                    faiss.write_index(index, tmp)
                with atomic_write(ids_file) as tmp, open(tmp, "wb") as handle:
                    np.save(handle, ids)
                with atomic_write(meta_file) as tmp:
                    Path(tmp).write_text(json.dumps({"stamp": stamp, "sha256": {"index": file_sha256(index_file),
                                                                                "ids": file_sha256(ids_file)}, **built}))
            except OSError:
                pass  # a read-only index: searched from the sub-index built in memory
        self._cache[modality] = (stamp, index, ids)
        return index, ids

    def describe(self, rows: int) -> str:
        return "exact" if rows <= self.exact_limit else "approximate (ivf-flat)"

    def close(self) -> None:
        self._cache.clear()

    def search(self, modality: str, vectors: np.ndarray, k: int) -> list[list[Neighbour]]:
        index, ids = self._sub_index(modality)
        scores, positions = index.search(vectors, min(k, len(ids)))
        wanted = sorted({int(ids[p]) for p in positions.flatten() if p >= 0})
        with closing(self._connect()) as db:
            rows = {row[0]: row[1:] for row in db.execute(
                f"SELECT id, path, frame, modality, labels FROM rows WHERE id IN ({','.join('?' * len(wanted))})", wanted)}
        return [[(float(score), *rows[int(ids[p])]) for score, p in zip(row_scores, row_positions) if p >= 0]
                for row_scores, row_positions in zip(scores, positions)]


class MilvusStore:
    """Milvus (a server, a cluster, or milvus-lite's local file) through ``pymilvus``: one
    collection per modality, ``{collection}_{modality}``, holding the same rows as the embedded
    backend's table. Exact inner-product search (a FLAT index) unless ``milvus_index`` names
    another Milvus index type (HNSW, IVF_FLAT, AUTOINDEX on a cluster)."""

    FIELDS = ("path", "sha256", "frame", "modality", "source", "confidence", "labels")

    def __init__(self, uri: str, collection: str, dim: int, fingerprint: dict[str, str], index_type: str = "FLAT") -> None:
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise ImportError("the Milvus backend needs pymilvus (and milvus-lite for a local file): "
                              "pip install 'midol-hub[milvus]'") from None
        self.client = _milvus_client(MilvusClient, uri)
        self.uri, self.collection, self.dim, self.index_type = uri, collection, dim, index_type
        self.fingerprint = {f"midol_{key}": value for key, value in fingerprint.items()}
        for name in self._collections().values():  # several sites may share one Milvus: check what is already there
            recorded = {k: v for k, v in (self.client.describe_collection(name).get("properties") or {}).items()
                        if k in self.fingerprint}
            if recorded != self.fingerprint:
                raise IndexMismatchError(
                    f"{uri}: collection {name} holds embeddings of other weights or preprocessing "
                    f"({recorded or 'unrecorded'}) than this index ({self.fingerprint}); use another --collection"
                )
            self.client.load_collection(name)  # a reopened collection is released until loaded

    def _name(self, modality: str) -> str:
        return f"{self.collection}_{modality}"

    def _collections(self) -> dict[str, str]:
        prefix = f"{self.collection}_"
        return {name[len(prefix):]: name for name in self.client.list_collections() if name.startswith(prefix)}

    def _create(self, modality: str) -> str:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=True)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
        for name, kind in (("path", DataType.VARCHAR), ("sha256", DataType.VARCHAR), ("frame", DataType.INT64),
                           ("modality", DataType.VARCHAR), ("source", DataType.VARCHAR), ("confidence", DataType.FLOAT),
                           ("labels", DataType.VARCHAR)):
            schema.add_field(name, kind, **({"max_length": 65535} if kind == DataType.VARCHAR else {}))
        params = self.client.prepare_index_params()
        params.add_index(field_name="embedding", index_type=self.index_type, metric_type="IP")
        self.client.create_collection(self._name(modality), schema=schema, index_params=params, consistency_level="Strong",
                                      properties=self.fingerprint)
        return self._name(modality)

    def _present(self, hashes: Sequence[str]) -> set[tuple[str, int]]:
        """(sha256, frame) of the rows that hold any of ``hashes``, asking only for those."""
        found: set[tuple[str, int]] = set()
        for name in self._collections().values():
            for start in range(0, len(hashes), 500):
                chunk = json.dumps(list(hashes[start : start + 500]))
                found.update((row["sha256"], row["frame"]) for row in self.client.query(
                    name, filter=f"sha256 in {chunk}", output_fields=["sha256", "frame"], limit=16384))
        return found

    def known(self, hashes: Sequence[str]) -> set[str]:
        return {sha for sha, _ in self._present(hashes)}

    def known_paths(self, paths: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for name in self._collections().values():
            for start in range(0, len(paths), 500):
                chunk = json.dumps(list(paths[start : start + 500]))
                found.update(row["path"] for row in self.client.query(
                    name, filter=f"path in {chunk}", output_fields=["path"], limit=16384))
        return found

    def counts(self) -> dict[str, int]:
        return {modality: int(self.client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])
                for modality, name in sorted(self._collections().items())}

    def add(self, rows: Sequence[dict[str, Any]], embeddings: np.ndarray) -> int:
        present = self._present(list(dict.fromkeys(row["sha256"] for row in rows)))
        added = 0
        for modality in dict.fromkeys(row["modality"] for row in rows):
            batch = []
            for row, vector in zip(rows, embeddings):
                key = (row["sha256"], _frame(row))
                if row["modality"] != modality or key in present:
                    continue
                present.add(key)  # the same content twice in one batch is stored once, as in the embedded backend
                batch.append({"embedding": vector.tolist(), "path": row["path"], "sha256": row["sha256"],
                              "frame": _frame(row), "modality": modality, "source": row["modality_source"],
                              "confidence": float(row["confidence"]), "labels": json.dumps(row.get("labels") or {})})
            if batch:
                name = self._collections().get(modality) or self._create(modality)
                added += int(self.client.insert(name, batch)["insert_count"])
        return added

    def describe(self, rows: int) -> str:
        return f"milvus {self.index_type}"

    def close(self) -> None:
        self.client.close()

    def search(self, modality: str, vectors: np.ndarray, k: int) -> list[list[Neighbour]]:
        found = self.client.search(self._name(modality), data=vectors.tolist(), limit=k,
                                   output_fields=["path", "frame", "modality", "labels"],
                                   search_params={"metric_type": "IP"})
        return [[(float(hit["distance"]), hit["entity"]["path"], int(hit["entity"]["frame"]), hit["entity"]["modality"],
                  hit["entity"]["labels"]) for hit in hits] for hits in found]


BACKENDS = ("faiss", "milvus")


def _milvus_client(client_class: Any, uri: str) -> Any:
    """A connected client, or a one-line error naming ``uri``: milvus-lite opens a local file for
    one process at a time."""
    import logging

    from pymilvus.exceptions import MilvusException

    loggers = [logging.getLogger(name) for name in ("milvus_lite", "pymilvus")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:  # a refused open is told in one line below, not in their tracebacks
            logger.setLevel(logging.CRITICAL)
        return client_class(uri)
    except MilvusException as error:
        if "://" not in uri:
            raise WriterBusyError(f"{uri}: cannot open the milvus-lite file; another process has it open (milvus-lite "
                                  "serves one process at a time): wait for it, or use a Milvus server") from None
        raise ConnectionError(f"{uri}: cannot reach the Milvus server ({getattr(error, 'message', error)})") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _frame(row: dict[str, Any]) -> int:
    return -1 if row.get("frame") is None else int(row["frame"])


class ImageIndex:
    """An index folder; open one with ``ImageIndex(directory)``, make one with :meth:`create`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest = self.directory / "index.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.directory}: not an index (no index.json); build one with `midol index build`")
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as error:
            raise IndexDamagedError(f"{manifest}: damaged ({error}); rebuild the index") from None
        if self.manifest.get("format") != INDEX_FORMAT or self.manifest.get("version") != INDEX_VERSION:
            raise IndexDamagedError(f"{manifest}: not a {INDEX_FORMAT} version {INDEX_VERSION} manifest")
        self._store: FaissStore | MilvusStore | None = None
        if self.manifest.get("backend", "faiss") == "faiss":
            self._store = FaissStore(self.directory, self.manifest["dim"], self.manifest["exact_limit"])  # checks the table now

    @property
    def store(self) -> FaissStore | MilvusStore:
        """The backend, connected on first use (so torchrun ranks that only encode never open it)."""
        if self._store is None:
            fingerprint = {key: self.manifest[key] for key in ("weights_sha256", "preprocessing_sha256")}
            self._store = MilvusStore(self.manifest["uri"], self.manifest["collection"], self.manifest["dim"], fingerprint,
                                      self.manifest["milvus_index"])
        return self._store

    @classmethod
    def create(cls, directory: str | Path, model: MIDoLModel, label_columns: Sequence[str] = (),
               exact_limit: int = EXACT_LIMIT, model_name: str | None = None, backend: str = "faiss",
               uri: str | None = None, collection: str = "midol", milvus_index: str = "FLAT",
               output: str | None = None) -> ImageIndex:
        """A new, empty index for ``model``'s embeddings. ``backend="milvus"`` keeps the rows in
        the Milvus at ``uri`` (a server address, or a local ``.db`` file for milvus-lite) in
        collections named ``{collection}_{modality}``; the folder then holds the manifest.
        ``output`` is the vector indexed and searched: ``"embedding"`` (the expert's) or
        ``"pooled"`` (the backbone's); default: the model's ``default_feature``."""
        directory = Path(directory)
        if (directory / "index.json").exists():
            raise FileExistsError(f"{directory}: an index is already there; add to it with `midol index add`")
        output = output or model.config.default_feature
        if output not in VECTOR_OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(VECTOR_OUTPUTS)}, got {output!r}")
        if output == "embedding" and model.config.backbone_only:
            raise ValueError("a backbone-only model has no trained experts: index its 'pooled' output")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not isinstance(exact_limit, int) or isinstance(exact_limit, bool) or exact_limit < MIN_EXACT_LIMIT:
            raise ValueError(f"exact_limit (--exact-limit) must be an integer of at least {MIN_EXACT_LIMIT} (an approximate "
                             f"index needs at least as many rows as its 4 sqrt(N) lists), got {exact_limit!r}")
        if backend == "milvus" and not uri:
            raise ValueError("the Milvus backend needs --uri: a server (http://host:19530) or a local file (cases.db)")
        if backend == "milvus" and not collection.replace("_", "").isalnum():
            raise ValueError(f"a Milvus collection name is letters, digits and underscores, got {collection!r}")
        directory.mkdir(parents=True, exist_ok=True)
        if backend == "faiss":
            FaissStore.create(directory)
            where: dict[str, Any] = {"exact_limit": exact_limit,
                                     "approximate": {"method": "ivf-flat", "lists": "4 sqrt(N)", "recall_target": RECALL_TARGET}}
        else:
            where = {"uri": uri, "collection": collection, "milvus_index": milvus_index}
        manifest = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "backend": backend,
                    "model": model_name or (model.provenance.location if model.provenance is not None else None),
                    **model_fingerprint(model), "output": output, "dim": model.config.num_features,
                    "experts": list(model.config.expert_modalities), "label_columns": list(label_columns), **where}
        with atomic_write(directory / "index.json") as tmp:
            Path(tmp).write_text(json.dumps(manifest, indent=2))
        index = cls(directory)
        if backend == "milvus":
            index.counts()  # connect now: a collection of other weights is refused at creation
        return index

    @property
    def output(self) -> str:
        """The vector this index holds: ``"embedding"`` or ``"pooled"`` (indexes written before
        the choice existed hold embeddings)."""
        return self.manifest.get("output", "embedding")

    def __len__(self) -> int:
        return sum(self.counts().values())

    def close(self) -> None:
        """Release the backend (a milvus-lite file is open to one process at a time)."""
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_model(self, model: MIDoLModel) -> None:
        """Raise :class:`IndexMismatchError` unless ``model`` has the index's weights and preprocessing."""
        found = model_fingerprint(model)
        for key, what in (("weights_sha256", "weights"), ("preprocessing_sha256", "preprocessing")):
            if found[key] != self.manifest[key]:
                raise IndexMismatchError(
                    f"{self.directory}: built with other {what} ({self.manifest[key][:12]}, model "
                    f"{self.manifest.get('model')}) than the model given ({found[key][:12]}); its embeddings cannot be "
                    "compared: use that model, or build a new index"
                )

    def known(self, hashes: Sequence[str]) -> set[str]:
        """Which of these content hashes the index holds already."""
        return self.store.known(list(hashes))

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def add_rows(self, rows: Sequence[dict[str, Any]], embeddings: np.ndarray) -> int:
        """Commit encoded rows (path, sha256, frame, modality, modality_source, confidence,
        labels) with their embeddings (normalised here); rows already there (same content and
        frame) are skipped. Returns how many were added."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape != (len(rows), self.manifest["dim"]):
            raise ValueError(f"embeddings of shape {embeddings.shape} for {len(rows)} row(s) of dimension {self.manifest['dim']}")
        finite = np.isfinite(embeddings).all(axis=1)
        if not finite.all():
            first = rows[int(np.argmin(finite))]["path"]
            raise NonFiniteError(f"{first}: its embedding is not finite (NaN or Inf), with {int((~finite).sum()) - 1} "
                                 "other row(s); nothing was added: check the weights")
        return self.store.add(rows, unit_rows(embeddings))

    def info(self) -> dict[str, Any]:
        """The manifest, the rows per modality, and how each modality is searched."""
        counts = self.counts()
        return {**self.manifest, "output": self.output, "rows": sum(counts.values()),
                "modalities": {m: {"rows": n, "search": self.store.describe(n)} for m, n in counts.items()}}

    def search_vectors(self, vectors: np.ndarray, modalities: Sequence[str], k: int = 10,
                       include_unknown: bool = False) -> list[list[Hit]]:
        """Neighbours of each embedding among the indexed rows of its modality."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        vectors = unit_rows(vectors)
        results: list[list[Hit]] = [[] for _ in modalities]
        counts = self.counts()
        for modality in dict.fromkeys(modalities):
            if modality not in counts or (modality == UNKNOWN and not include_unknown):
                continue
            queries = [q for q, m in enumerate(modalities) if m == modality]
            for q, neighbours in zip(queries, self.store.search(modality, vectors[queries], k)):
                results[q] = [Hit(path, score, row_modality, rank, None if frame < 0 else frame, json.loads(labels))
                              for rank, (score, path, frame, row_modality, labels) in enumerate(neighbours, start=1)]
        return results

    def search(self, model: MIDoLModel, queries: Any, k: int = 10, modality: str | None = None,
               include_unknown: bool = False, batch_size: int = 32) -> tuple[list[list[Hit]], list[str]]:
        """Encode ``queries`` (anything :meth:`MIDoLModel.encode` takes) with ``modality`` (default
        auto) and search each among the images of its modality. Returns (hits per query, the
        modality each query was searched in)."""
        self.check_model(model)
        encoding = model.encode(queries, modality=AUTO if modality is None else canonical_modality(modality),
                                output=self.output, batch_size=batch_size)
        hits = self.search_vectors(getattr(encoding, self.output).numpy(), encoding.modality, k, include_unknown)
        return hits, list(encoding.modality)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (inner product is then cosine)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return np.ascontiguousarray(vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12))


def recall_at_k(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean share of each row of ``truth`` (exact neighbour ids) that ``found`` holds too."""
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(truth, found)]))


def _read_cached(faiss: Any, meta_file: Path, index_file: Path, ids_file: Path, stamp: str) -> tuple[Any, np.ndarray] | None:
    """A sub-index written for exactly this state of the table whose files still have the
    checksums written with them, or None (the caller rebuilds it from the table)."""
    try:
        meta = json.loads(meta_file.read_text())
        checksums = meta.get("sha256") or {}
        if meta.get("stamp") != stamp or checksums.get("index") != file_sha256(index_file) \
                or checksums.get("ids") != file_sha256(ids_file):
            return None
        index, ids = faiss.read_index(str(index_file)), np.load(ids_file)
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None
    if index.ntotal != len(ids):
        return None
    if "nprobe" in meta:
        index.nprobe = meta["nprobe"]
    return index, ids


def build_faiss_index(vectors: np.ndarray, exact_limit: int = EXACT_LIMIT, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """(index, how it was built). Exact inner product (cosine on normalised vectors) up to
    ``exact_limit`` rows; above it an inverted file (IVF-Flat, 4 sqrt(N) lists, k-means trained
    on a sample of these vectors) whose ``nprobe`` is tuned on the data, as autofaiss does: the
    smallest power of two at which 256 perturbed copies of indexed vectors find their exact
    top 10 with recall >= :data:`RECALL_TARGET`."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    if count <= exact_limit:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, {"kind": "exact"}
    rng = np.random.default_rng(seed)
    lists = int(4 * np.sqrt(count))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[rng.permutation(count)[: min(count, 64 * lists)]])
    index.add(vectors)
    queries = unit_rows(vectors[rng.permutation(count)[:256]] + 0.05 * rng.standard_normal((256, dim)).astype(np.float32))
    _, truth = build_faiss_index(vectors, exact_limit=count)[0].search(queries, 10)
    probes, recall = 1, 0.0
    while True:
        index.nprobe = probes
        _, found = index.search(queries, 10)
        recall = recall_at_k(truth, found)
        if recall >= RECALL_TARGET or probes >= lists:
            break
        probes = min(2 * probes, lists)
    return index, {"kind": "ivf-flat", "lists": lists, "nprobe": probes, "tuned_recall_at_10": recall}


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError("image search needs FAISS: pip install 'midol-hub[search]'") from None
    return faiss


def add_files(index: ImageIndex, model: MIDoLModel, files: Sequence[str], *, modality: str = AUTO,
              labels: dict[str, dict[str, str]] | None = None, batch_size: int = 32, workers: int | None = None,
              errors: str = "skip", part_size: int = 1024, resume: bool = False, rank: int = 0, world: int = 1,
              frames: str | int | None = None, progress: bool = True) -> dict[str, Any]:
    """Encode the files the index does not hold yet (by content hash) with ``midol encode``'s
    machinery and commit them, each row under the file's absolute path (hits resolve from any
    working directory). One writer at a time: the index is locked while this runs. A killed
    add leaves ``pending.json`` and its parts; ``resume`` finishes that add first, then adds
    ``files``. Under torchrun every rank encodes its share and rank 0 commits. Returns the
    counts (on rank 0)."""
    index.check_model(model)
    files = list(dict.fromkeys(f if is_dicomweb(f) else str(Path(f).absolute()) for f in map(str, files)))
    report: dict[str, Any] = {"added": 0, "already_indexed": 0, "duplicates": 0, "failures": [], "finished_earlier": 0}
    with ExitStack() as held:
        lock_for_ranks(held, index.directory / "writer.lock", f"the index {index.directory}", rank, world)
        pending = index.directory / "pending.json"
        interrupted = from_rank_zero(pending.is_file(), world)
        if interrupted and not resume:
            raise FileExistsError(f"{index.directory}: an earlier add was interrupted; pass --resume to finish it (the files "
                                  f"given now are added after it), or delete {pending.name} and pending.npz.parts to drop it")
        if interrupted:
            finished = _commit_pending(index, model, batch_size, workers, errors, part_size, True, rank, world, progress)
            report["finished_earlier"] = finished.get("added", 0)
            report["failures"] += finished.get("failures", [])
        if rank == 0:
            _write_pending(index, files, modality, frames, labels)
        barrier(world)  # every rank waits for pending.json
        added = _commit_pending(index, model, batch_size, workers, errors, part_size, False, rank, world, progress)
    if rank != 0:
        return {}
    for key in ("added", "already_indexed", "duplicates"):
        report[key] += added[key]
    report["failures"] += added["failures"]
    report["rows"] = len(index)
    return report


def _write_pending(index: ImageIndex, files: list[str], modality: str, frames: str | int | None,
                   labels: dict[str, dict[str, str]] | None) -> None:
    """What an add is about to encode (the files not indexed yet by content), with their labels:
    a resumed add finishes from this alone."""
    def key(file: str) -> str:  # how the labels CSV names a file: resolved path, or the instance URL
        return file if is_dicomweb(file) else str(Path(file).resolve())

    if labels is not None:
        unlabelled = [f for f in files if key(f) not in labels]
        if unlabelled:
            warnings.warn(f"{len(unlabelled)} of {len(files)} file(s) have no row in the labels CSV and are indexed "
                          f"without labels, first: {unlabelled[0]}", UserWarning, stacklevel=3)
    instances = [f for f in files if is_dicomweb(f)]  # a SOP Instance UID names one content: skipped unfetched
    held = index.store.known_paths(instances) if instances else set()
    hashes = content_hashes([f for f in files if not is_dicomweb(f)])
    known = index.known(list(dict.fromkeys(h for h in hashes.values() if h)))
    todo = [f for f in files if f not in held and (is_dicomweb(f) or hashes[f] is None or hashes[f] not in known)]
    with atomic_write(index.directory / "pending.json") as tmp:
        Path(tmp).write_text(json.dumps({
            "files": todo, "already": len(files) - len(todo), "modality": modality, "frames": frames,
            "labels": {f: (labels or {}).get(key(f), {}) for f in todo}}))


def _commit_pending(index: ImageIndex, model: MIDoLModel, batch_size: int, workers: int | None, errors: str,
                    part_size: int, resume: bool, rank: int, world: int, progress: bool) -> dict[str, Any]:
    """Encode the files of ``pending.json`` (each row binds path, content hash and embedding of
    the same bytes), commit them and remove the pending state; the counts on rank 0."""
    from .bulk import encode_files, merge_parts, remove_parts

    pending, out = index.directory / "pending.json", index.directory / "pending.npz"
    state = json.loads(pending.read_text())
    if state["files"]:
        encode_files(model, state["files"], out, modality=state["modality"], outputs=[index.output],
                     batch_size=batch_size, workers=workers, errors=errors, part_size=part_size, resume=resume,
                     rank=rank, world=world, progress=progress, frames=state.get("frames"))
    barrier(world)  # every rank's parts are written
    if rank != 0:
        return {}
    added, failures = 0, []
    if state["files"]:
        merged = merge_parts(out, state["files"], [index.output])
        rows = [{**row, "labels": state["labels"].get(row["path"], {})} for row in merged.rows]
        if rows:
            added = index.add_rows(rows, merged.arrays[index.output])
        failures = merged.failures
        remove_parts(out)
    pending.unlink()
    stored = len(merged.rows) if state["files"] else 0
    return {"added": added, "already_indexed": state["already"], "duplicates": stored - added, "failures": failures}


def content_hashes(files: Sequence[str]) -> dict[str, str | None]:
    """sha256 of each file's content, by path (None for a file that cannot be read: it is tried,
    and reported, when encoded)."""
    hashes: dict[str, str | None] = {}
    for path in files:
        try:
            hashes[str(path)] = file_sha256(path)
        except OSError:
            hashes[str(path)] = None
    return hashes


def draw_search(queries: Sequence[str], hits: Sequence[Sequence[Hit]], modalities: Sequence[str], target: str | Path,
                label_columns: Sequence[str] = ()) -> Path:
    """One row per query: the query, then its neighbours with rank, score and labels."""
    from .drawing import displayable, pyplot, save_figure
    from .image_io import read_any
    from .preprocessing import WarningCollector

    plt = pyplot()
    columns = 1 + max((len(h) for h in hits), default=0)
    figure, grid = plt.subplots(len(queries), columns, figsize=(2.1 * columns, 2.5 * len(queries)), dpi=100, squeeze=False)

    def show(axes: Any, path: str, frame: int | None, title: str) -> None:
        pixels = read_any(path, 0, WarningCollector(), frame).pixels
        image = displayable(pixels)
        axes.imshow(image, cmap="gray" if image.ndim == 2 else None)
        axes.set_title(title, fontsize=7)

    for row, (query, found, modality) in enumerate(zip(queries, hits, modalities)):
        for axes in grid[row]:
            axes.set_axis_off()
        show(grid[row][0], str(query), None, f"query: {Path(str(query)).name}\n{modality}")
        grid[row][0].patch.set_edgecolor("black")
        for hit in found:
            shown = ", ".join(str(hit.labels[c]) for c in label_columns if c in hit.labels)
            show(grid[row][hit.rank], hit.path, hit.frame,
                 f"#{hit.rank} {hit.score:.3f}\n{Path(hit.path).name}" + (f"\n{shown}" if shown else ""))
    figure.tight_layout()
    return save_figure(figure, Path(target))
