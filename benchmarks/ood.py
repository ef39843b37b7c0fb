"""Out-of-scope detectors compared: ``python -m benchmarks.ood --model NAME [--out results.json]``.

Every detector is fitted on training images only (``shared_data.calibration_images``, what
midol-micro is calibrated on), two-fold: each half
is scored by a detector fitted on the other half. Its threshold is the ``QUANTILE`` of those
held-out in-scope scores, so every detector wrongly rejects the same share of held-out training
images; the comparison is the share of the out-of-scope set
(``benchmarks.shared_data.out_of_scope_set``) it calls out of scope at that threshold, and the
AUROC between held-out in-scope and out-of-scope scores. No test image enters the choice (the
shipped detector's false-unknown rate on the test parts is in ``benchmarks.evaluate``). Candidates: kNN distance on L2-normalised
features (Sun et al., ICML 2022), class-conditional Mahalanobis with a tied covariance (Lee et
al., NeurIPS 2018, full and on its 64 leading components), a diagonal Gaussian per modality
(midol-micro v2's), the energy and the maximum probability of the router, on the final pooled
feature and on all four stages (``stage_pooled``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from midol_hub import load_model
from midol_hub.calibration import fit_detector, held_out_distances
from midol_hub.detection import modality_distances, out_of_scope_score

from .shared_data import calibration_images, data_root, fullres_parts, out_of_scope_set

QUANTILE = 0.975


def features(model, groups: dict[str, list]) -> dict[str, np.ndarray]:
    """pooled, stage_pooled (both L2-normalised), router logits and labels of every image."""
    out: dict[str, list] = {"pooled": [], "stage_pooled": [], "logits": [], "labels": []}
    for label, images in groups.items():
        enc = model.encode(images, modality="auto", output=("pooled", "stage_pooled"), batch_size=32)
        out["pooled"].append(torch.nn.functional.normalize(enc.pooled, dim=-1).numpy())
        out["stage_pooled"].append(enc.stage_pooled.numpy())
        with torch.no_grad():
            out["logits"].append(model.head.route(enc.pooled).numpy())
        out["labels"] += [label] * len(enc)
    return {key: np.concatenate(value) if key != "labels" else np.array(value) for key, value in out.items()}


def _knn(train: np.ndarray, labels: np.ndarray, k: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.sort(1 - x @ train.T, axis=1)[:, k - 1]


def _mahalanobis(train: np.ndarray, labels: np.ndarray, components: int | None = None) -> Callable:
    detector = fit_detector(torch.from_numpy(train), list(labels), components or train.shape[1])
    return lambda x: out_of_scope_score(detector, torch.from_numpy(x)).numpy()


def _mahalanobis_clusters(train: np.ndarray, labels: np.ndarray, clusters: int = 4) -> Callable:
    """Tied-covariance Mahalanobis with ``clusters`` k-means means per modality (its sources differ)."""
    from sklearn.cluster import KMeans

    sub = np.empty(len(labels), dtype=object)
    for modality in np.unique(labels):
        rows = labels == modality
        found = KMeans(min(clusters, rows.sum()), n_init=4, random_state=0).fit_predict(train[rows])
        sub[rows] = [f"{modality}/{c}" for c in found]
    return _mahalanobis(train, sub, 64)


def _diagonal(train: np.ndarray, labels: np.ndarray) -> Callable:
    stats = [(train[labels == m].mean(0), train[labels == m].var(0) + 1e-6) for m in np.unique(labels)]
    return lambda x: np.min([((x - mean) ** 2 / var).mean(1) for mean, var in stats], axis=0)


def _energy(logits: np.ndarray) -> np.ndarray:
    top = logits.max(1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(1)))


def _max_probability(logits: np.ndarray) -> np.ndarray:
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return -(probs / probs.sum(1, keepdims=True)).max(1)


DETECTORS = {
    "kNN distance (k=1)": lambda t, y: _knn(t, y, 1),
    "kNN distance (k=10)": lambda t, y: _knn(t, y, 10),
    "Mahalanobis, tied covariance": lambda t, y: _mahalanobis(t, y),
    "Mahalanobis, tied covariance, 64 components": lambda t, y: _mahalanobis(t, y, 64),
    "Mahalanobis, tied covariance, 64 components, 4 means per modality": _mahalanobis_clusters,
    "diagonal Gaussian per modality": _diagonal,
}


def compare(model, root: Path) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    train_groups = calibration_images(root)
    train, outside = features(model, train_groups), features(model, {"out of scope": out_of_scope_set(root)})
    halves = np.array_split(rng.permutation(len(train["labels"])), 2)
    rows = []
    for feature in ("pooled", "stage_pooled"):
        for name, build in DETECTORS.items():
            held_out, outside_scores = np.empty(len(train["labels"])), []
            for fit_on, score_on in (halves, halves[::-1]):
                score = build(train[feature][fit_on], train["labels"][fit_on])
                held_out[score_on] = score(train[feature][score_on])
                outside_scores.append(score(outside[feature]))
            rows.append(_row(f"{name} on {feature}", held_out, np.mean(outside_scores, axis=0), train["labels"]))
    for name, function in (("router energy", _energy), ("router maximum probability", _max_probability)):
        rows.append(_row(name, function(train["logits"]), function(outside["logits"])))
    rows.append(_shipped_row(train, outside))
    full = set(p for files in fullres_parts(root, "train").values() for p in files)
    fullres = np.array([isinstance(item, str) and item in full for items in train_groups.values() for item in items])
    return rows, naming_rows(model, train, fullres)


def _shipped(train: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    """What ``midol_hub.calibrate`` fits, through its own functions: the detector on all training
    features, the held-out (two-fold) distances, and each image's nearest modality among them."""
    features, labels = torch.from_numpy(train["stage_pooled"]), list(train["labels"])
    detector = fit_detector(features, labels, 64)
    distances = held_out_distances(features, labels, 64).numpy()  # columns in detector["modalities"] order
    return detector, distances, np.array(detector["modalities"])[distances.argmin(1)]


def naming_rows(model, train: dict, fullres: np.ndarray) -> list[dict]:
    """Per modality, the share of held-out training images named right by the router's argmax and by
    the nearest modality under the detector's distance (fitted on the other half), on all of them
    and on the full-resolution files alone."""
    _, _, nearest = _shipped(train)
    router = np.array([model.config.expert_modalities[i] for i in train["logits"].argmax(1)])
    rows = []
    for subset, mask in (("all", np.ones(len(router), dtype=bool)), ("full-resolution", fullres)):
        for m in dict.fromkeys(train["labels"]):
            chosen = mask & (train["labels"] == m)
            if chosen.any():
                rows.append({"images": subset, "modality": m, "count": int(chosen.sum()),
                             "router": float((router[chosen] == m).mean()), "nearest": float((nearest[chosen] == m).mean())})
    return rows


def _shipped_row(train: dict, outside: dict) -> dict:
    """The shipped form, exactly as calibrated: tied Mahalanobis (64 components) on stage_pooled, each
    modality's own threshold from its held-out scores, applied by the nearest modality."""
    detector, distances, _ = _shipped(train)
    held_out = distances.min(1)
    thresholds = {m: np.quantile(held_out[train["labels"] == m], QUANTILE) for m in detector["modalities"]}
    scores = modality_distances(detector, torch.from_numpy(outside["stage_pooled"])).numpy()
    flagged = [d.min() > thresholds[detector["modalities"][int(d.argmin())]] for d in scores]
    wrong = {m: float((held_out[train["labels"] == m] > t).mean()) for m, t in thresholds.items()}
    return {"detector": "Mahalanobis, tied covariance, 64 components on stage_pooled, a threshold per modality (shipped)",
            "out_of_scope_called_unknown": float(np.mean(flagged)), "auroc": float("nan"),
            "in_scope_images": len(held_out), "out_of_scope_images": len(flagged), "held_out_called_unknown": wrong}


def _row(name: str, held_out: np.ndarray, outside: np.ndarray, labels: np.ndarray | None = None) -> dict:
    threshold = np.quantile(held_out, QUANTILE)
    auroc = roc_auc_score(np.r_[np.zeros(len(held_out)), np.ones(len(outside))], np.r_[held_out, outside])
    row = {"detector": name, "out_of_scope_called_unknown": float((outside > threshold).mean()), "auroc": float(auroc),
           "in_scope_images": len(held_out), "out_of_scope_images": len(outside)}
    if labels is not None:
        row["held_out_called_unknown"] = {m: float((held_out[labels == m] > threshold).mean()) for m in np.unique(labels)}
    return row


def naming_markdown(rows: list[dict]) -> str:
    lines = ["| held-out training images | modality | images | named right by the router's argmax | by the nearest "
             "modality |", "|---|---|---|---|---|"]
    lines += [f"| {r['images']} | {r['modality']} | {r['count']} | {r['router']:.3f} | {r['nearest']:.3f} |" for r in rows]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = [f"| detector (threshold: the {QUANTILE} quantile of held-out training scores) | out-of-scope images called "
             "unknown | AUROC, held-out training vs out of scope |", "|---|---|---|"]
    lines += [f"| {r['detector']} | {r['out_of_scope_called_unknown']:.3f} | "
              f"{'n/a' if np.isnan(r['auroc']) else format(r['auroc'], '.3f')} |" for r in rows]
    one = rows[-1]["held_out_called_unknown"]
    shared = next(r for r in rows if r["detector"] == "Mahalanobis, tied covariance, 64 components on stage_pooled")
    lines += ["", "Held-out training images called unknown per modality, one threshold for all (Mahalanobis, 64 "
              "components, stage_pooled) against one per modality: " + ", ".join(
                  f"{m} {shared['held_out_called_unknown'][m]:.3f} -> {one[m]:.3f}" for m in one) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="midol-micro")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    rows, naming = compare(load_model(args.model), data_root())
    if args.out:
        Path(args.out).write_text(json.dumps({"detectors": rows, "naming": naming}, indent=2))
    print(markdown(rows))
    print()
    print(naming_markdown(naming))
    return 0


if __name__ == "__main__":
    sys.exit(main())
