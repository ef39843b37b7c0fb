"""Out-of-scope detectors compared: ``python -m benchmarks.ood --model NAME [--out results.json]``.

Every detector is fitted on the same training images (the labelled training splits and the
full-resolution training parts; ``training.release_micro`` calibrates on these), and its
threshold is the ``QUANTILE`` of held-out training scores (two-fold). Reported on the
out-of-scope set (``benchmarks.shared_data.out_of_scope_set``): the share called out of scope;
on in-scope test images (test splits and full-resolution test parts): the share wrongly called
out of scope; and the AUROC between the two. Candidates: kNN distance on L2-normalised
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
from midol_hub.calibration import fit_detector
from midol_hub.detection import out_of_scope_score

from .shared_data import data_root, fullres_parts, labelled_splits, out_of_scope_set

QUANTILE = 0.975
PER_MODALITY = 300


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
    "kNN distance (k=1)": ("knn", lambda t, y: _knn(t, y, 1)),
    "kNN distance (k=10)": ("knn", lambda t, y: _knn(t, y, 10)),
    "Mahalanobis, tied covariance": ("mahalanobis", lambda t, y: _mahalanobis(t, y)),
    "Mahalanobis, tied covariance, 64 components": ("mahalanobis", lambda t, y: _mahalanobis(t, y, 64)),
    "diagonal Gaussian per modality": ("diagonal", _diagonal),
}


def compare(model, root: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    sample = lambda d, n: {m: [v[i] for i in sorted(rng.permutation(len(v))[:n])] for m, v in d.items()}  # noqa: E731
    full_train = fullres_parts(root, "train")
    train_groups = {m: list(dict.fromkeys([*v, *full_train.get(m, [])]))
                    for m, v in sample(labelled_splits(root, "train"), PER_MODALITY).items()}
    test_groups = sample(labelled_splits(root, "test"), 200)
    for modality, files in fullres_parts(root, "test").items():
        test_groups[modality] = test_groups[modality] + files
    train, test, outside = (features(model, groups) for groups in
                            (train_groups, test_groups, {"out of scope": out_of_scope_set(root)}))
    halves = np.array_split(rng.permutation(len(train["labels"])), 2)
    rows = []
    for feature in ("pooled", "stage_pooled"):
        for name, (_, build) in DETECTORS.items():
            held_out = np.empty(len(train["labels"]))
            for fit_on, score_on in (halves, halves[::-1]):
                held_out[score_on] = build(train[feature][fit_on], train["labels"][fit_on])(train[feature][score_on])
            score = build(train[feature], train["labels"])
            rows.append(_row(f"{name} on {feature}", held_out, score(test[feature]), score(outside[feature])))
    for name, function in (("router energy", _energy), ("router maximum probability", _max_probability)):
        rows.append(_row(name, function(train["logits"]), function(test["logits"]), function(outside["logits"])))
    return rows


def _row(name: str, held_out: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> dict:
    threshold = np.quantile(held_out, QUANTILE)
    auroc = roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside])
    return {"detector": name, "out_of_scope_called_unknown": float((outside > threshold).mean()),
            "in_scope_called_unknown": float((inside > threshold).mean()), "auroc": float(auroc),
            "in_scope_images": len(inside), "out_of_scope_images": len(outside)}


def markdown(rows: list[dict]) -> str:
    lines = [f"| detector (threshold: {QUANTILE} quantile of held-out training scores) | out of scope called unknown "
             "| in-scope test images called unknown | AUROC |", "|---|---|---|---|"]
    lines += [f"| {r['detector']} | {r['out_of_scope_called_unknown']:.3f} | {r['in_scope_called_unknown']:.3f} | "
              f"{r['auroc']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="midol-micro")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    rows = compare(load_model(args.model), data_root())
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
