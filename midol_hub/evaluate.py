"""The evaluation table: ``python -m midol_hub.evaluate --model NAME --out results.json``.

Linear probe and kNN on every labelled set in ``$MIDOL_DATA`` (see its PROVENANCE.md), with
splits that avoid leakage: official MedMNIST splits where they exist, OCT split by patient
id and ISIC by lesion id. Prints a markdown table; the JSON feeds the model card.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .datasets import DatasetError, LabelledImages, from_npz, group_split
from .errors import ModelNotFoundError, WeightsNotAvailableError
from .evaluation import classification_metrics, knn_classify, linear_probe
from .features import extract_features
from .loading import load_model
from .modalities import UNKNOWN
from .model_card import SEPARATION

OCT_CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]


def data_root() -> Path:
    return Path(os.environ.get("MIDOL_DATA", "../shared/data"))


def _npz(relative: str, classes: list[str]) -> Callable[[Path], tuple[LabelledImages, LabelledImages]]:
    def load(root: Path):
        return from_npz(root / relative, "train", classes), from_npz(root / relative, "test", classes)
    return load


def pathmnist_splits(root: Path):
    """Only a 718-image slice of the PathMNIST test split is available: split it 60/40 by class."""
    names = ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal mucosa", "stroma", "tumour"]
    data = from_npz(root / "pathology/pathmnist_test_subset/pathmnist.npz", "test", names)
    train, test = group_split(data, [0.6, 0.4], seed=0)
    return train, test


def isic_splits(root: Path):
    """Nevus vs melanoma from the two small-size UDA-1 folders (500 distinct lesions), split by lesion id."""
    images, labels, groups = [], [], []
    for folder in ("dermoscopy/isic_uda1_300x225", "dermoscopy/isic_uda1_250px"):
        for meta_path in sorted((root / folder).glob("ISIC_*.json")):
            diagnosis = json.loads(meta_path.read_text()).get("meta", {}).get("clinical", {}).get("diagnosis")
            if diagnosis in ("nevus", "melanoma"):
                images.append(str(meta_path.with_suffix(".jpg")))
                labels.append(int(diagnosis == "melanoma"))
                groups.append(meta_path.stem)
    data = LabelledImages(images, np.array(labels), ["nevus", "melanoma"], groups, "isic")
    train, test = group_split(data, [0.7, 0.3], seed=0)
    return train, test


def oct_splits(root: Path):
    """Kermany OCT 4-class from all OCT folders, split by patient id (CLASS-patient-slice)."""
    images, labels, groups = [], [], []
    for path in sorted((root / "oct").rglob("*.jpeg")):
        match = re.match(r"(?:test_)?([A-Za-z]+)(?:-(\d+)-\d+)?", path.stem)
        label = match.group(1).upper()
        images.append(str(path))
        labels.append(OCT_CLASSES.index(label))
        groups.append(match.group(2) or path.stem)
    data = LabelledImages(images, np.array(labels), OCT_CLASSES, groups, "oct")
    train, test = group_split(data, [0.7, 0.3], seed=0)
    return train, test


BENCHMARKS: dict[str, tuple[str, Callable]] = {
    "PneumoniaMNIST": ("xray", _npz("xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz", ["normal", "pneumonia"])),
    "RetinaMNIST": ("fundus", _npz("fundus/retinamnist/retinamnist.npz", [f"grade {i}" for i in range(5)])),
    "BloodMNIST": ("pathology", _npz("pathology/bloodmnist/bloodmnist.npz",
                                     ["basophil", "eosinophil", "erythroblast", "immature granulocyte", "lymphocyte",
                                      "monocyte", "neutrophil", "platelet"])),
    "PathMNIST (subset)": ("pathology", pathmnist_splits),
    "ISIC nevus vs melanoma": ("dermoscopy", isic_splits),
    "Kermany OCT": ("oct", oct_splits),
}


def _cap(data: LabelledImages, limit: int | None, seed: int = 0) -> LabelledImages:
    if limit is None or len(data) <= limit:
        return data
    return data.subset(sorted(np.random.default_rng(seed).choice(len(data), limit, replace=False)))


def evaluate(model, root: Path, names: list[str] | None = None, feature: str = "embedding", max_train: int | None = 3000,
             max_test: int | None = 2000, cache_dir: str | None = None, progress: bool = False) -> dict:
    """``{dataset: {"linear probe": metrics, "kNN": metrics, "sizes": ...}}`` on the test splits."""
    results = {}
    for name in names or list(BENCHMARKS):
        if name not in BENCHMARKS:
            raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(BENCHMARKS)}")
        modality, load = BENCHMARKS[name]
        train, test = load(root)
        train, test = _cap(train, max_train), _cap(test, max_test)
        train_x = extract_features(model, train.images, modality, feature, cache_dir, progress=progress)
        test_x = extract_features(model, test.images, modality, feature, cache_dir, progress=progress)
        num_classes = len(train.class_names)
        probe = linear_probe(train_x, train.labels, test_x)
        knn = knn_classify(train_x, train.labels, test_x, num_classes=num_classes)
        results[name] = {
            protocol: {key: value for key, value in classification_metrics(test.labels, scores, train.class_names).items()
                       if key in ("accuracy", "balanced_accuracy", "auc", "f1")}
            for protocol, scores in (("linear probe", probe), ("kNN", knn))
        }
        results[name]["sizes"] = {"train": len(train), "test": len(test)}
    return results


FULL_RESOLUTION = {
    "xray": ["xray/nih_chestxray14_examples/*.png"],
    "fundus": ["fundus/skimage_examples/retina.jpg"],
    "dermoscopy": ["dermoscopy/isic_uda1_fullres/*.jpg"],
    "pathology": ["pathology/crc_val_he_7k_examples/*", "pathology/skimage_examples/ihc.png"],
}
OUT_OF_SCOPE = ["other/pydicom_test_files/*.dcm"]  # CT and MR slices: none of the five modalities


def _glob(root: Path, patterns: list[str]) -> list[str]:
    return sorted(str(p) for pattern in patterns for p in root.glob(pattern) if p.is_file())


def modality_separation(model, root: Path, per_modality: int = 200) -> dict:
    """How ``modality="auto"`` answers on held-out images of known modality.

    On up to ``per_modality`` test-split images per modality: the share that ``auto`` names
    correctly per modality and their macro mean (the headline; ``"unknown"`` counts as wrong),
    the share called ``"unknown"``, the modality x expert confusion counts, the NMI between
    modality and argmax expert and the cosine silhouette of the embeddings grouped by
    modality. Also what ``auto`` says for the full-resolution examples and for the CT / MR
    slices in ``other/`` (out of scope: the right answer is ``"unknown"``). Accuracies need a
    calibrated model; an uncalibrated one gets NMI, confusion and silhouette only.
    """
    from sklearn.metrics import normalized_mutual_info_score, silhouette_score

    images: dict[str, list] = {}
    for name, (modality, load) in BENCHMARKS.items():
        images.setdefault(modality, []).extend(load(root)[1].images)
    paths, labels = [], []
    for modality, items in images.items():
        picks = np.random.default_rng(0).permutation(len(items))[:per_modality]
        paths += [items[i] for i in picks]
        labels += [modality] * len(picks)
    encoding = model.encode(paths, modality="auto", batch_size=64)
    experts, names = encoding.expert_index.numpy(), list(images)
    confusion = np.zeros((len(names), model.config.num_experts), dtype=int)
    np.add.at(confusion, ([names.index(m) for m in labels], experts), 1)
    scores: dict = {
        "nmi": float(normalized_mutual_info_score(labels, experts)),
        "silhouette": float(silhouette_score(encoding.embedding.numpy(), labels, metric="cosine")),
        "confusion": {"modalities": names, "experts": list(model.config.expert_modalities), "counts": confusion.tolist()},
    }
    if model.config.modality_calibration is not None:
        said, truth = np.array(encoding.modality), np.array(labels)
        scores["accuracy"] = {m: float((said[truth == m] == m).mean()) for m in names}
        scores["macro_accuracy"] = float(np.mean(list(scores["accuracy"].values())))
        scores["unknown_rate"] = {m: float((said[truth == m] == UNKNOWN).mean()) for m in names}
        examples = {m: _glob(root, patterns) for m, patterns in FULL_RESOLUTION.items()}
        said_full = model.encode([p for group in examples.values() for p in group], modality="auto").modality
        detected, start = {}, 0
        for modality, group in examples.items():
            detected[modality] = dict(zip((Path(p).name for p in group), said_full[start : start + len(group)]))
            start += len(group)
        scores["full_resolution_examples"] = detected
        outside = _glob(root, OUT_OF_SCOPE)
        scores["out_of_scope"] = dict(zip((Path(p).name for p in outside), model.encode(outside, modality="auto").modality))
    return {"auto routing": scores, "sizes": {"test": len(paths)}}


def markdown_table(results: dict) -> str:
    lines = ["| dataset | train / test | linear probe acc | linear probe AUC | kNN acc | kNN AUC |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        if name == SEPARATION:
            scores = result["auto routing"]
            accuracy = f"{scores['macro_accuracy']:.3f}" if "macro_accuracy" in scores else "n/a (uncalibrated)"
            lines.append(f"| {name} | - / {result['sizes']['test']} | auto macro accuracy {accuracy} | "
                         f"NMI {scores['nmi']:.3f} | silhouette {scores['silhouette']:.3f} | |")
            continue
        probe, knn, sizes = result["linear probe"], result["kNN"], result["sizes"]
        lines.append(f"| {name} | {sizes['train']} / {sizes['test']} | {probe['accuracy']:.3f} | {probe['auc']:.3f} "
                     f"| {knn['accuracy']:.3f} | {knn['auc']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m midol_hub.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registry name, model directory or Hub id")
    parser.add_argument("--out", required=True, help="results JSON (the model card's evaluation table reads it)")
    parser.add_argument("--datasets", nargs="+", default=None, help=f"subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--feature", choices=("embedding", "pooled"), default="embedding")
    parser.add_argument("--max-train", type=int, default=3000, help="subsample larger training splits (CPU time)")
    parser.add_argument("--max-test", type=int, default=2000)
    parser.add_argument("--cache-dir", default=None, help="feature cache folder")
    parser.add_argument("--random-weights", action="store_true", help="evaluate a registry architecture with random weights")
    parser.add_argument("--separation", action="store_true", help="also measure how modality='auto' answers (accuracy per modality, confusion, NMI, unknowns)")
    args = parser.parse_args(argv)
    root = data_root()
    try:
        if not root.is_dir():
            raise DatasetError(f"MIDOL_DATA={root} is not a folder; point MIDOL_DATA at the shared data")
        if args.random_weights:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = load_model(args.model, pretrained=False)
        else:
            model = load_model(args.model)
        results = evaluate(model, root, args.datasets, args.feature, args.max_train, args.max_test, args.cache_dir, progress=True)
        if args.separation:
            results[SEPARATION] = modality_separation(model, root)
    except (DatasetError, ModelNotFoundError, WeightsNotAvailableError, ValueError) as error:
        print(f"midol_hub.evaluate: error: {error}", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
