"""Pretraining data: image folders, MedMNIST-style .npz files and image lists, with optional
modality tags, skipped-and-reported unreadable files, and a root-balancing sampler."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from midol_hub.errors import DatasetError, ImageReadError
from midol_hub.image_io import array_to_unit, frame_count, read_file
from midol_hub.utils import READABLE_SUFFIXES, image_files

log = logging.getLogger("training.data")


@dataclass
class Source:
    """One data root: where it is, its optional modality tag, and how to read item i."""

    root: str
    tag: str | None
    kind: str
    items: list[Any] = field(repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> np.ndarray:
        """Pixels of item ``index`` as (H, W, C) float32 in [0, 1]; raises ImageReadError."""
        item = self.items[index]
        if self.kind == "folder":
            path, frame = item if isinstance(item, tuple) else (item, None)
            return read_file(path, frame).pixels
        array = item if item.ndim == 3 else item[:, :, None]
        return array_to_unit(array, f"{self.root}[{index}]", None)

    def name(self, index: int) -> str:
        item = self.items[index]
        if self.kind != "folder":
            return f"{self.root}[{index}]"
        return f"{item[0]}[frame {item[1]}]" if isinstance(item, tuple) else str(item)


FRAME_MODES = ("error", "all")
MULTI_FRAME_SUFFIXES = (".tif", ".tiff", ".gif", ".png", ".dcm", ".dicom")


def _frames_of(files: list[Path], frames: str, where: Path) -> list[Path | tuple[Path, int]]:
    """The items of image files: multi-frame files give one item per frame (``frames="all"``) or an
    error naming the file and the option; every other file is one item."""
    if frames not in FRAME_MODES:
        raise DatasetError(f"data.frames must be one of {', '.join(FRAME_MODES)}, got {frames!r}")
    counts: dict[Path, int] = {}
    items: list[Path | tuple[Path, int]] = []
    for path in files:
        if path.suffix.lower() not in MULTI_FRAME_SUFFIXES:
            items.append(path)
            continue
        if path not in counts:
            try:
                counts[path] = frame_count(path, str(path))
            except ImageReadError:
                counts[path] = 1  # unreadable: skipped and reported when read
        if counts[path] == 1:
            items.append(path)
        elif frames == "all":
            items += [(path, frame) for frame in range(counts[path])]
        else:
            raise DatasetError(f"{where}: {path} holds {counts[path]} frames; train on every frame with "
                               "--set data.frames=all, or pass single-frame files")
    return items


def open_source(spec: str, split: str = "train", frames: str = "error") -> Source:
    """Open ``PATH`` or ``TAG=PATH``: a folder (recursive), an .npz file or a .txt list of image
    paths (one per line, e.g. the training split of a patient-level split). Multi-frame files
    (DICOM, TIFF, GIF) give one sample per frame with ``frames="all"``, else an error naming them."""
    tag, sep, path_text = spec.partition("=")
    if not sep:
        tag, path_text = None, spec
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DatasetError(f"data path {path} does not exist")
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise DatasetError(f"data folder {path} holds no images ({', '.join(READABLE_SUFFIXES)})")
        return Source(str(path), tag, "folder", _frames_of(files, frames, path))
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            key = f"{split}_images"
            if key not in arrays:
                raise DatasetError(
                    f"{path} has no '{key}' array (it has {', '.join(arrays.files)}); "
                    f"pick another split with --set data.split=... or another file"
                )
            images = arrays[key]
            labels = arrays.get(f"{split}_labels")
        return Source(str(path), tag, "npz", list(images), None if labels is None else labels.reshape(len(images), -1)[:, 0])
    if path.suffix == ".txt":
        files = [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DatasetError(f"{path} lists {len(missing)} missing file(s), first: {missing[0]}")
        if not files:
            raise DatasetError(f"image list {path} is empty")
        return Source(str(path), tag, "folder", _frames_of(files, frames, path))
    raise DatasetError(
        f"data path {path}: expected a folder, an .npz file or a .txt list of images "
        "(tar shards stream through training.shards)"
    )


class PretrainDataset(torch.utils.data.Dataset):
    """All sources concatenated; item i -> (crops, source index), or None when unreadable.

    Augmentation is seeded by (seed, epoch, index), so a resumed run sees the same crops.
    """

    def __init__(self, sources: list[Source], augment: Callable[..., list[torch.Tensor]], seed: int = 0):
        self.sources, self.augment, self.seed, self.epoch = sources, augment, seed, 0
        self.offsets = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        source = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return source, index - int(self.offsets[source])

    def __getitem__(self, index: int):
        source_index, local = self.locate(index)
        source = self.sources[source_index]
        try:
            pixels = source.read(local)
        except ImageReadError as error:
            return {"failed": str(error)}
        image = torch.from_numpy(np.ascontiguousarray(pixels[:, :, :3])).permute(2, 0, 1)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) % (2**63))
            crops = self.augment(image.contiguous(), source.tag)
        return {"crops": crops, "source": source_index}


def collate(batch: list[dict]) -> dict:
    """Stack crops; unreadable items are dropped and their names passed on for logging."""
    good = [b for b in batch if "crops" in b]
    failed = [b["failed"] for b in batch if "failed" in b]
    if not good:
        return {"crops": None, "source": None, "failed": failed}
    crops = [torch.stack([b["crops"][i] for b in good]) for i in range(len(good[0]["crops"]))]
    return {"crops": crops, "source": torch.tensor([b["source"] for b in good]), "failed": failed}


BALANCE_MODES = ("none", "tags", "tags_per_batch")


def balanced_count(group_sizes: list[int], balance: str) -> int:
    """Images per epoch: all of them, or with balancing, the same number (total // groups) per group."""
    total = sum(group_sizes)
    return total if balance == "none" else total // len(group_sizes) * len(group_sizes)


def epoch_indices(dataset: PretrainDataset, epoch: int, seed: int, balance: str, global_batch: int) -> list[int]:
    """The epoch's global sample order, a whole number of global batches long.

    ``balance="tags"`` draws every tag (an untagged root is its own group) equally often over the epoch: the
    Sinkhorn term assumes the experts share each batch evenly, which unbalanced corpora would
    break. ``balance="tags_per_batch"`` also interleaves the groups, so every global batch holds them
    in equal numbers (within two images), not just the epoch.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    if balance not in BALANCE_MODES:
        raise DatasetError(f"data.balance must be one of {', '.join(BALANCE_MODES)}, got {balance!r}")
    if balance == "none":
        order = list(range(len(dataset)))
        rng.shuffle(order)
    else:
        groups: dict[Any, list[int]] = {}
        for i, source in enumerate(dataset.sources):
            groups.setdefault(source.tag or source.root, []).extend(range(dataset.offsets[i], dataset.offsets[i + 1]))
        per_group = len(dataset) // len(groups)
        picked = []
        for members in groups.values():
            picks = rng.sample(members, per_group) if len(members) >= per_group else rng.choices(members, k=per_group)
            picked.append(picks)
        if balance == "tags":
            order = [index for picks in picked for index in picks]
            rng.shuffle(order)
        else:
            order = []
            for position in range(per_group):  # one image of every group per round, rounds in random group order
                round_ = [picks[position] for picks in picked]
                rng.shuffle(round_)
                order.extend(round_)
    usable = len(order) // global_batch * global_batch
    if usable == 0:
        raise DatasetError(f"{len(order)} images are fewer than one global batch of {global_batch}; lower --batch-size")
    return order[:usable]


class MapData:
    """Map-style training data (folders, .npz, lists): one epoch = ``epoch_indices``, split over ranks."""

    def __init__(self, sources: list[Source], augment: Callable, seed: int, balance: str, global_batch: int,
                 per_rank: int, accumulate: int, rank: int, world: int, workers: int) -> None:
        self.sources, self.seed, self.balance, self.global_batch = sources, seed, balance, global_batch
        self.per_rank, self.accumulate, self.rank, self.world, self.workers = per_rank, accumulate, rank, world, workers
        self.dataset = PretrainDataset(sources, augment, seed=seed)
        self.tags = [s.tag for s in sources]
        self.steps_per_epoch = len(epoch_indices(self.dataset, 0, seed, balance, global_batch)) // global_batch

    def loader(self, epoch: int, batch_in_epoch: int) -> torch.utils.data.DataLoader:
        """The rank's micro-batches of ``epoch``, from step ``batch_in_epoch`` on."""
        self.dataset.epoch = epoch
        order = epoch_indices(self.dataset, epoch, self.seed, self.balance, self.global_batch)[self.rank :: self.world]
        start = batch_in_epoch * self.accumulate * self.per_rank
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.per_rank, sampler=order[start:], collate_fn=collate,
            num_workers=self.workers, drop_last=True,
            generator=torch.Generator().manual_seed(self.seed + epoch),  # keeps the global RNG untouched
        )

    def samples_by_tag(self, per_tag: int) -> dict[str, list[np.ndarray]]:
        """Up to ``per_tag`` evenly spaced images of every tag (roots of one tag share it)."""
        by_tag: dict[str, list[Source]] = {}
        for source in self.sources:
            if source.tag is not None:
                by_tag.setdefault(source.tag, []).append(source)
        samples = {}
        for tag, roots in by_tag.items():
            picks = [(source, i) for source in roots
                     for i in np.linspace(0, len(source) - 1, min(len(source), per_tag // len(roots))).astype(int)]
            samples[tag] = [source.read(int(i)) for source, i in picks]
        return samples
