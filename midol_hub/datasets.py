"""Labelled image sets for probing and fine-tuning: class folders, CSV files, MedMNIST .npz.

A :class:`LabelledImages` holds the images as ``encode`` accepts them (paths or arrays),
integer labels (N,) for multi-class or a 0/1 matrix (N, L) for multi-label, the class names
and a group id per image (patient, lesion) so splits never leak a group across sets.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DatasetError
from .utils import image_files


@dataclass
class LabelledImages:
    images: list[Any]
    labels: np.ndarray
    class_names: list[str]
    groups: list[str] = field(default_factory=list)
    name: str = "dataset"

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if not self.groups:
            self.groups = [str(i) for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        indices = list(indices)
        return LabelledImages([self.images[i] for i in indices], self.labels[indices], self.class_names,
                              [self.groups[i] for i in indices], self.name)


def from_folder(root: str | Path) -> LabelledImages:
    """One sub-folder per class, images found recursively below each."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder of class sub-folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DatasetError(f"{root}: needs at least two class sub-folders, found {classes}")
    images, labels = [], []
    for index, name in enumerate(classes):
        files = image_files(root / name)
        if not files:
            raise DatasetError(f"{root}: class {name!r} has no images")
        images += [str(f) for f in files]
        labels += [index] * len(files)
    return LabelledImages(images, np.array(labels), classes, name=root.name)


def from_csv(path: str | Path, label_columns: Sequence[str] | None = None, path_column: str = "path",
             group_column: str | None = None) -> LabelledImages:
    """``path,label`` (multi-class, labels are names or integers) or ``path,A,B,...`` with 0/1
    columns (multi-label). Relative paths are resolved from the CSV's folder."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    header = list(rows[0])
    label_columns = list(label_columns or [c for c in header if c not in (path_column, group_column)])
    for column in [path_column, *label_columns, *([group_column] if group_column else [])]:
        if column not in header:
            raise DatasetError(f"{path}: no column {column!r}; the columns are {', '.join(header)}")
    images = [str((path.parent / row[path_column]).resolve()) for row in rows]
    groups = [row[group_column] for row in rows] if group_column else []
    if len(label_columns) == 1:
        values = [row[label_columns[0]] for row in rows]
        names = sorted(set(values), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else v))
        labels = np.array([names.index(v) for v in values])
        return LabelledImages(images, labels, names, groups, path.stem)
    try:
        matrix = np.array([[int(float(row[c])) for c in label_columns] for row in rows])
    except ValueError as error:
        raise DatasetError(f"{path}: multi-label columns must hold 0 or 1 ({error})") from None
    if not set(np.unique(matrix)) <= {0, 1}:
        raise DatasetError(f"{path}: multi-label columns must hold 0 or 1")
    return LabelledImages(images, matrix, label_columns, groups, path.stem)


def from_npz(path: str | Path, split: str, class_names: Sequence[str] | None = None) -> LabelledImages:
    """One split of a MedMNIST-style file: ``{split}_images`` and ``{split}_labels``."""
    path = Path(path)
    with np.load(path) as data:
        keys = f"{split}_images", f"{split}_labels"
        missing = [k for k in keys if k not in data]
        if missing:
            raise DatasetError(f"{path}: no {' or '.join(missing)} (it has {', '.join(data.files)})")
        images, labels = data[keys[0]], data[keys[1]]
    labels = labels.reshape(len(labels), -1)
    labels = labels[:, 0] if labels.shape[1] == 1 else labels
    names = list(class_names) if class_names else [str(i) for i in range(int(labels.max()) + 1)]
    return LabelledImages(list(images), labels.astype(np.int64), names, name=f"{path.stem}:{split}")


def group_split(data: LabelledImages, fractions: Sequence[float], seed: int = 0) -> list[LabelledImages]:
    """Split by group (patient, lesion) into parts of about ``fractions`` of the images,
    stratified by each group's majority class, so no group spans two parts."""
    if abs(sum(fractions) - 1) > 1e-6:
        raise DatasetError(f"split fractions {list(fractions)} must add up to 1")
    by_group: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(data.groups):
        by_group[group].append(index)
    by_class: dict[int, list[str]] = defaultdict(list)
    for group, members in by_group.items():
        labels = data.labels[members]
        key = int(np.bincount(labels).argmax()) if labels.ndim == 1 else int(labels.sum(0).argmax())
        by_class[key].append(group)
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for groups in by_class.values():
        rng.shuffle(groups)
        bounds = np.cumsum([0] + [round(f * len(groups)) for f in fractions[:-1]] + [len(groups)])
        bounds = np.minimum(bounds, len(groups))
        for part, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            for group in groups[start:stop]:
                parts[part].extend(by_group[group])
    return [data.subset(sorted(p)) for p in parts]
