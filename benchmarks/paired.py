"""How far chance moves a comparison on the test splits: ``python -m benchmarks.paired --model midol-lite``.

The model and a baseline of its architecture (``--baseline imagenet``: its ImageNet start; or
``random``) are measured on the same test images as ``benchmarks.evaluate`` measures them (same
splits, caps and protocols), per image: linear probe right, kNN right, and the precision@10 of
its query. The difference of the two, per set and averaged over the sets, comes with a 95%
paired bootstrap interval: test *groups* (a patient, a lesion; one image each for the MedMNIST
arrays) are drawn with replacement, the same draw for both models, and each set is drawn on its
own for the mean. An interval that holds the issue's bound (for example -0.02 for a set, +0.02
for the mean) says the test images cannot tell whether the bound is met; one that excludes it
says they can. Single-label sets only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from midol_hub import DatasetError, knn_classify, linear_probe
from midol_hub.evaluation import retrieval_hits

from benchmarks.evaluate import COMPARED, FEATURES, capped_splits, features_of, model_at
from training.shared_data import BENCHMARKS, data_root

DRAWS, LEVEL, CHUNK = 10_000, 0.95, 500


def outcomes(model, root: Path, feature: str = "pooled", max_train: int | None = 3000, max_test: int | None = 2000,
             cache_dir: str | None = None, names: list[str] | None = None) -> dict[str, dict]:
    """Per labelled set: ``scores`` (3, N), one row per :data:`~benchmarks.evaluate.COMPARED` figure
    (probe right, kNN right, precision@10 of the query), and the test images' ``groups``."""
    found = {}
    for name in names or list(BENCHMARKS):
        modality, train, test = capped_splits(root, name, max_train, max_test)
        if test.multilabel:
            raise DatasetError(f"{name} is multi-label; benchmarks.paired compares single-label sets (leave it out with --datasets)")
        train_x = features_of(model, train.images, modality, feature, cache_dir)
        test_x = features_of(model, test.images, modality, feature, cache_dir)
        labels = np.asarray(test.labels)
        probe = linear_probe(train_x, train.labels, test_x).argmax(1) == labels
        knn = knn_classify(train_x, train.labels, test_x, num_classes=len(train.class_names)).argmax(1) == labels
        precision = retrieval_hits(train_x, train.labels, test_x, labels, 10).mean(1)
        found[name] = {"scores": np.stack([probe, knn, precision]).astype(float), "groups": list(test.groups)}
    return found


def group_draws(differences: np.ndarray, groups: list, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """(draws, M): the mean over images of ``differences`` (M, N) for each bootstrap draw of whole
    groups (with replacement, as many as there are), weighted by their images."""
    names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    sums = np.stack([np.bincount(index, weights=row, minlength=len(names)) for row in differences])  # (M, G)
    sizes = np.bincount(index, minlength=len(names))
    rng, chosen = np.random.default_rng(seed), []
    for start in range(0, draws, CHUNK):  # times each group is drawn, (chunk, G): memory stays small
        counts = rng.multinomial(len(names), np.full(len(names), 1 / len(names)), size=min(CHUNK, draws - start))
        chosen.append(counts @ sums.T / (counts @ sizes)[:, None])
    return np.concatenate(chosen)


def compare(model: dict[str, dict], baseline: dict[str, dict], draws: int = DRAWS, seed: int = 0) -> dict[str, dict]:
    """Model minus baseline (two :func:`outcomes` of the same images) per set and for the mean over
    the sets: the measured ``difference`` and the ``low`` / ``high`` ends of its 95% interval, per
    compared figure."""
    tails = [(1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100]
    rows, total = {}, 0
    for offset, (name, ours) in enumerate(model.items()):
        theirs = baseline[name]
        if theirs["groups"] != ours["groups"] or theirs["scores"].shape != ours["scores"].shape:
            raise ValueError(f"{name}: the two outcomes are not of the same test images; measure both with the same caps")
        differences = ours["scores"] - theirs["scores"]
        sampled = group_draws(differences, ours["groups"], draws, seed + offset)
        total = total + sampled
        low, high = np.percentile(sampled, tails, axis=0)
        rows[name] = {"images": differences.shape[1], "groups": len(set(ours["groups"])),
                      "difference": differences.mean(1).tolist(), "low": low.tolist(), "high": high.tolist()}
    low, high = np.percentile(total / len(model), tails, axis=0)
    rows["mean"] = {"difference": np.mean([r["difference"] for r in rows.values()], axis=0).tolist(),
                    "low": low.tolist(), "high": high.tolist()}
    return rows


def markdown(rows: dict[str, dict], baseline: str) -> str:
    heads = " / ".join(f"{protocol} {metric}" for protocol, metric in COMPARED)
    lines = [f"| set | test images | groups drawn | model minus {baseline}, 95% interval: {heads} |", "|---|---|---|---|"]
    for name, row in rows.items():
        cells = " / ".join(f"{d:+.3f} ({lo:+.3f} to {hi:+.3f})" for d, lo, hi in zip(row["difference"], row["low"], row["high"]))
        label = f"**mean over the {len(rows) - 1}**" if name == "mean" else name
        sizes = " | ".join(f"{row[key]:,}" if key in row else "" for key in ("images", "groups"))
        lines.append(f"| {label} | {sizes} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registry name, model directory or Hub id")
    parser.add_argument("--baseline", choices=("imagenet", "random"), default="imagenet",
                        help="the same architecture from its ImageNet start (installed weights) or seeded random weights")
    parser.add_argument("--feature", choices=FEATURES, default="pooled", help="the model's feature (the baseline's: pooled)")
    parser.add_argument("--max-train", type=int, default=3000)
    parser.add_argument("--max-test", type=int, default=2000)
    parser.add_argument("--cache-dir", default=None, help="feature cache folder (benchmarks.release's WORK/feature_cache)")
    parser.add_argument("--datasets", nargs="+", default=None, choices=list(BENCHMARKS), metavar="SET")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    root = data_root()
    measured = {label: outcomes(model_at(args.model, init), root, feature, args.max_train, args.max_test, args.cache_dir,
                                args.datasets)
                for label, init, feature in (("model", "trained", args.feature), ("baseline", args.baseline, "pooled"))}
    rows = compare(measured["model"], measured["baseline"])
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(markdown(rows, "the ImageNet start" if args.baseline == "imagenet" else "random weights"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
