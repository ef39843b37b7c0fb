"""WebDataset shards for pretraining at scale: writing them, and streaming them into training.

A shard directory holds ``shard-000000.tar``, ... and ``index.json``. Every sample is an image
in a lossless format (8-bit PNG, or ``.npy`` for deeper data) plus a JSON of its origin. Each
shard holds one tag only, so a stream can draw tags equally often (``--balance``) by keeping
one stream per tag.

Streams are deterministic: for a given seed, epoch and number of ranks, every run reads the
same samples into the same batches, with the same crops, whatever the number of DataLoader
workers (shards are split across ranks; workers split a rank's batches). That is what "exact"
resume means here: a run resumed from a checkpoint skips the batches it already trained on
(reading, not decoding them) and continues as the uninterrupted run would, as long as it
keeps the same number of ranks.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from midol_hub.errors import DatasetError, ImageReadError
from midol_hub.image_io import decode_image

from .data import Source, balanced_count, collate

INDEX_NAME = "index.json"
FORMAT = "midol-shards-1"


# ----------------------------------------------------------------------------- writing


def _encode(pixels: np.ndarray) -> tuple[str, bytes, int]:
    """(extension, bytes, bits) of pixels (H, W, C) in [0, 1], stored without loss."""
    scaled = pixels * 255
    if np.abs(scaled - np.round(scaled)).max() < 1e-3:  # 8-bit data
        array = np.round(scaled).astype(np.uint8)
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array[:, :, :3])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "png", buffer.getvalue(), 8
    buffer = io.BytesIO()
    np.save(buffer, pixels.astype(np.float32))
    return "npy", buffer.getvalue(), 32


@dataclass
class ShardSummary:
    directory: Path
    samples: int
    shards: int
    unreadable: list[str]


def write_shards(out_dir: str | Path, sources: list[Source], shard_size: int = 1000) -> ShardSummary:
    """Write every readable image of ``sources`` into single-tag tar shards and an index.

    Deterministic: the same inputs give byte-identical shards. Unreadable inputs are listed in
    the index (and the summary), never silently dropped.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("shard-*.tar")):
        raise DatasetError(f"{out} already holds shards; write to an empty folder")
    if shard_size < 1:
        raise DatasetError(f"--shard-size must be at least 1, got {shard_size}")
    shards: list[dict[str, Any]] = []
    unreadable: list[str] = []
    writer, key = None, 0

    def close() -> None:
        if writer is not None:
            writer.close()

    for source in sources:
        tag = source.tag or Path(source.root).name
        for local in range(len(source)):
            try:
                pixels = source.read(local)
            except ImageReadError as error:
                unreadable.append(str(error))
                continue
            if writer is None or shards[-1]["samples"] >= shard_size or shards[-1]["tag"] != tag:
                close()
                name = f"shard-{len(shards):06d}.tar"
                writer = wds.TarWriter(str(out / name), mtime=0.0, user="midol", group="midol")
                shards.append({"name": name, "tag": tag, "samples": 0})
            extension, data, bits = _encode(pixels)
            meta = {"source": source.root, "tag": tag, "path": source.name(local), "bits": bits}
            writer.write({"__key__": f"{key:09d}", extension: data, "json": json.dumps(meta, sort_keys=True).encode()})
            shards[-1]["samples"] += 1
            key += 1
    close()
    if not shards:
        raise DatasetError("no readable image in the given data; nothing to write")
    tags: dict[str, int] = {}
    for shard in shards:
        tags[shard["tag"]] = tags.get(shard["tag"], 0) + shard["samples"]
    index = {"format": FORMAT, "samples": key, "tags": tags, "shards": shards, "unreadable": unreadable}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return ShardSummary(out, key, len(shards), unreadable)


# ----------------------------------------------------------------------------- reading


def is_shard_spec(path: str) -> bool:
    """A shard directory (with an index), a shard file or a brace pattern of shard files."""
    p = Path(path)
    return (p.is_dir() and (p / INDEX_NAME).is_file()) or path.endswith(".tar") or ("{" in path and ".tar" in path)


def _expand(pattern: str) -> list[str]:
    return list(wds.shardlists.expand_urls(pattern))


def open_shards(spec: str) -> list[dict[str, Any]]:
    """The shards of ``TAG=PATH`` as dicts (path, tag, samples): a directory uses its index; shard
    files or brace patterns are counted (a ``TAG=`` overrides the stored tags)."""
    tag, sep, path = spec.partition("=")
    if not sep:
        tag, path = None, spec
    p = Path(path)
    if p.is_dir():
        index_path = p / INDEX_NAME
        if not index_path.is_file():
            raise DatasetError(f"{p} has no {INDEX_NAME}; write shards with python -m training.make_shards")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT:
            raise DatasetError(f"{index_path} is not a midol shard index (format {index.get('format')!r})")
        return [{"path": str(p / s["name"]), "tag": tag or s["tag"], "samples": s["samples"]} for s in index["shards"]]
    files = _expand(path)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DatasetError(f"shard {missing[0]} does not exist")
    shards = []
    for file in files:
        samples = sum(1 for _ in wds.tarfile_to_samples()([{"url": file}]))
        if samples == 0:
            raise DatasetError(f"tar shard {file} holds no samples")
        shards.append({"path": file, "tag": tag or Path(file).stem, "samples": samples})
    return shards


def decode_sample(sample: dict[str, Any]) -> np.ndarray:
    """Pixels (H, W, C) float32 in [0, 1] of a shard sample (PNG, JPEG or .npy)."""
    if "npy" in sample:
        return np.load(io.BytesIO(sample["npy"])).astype(np.float32)
    for extension in ("png", "jpg", "jpeg", "tif", "tiff", "bmp"):
        if extension in sample:
            return decode_image(io.BytesIO(sample[extension]), f"{sample.get('__url__')}:{sample['__key__']}").pixels
    raise ImageReadError(f"{sample.get('__url__')}:{sample['__key__']}", f"no image member (found {sorted(sample)})")


class ShardStream(torch.utils.data.IterableDataset):
    """The samples of one rank's share of the shards, for one epoch at a time.

    Yields what :class:`~training.data.PretrainDataset` yields (crops and source index, or the
    name of an unreadable sample), so the same ``collate`` batches it. ``balance`` is ``none``
    (one shuffled stream), ``tags`` (tags drawn equally often, in random order) or
    ``batches`` (tags interleaved round by round, so every batch holds them equally).
    """

    def __init__(self, shards: list[dict[str, Any]], augment: Callable, seed: int, balance: str, batch_size: int,
                 rank: int = 0, world: int = 1, buffer: int = 500) -> None:
        self.shards, self.augment, self.seed, self.balance = shards, augment, seed, balance
        self.batch_size, self.rank, self.world, self.buffer = batch_size, rank, world, buffer
        self.tags = list(dict.fromkeys(s["tag"] for s in shards))
        self.epoch, self.skip_batches, self.batches = 0, 0, 0

    def epoch_samples(self) -> int:
        """Samples per epoch over all ranks, as ``epoch_indices`` counts them for map-style data."""
        counts = [sum(s["samples"] for s in self.shards if s["tag"] == t) for t in self.tags]
        return balanced_count(counts, self.balance)

    def set_epoch(self, epoch: int, batches: int, skip_batches: int = 0) -> None:
        """Stream ``batches`` batches per rank this epoch, after skipping the first ``skip_batches``."""
        self.epoch, self.batches, self.skip_batches = epoch, batches, skip_batches

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # every worker reads the rank's stream (cheap) and decodes and augments every workers-th
        # batch (the costly part), so a batch's content never depends on the number of workers
        samples = self._samples(self.rank, self.world)
        for batch in range(self.batches):
            raw = [next(samples) for _ in range(self.batch_size)]
            if batch >= self.skip_batches and (batch - self.skip_batches) % workers == worker:
                yield from (self._augment(sample) for sample in raw)

    def _augment(self, sample: dict[str, Any]) -> dict:
        try:
            pixels = decode_sample(sample)
        except ImageReadError as error:
            return {"failed": str(error)}
        image = torch.from_numpy(np.ascontiguousarray(pixels[:, :, :3])).permute(2, 0, 1)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        with torch.random.fork_rng(devices=[]):  # crc32, not hash(): str hashes differ between processes
            torch.manual_seed(hash((self.seed, self.epoch, zlib.crc32(sample["__url__"].encode()),
                                    zlib.crc32(sample["__key__"].encode()))) % (2**63))
            crops = self.augment(image.contiguous(), self.tags[sample["__tag_index__"]])
        return {"crops": crops, "source": sample["__tag_index__"]}

    def _samples(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        """An endless, deterministic stream of raw (undecoded) samples for one (rank, worker) slot."""
        groups = self.tags if self.balance in ("tags", "tags_per_batch") else [None]
        rng = random.Random(hash((self.seed, self.epoch, slot)))  # ints hash the same in every process
        streams = [self._group_stream(tag, slot, slots, rng.randrange(2**31)) for tag in groups]
        if len(streams) == 1:
            yield from streams[0]
        while True:
            order = list(range(len(streams)))
            if self.balance == "tags_per_batch":
                rng.shuffle(order)  # one of every tag per round
            else:
                order = [rng.randrange(len(streams))]  # tags equally often, in random order
            for group in order:
                yield next(streams[group])

    def _group_stream(self, tag: str | None, slot: int, slots: int, seed: int) -> Iterator[dict[str, Any]]:
        shards = [s for s in self.shards if tag is None or s["tag"] == tag]
        tag_index = {s["path"]: self.tags.index(s["tag"]) for s in shards}
        rng = random.Random(seed)
        while True:  # repeat the group's shards as often as the epoch needs (small tags recur)
            order = shards[:]
            rng.shuffle(order)
            if len(order) >= slots:  # whole shards per slot
                urls, keep = [s["path"] for i, s in enumerate(order) if i % slots == slot], None
            else:  # fewer shards than slots: every slot reads them all and keeps its share of samples
                urls, keep = [s["path"] for s in order], slot
            raw = wds.tarfile_to_samples()({"url": url} for url in urls)
            if keep is not None:
                raw = (sample for i, sample in enumerate(raw) if i % slots == keep)
            produced = False
            for sample in wds.filters._shuffle(raw, self.buffer, min(self.buffer, 100), seed=rng.randrange(2**31)):
                produced = True
                sample["__tag_index__"] = tag_index[sample["__url__"]]
                yield sample
            if not produced:
                raise DatasetError(f"the shards of {tag or 'the data'} gave this rank and worker no samples")


class StreamData:
    """Shard-streamed training data with the interface of :class:`~training.data.MapData`."""

    def __init__(self, shards: list[dict[str, Any]], augment: Callable, seed: int, balance: str, global_batch: int,
                 per_rank: int, accumulate: int, rank: int, world: int, workers: int, buffer: int = 500) -> None:
        self.stream = ShardStream(shards, augment, seed, balance, per_rank, rank, world, buffer)
        self.per_rank, self.accumulate, self.workers = per_rank, accumulate, workers
        self.tags = self.stream.tags
        self.steps_per_epoch = self.stream.epoch_samples() // global_batch
        if self.steps_per_epoch == 0:
            raise DatasetError(f"{self.stream.epoch_samples()} samples are fewer than one global batch of {global_batch}")

    def loader(self, epoch: int, batch_in_epoch: int) -> torch.utils.data.DataLoader:
        self.stream.set_epoch(epoch, self.steps_per_epoch * self.accumulate, batch_in_epoch * self.accumulate)
        return torch.utils.data.DataLoader(self.stream, batch_size=self.per_rank, collate_fn=collate,
                                           num_workers=self.workers,  # own generator: the global RNG stays untouched
                                           generator=torch.Generator().manual_seed(self.stream.seed + epoch))

    def samples_by_tag(self, per_tag: int) -> dict[str, list[np.ndarray]]:
        """The first ``per_tag`` samples of every tag's first shards."""
        samples: dict[str, list[np.ndarray]] = {tag: [] for tag in self.tags}
        for shard in self.stream.shards:
            wanted = per_tag - len(samples[shard["tag"]])
            for sample in itertools.islice(wds.tarfile_to_samples()([{"url": shard["path"]}]), max(wanted, 0)):
                samples[shard["tag"]].append(decode_sample(sample))
        return samples
