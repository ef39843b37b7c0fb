"""Out-of-scope detectors compared: ``python -m benchmarks.ood --model NAME [--init imagenet|random] [--out results.json]``.

Every detector is fitted on training images only (``shared_data.calibration_set``, what
midol-micro is calibrated on), two-fold by group (patient, lesion, slide, source file): each
half is scored by a detector fitted on the other half. Its threshold is the ``QUANTILE`` of those
held-out in-scope scores, so every detector wrongly rejects the same share of held-out training
images; the comparison is the share of the out-of-scope set
(``training.shared_data.out_of_scope_set``) it calls out of scope at that threshold, and the
AUROC between held-out in-scope and out-of-scope scores. No test image enters the choice (the
shipped detector's false-unknown rate on the test parts is in ``benchmarks.evaluate``). Candidates: kNN distance on L2-normalised
features (Sun et al., ICML 2022), class-conditional Mahalanobis with a tied covariance (Lee et
al., NeurIPS 2018, full and on its leading components), a diagonal Gaussian per modality
(midol-micro v2's), the energy and the maximum probability of the router, on the final pooled
feature and on all four stages (``stage_pooled``). A second table varies the shipped form's
calibration settings (with or without the crops of full-resolution files, its number of components,
the quantile where P(in scope) is 1/2 and the slope past it): held-out whole full-resolution files
named right per modality, held-out whole images and out-of-scope images called unknown, and the
confidence's calibration error and AUROC; :func:`chosen_setting` states the rule that picks the
shipped settings from it. A third asks what users' own images meet, images from a dataset the
calibration never saw: for each modality calibrated from several datasets, the shipped form is
fitted without one of them, then names that dataset's images (beside the same images' answers
when only their own patient, lesion or slide was held out). ``--init`` measures a baseline of the
same architecture instead of the trained model, as in ``benchmarks.evaluate``: its ImageNet start
(the router is random there, so only the feature-distance rows mean anything) or seeded random weights.
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

from midol_hub.calibration import (
    COMPONENTS,
    QUANTILE,
    REPEATS,
    SLOPE,
    fit_detector,
    fit_out_of_scope,
    held_out_distances,
    two_fold,
    uncalibrated,
)
from midol_hub.detection import DistanceAnswers, answer_by_distance, modality_distances, out_of_scope_score
from midol_hub.evaluation import calibration_error
from midol_hub.modalities import UNKNOWN

from benchmarks.evaluate import INITS, model_at
from training.shared_data import CALIBRATION_CROPS, calibration_set, data_root, out_of_scope_set


def features(model, images: dict[str, list]) -> dict[str, np.ndarray]:
    """pooled, stage_pooled (both L2-normalised), router logits and labels of every image."""
    out: dict[str, list] = {"pooled": [], "stage_pooled": [], "logits": [], "labels": []}
    for label, items in images.items():
        enc = model.encode(items, modality="auto", output=("pooled", "stage_pooled"), batch_size=32)
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
    return _mahalanobis(train, sub, COMPONENTS)


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
    f"Mahalanobis, tied covariance, {COMPONENTS} components": lambda t, y: _mahalanobis(t, y, COMPONENTS),
    f"Mahalanobis, tied covariance, {COMPONENTS} components, 4 means per modality": _mahalanobis_clusters,
    "diagonal Gaussian per modality": _diagonal,
}


VIEW_CROPS, VIEW_COMPONENTS, VIEW_QUANTILES, VIEW_SLOPES = 4, (32, 64), (0.95, 0.975), (1.0, 1.5, 2.0)
"""The calibration settings the second table tries (without crops and with ``VIEW_CROPS`` of each
full-resolution file); the shipped ones are the row :func:`chosen_setting` picks."""


def development_side(model, root: Path) -> tuple[dict, dict, list, np.ndarray]:
    """Features of the calibration set and the out-of-scope set, the calibration set's groups and
    kinds (labelled, file, crop, tile): everything the tables below are computed from. The
    training features carry ``sources`` (each image's dataset)."""
    calibration = calibration_set(root, crops=VIEW_CROPS)
    with uncalibrated(model):
        train, outside = features(model, calibration.images), features(model, {"out of scope": out_of_scope_set(root)})
    train["sources"] = np.array([s for ids in calibration.sources.values() for s in ids])
    groups = [(m, g) for m, ids in calibration.groups.items() for g in ids]
    kinds = np.array([k for ids in calibration.kinds.values() for k in ids])
    return train, outside, groups, kinds


def compare(model, root: Path, side: tuple | None = None) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """The detector, naming, calibration-settings and new-dataset tables (``side``:
    :func:`development_side`'s features, computed here when not given). All but the settings table
    are computed on what the shipped calibration is fitted on (``CALIBRATION_CROPS`` crops of each
    full-resolution file)."""
    all_train, outside, all_groups, all_kinds = side or development_side(model, root)
    train, groups, kinds = _with_crops(all_train, all_groups, all_kinds, CALIBRATION_CROPS > 0)
    sides = two_fold(groups)
    halves = [np.flatnonzero(sides == 0), np.flatnonzero(sides == 1)]
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
    shipped = _shipped(train, groups)
    first_split = answer_by_distance(shipped, _held_out(train, groups, COMPONENTS, 0))
    rows.append(_shipped_row(shipped, first_split, train, outside))
    settings = [row for crops in (False, True) for components in VIEW_COMPONENTS
                for row in _settings_rows(all_train, outside, all_groups, all_kinds, crops, components)]
    return rows, naming_rows(model, train, first_split, kinds == "file"), settings, new_source_rows(train, groups, kinds,
                                                                                                  first_split)


def new_source_rows(train: dict, groups: list, kinds: np.ndarray, group_held_out: DistanceAnswers) -> list[dict]:
    """Per modality calibrated from more than one dataset, per dataset: the shipped form fitted on
    everything but that dataset (and any group it shares with another), and the share of its whole
    images (labelled images, full-resolution files, region tiles; not crops) named right, called
    unknown and named another modality; beside them the same images' answers under
    ``group_held_out`` (only their own group held out)."""
    labels, sources = train["labels"], train["sources"]
    whole, before = kinds != "crop", np.array(group_held_out.modality)
    rows = []
    for modality in dict.fromkeys(labels):
        for source in dict.fromkeys(sources[labels == modality]):
            held = {g for g, s in zip(groups, sources) if s == source}
            kept = np.array([g not in held for g in groups])
            if not (kept & (labels == modality)).any():
                continue
            scored = np.flatnonzero(~kept & whole & (sources == source))
            if not len(scored):
                continue
            fitted = _shipped({key: value[kept] for key, value in train.items()}, [g for g, k in zip(groups, kept) if k])
            said = np.array(answer_by_distance(fitted, modality_distances(
                fitted["out_of_scope"], torch.from_numpy(train["stage_pooled"][scored]))).modality)
            rows.append({"modality": modality, "source": str(source), "images": len(scored),
                         "named_right": float((said == modality).mean()), "unknown": float((said == UNKNOWN).mean()),
                         "named_other": {str(m): int((said == m).sum()) for m in sorted(set(said) - {modality, UNKNOWN})},
                         "named_right_group_held_out": float((before[scored] == modality).mean())})
    return rows


def new_source_markdown(rows: list[dict]) -> str:
    lines = ["| modality | dataset left out of calibration | its images | named right | called unknown | named another "
             "modality | named right with only their own group held out |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['modality']} | {r['source']} | {r['images']} | {r['named_right']:.3f} | {r['unknown']:.3f} | "
              f"{', '.join(f'{m} {n}' for m, n in r['named_other'].items()) or '-'} | "
              f"{r['named_right_group_held_out']:.3f} |" for r in rows]
    return "\n".join(lines)


def _with_crops(train: dict, groups: list, kinds: np.ndarray, crops: bool) -> tuple[dict, list, np.ndarray]:
    """The development side's training features with or without the crops of full-resolution files."""
    keep = np.ones(len(kinds), dtype=bool) if crops else kinds != "crop"
    return {key: value[keep] for key, value in train.items()}, [g for g, k in zip(groups, keep) if k], kinds[keep]


def _shipped(train: dict, groups: list, components: int = COMPONENTS, quantile: float = QUANTILE,
             slope: float = SLOPE) -> dict:
    """What ``midol_hub.calibrate`` fits, through its own function, on these training features."""
    return fit_out_of_scope(torch.from_numpy(train["stage_pooled"]), list(train["labels"]), groups, quantile, components,
                            REPEATS, slope)


def _held_out(train: dict, groups: list, components: int, seed: int) -> torch.Tensor:
    return held_out_distances(torch.from_numpy(train["stage_pooled"]), list(train["labels"]), components, groups, seed)


def _outside(calibration: dict, outside: dict) -> DistanceAnswers:
    distances = modality_distances(calibration["out_of_scope"], torch.from_numpy(outside["stage_pooled"]))
    return answer_by_distance(calibration, distances)


def naming_rows(model, train: dict, held_out: DistanceAnswers, fullres: np.ndarray) -> list[dict]:
    """Per modality, the share of held-out training images named right by the router's argmax and by
    the nearest modality under the detector's distance (``held_out``: fitted on the other half), on
    all of them and on the whole full-resolution files alone."""
    nearest = np.array(held_out.nearest)
    router = np.array([model.config.expert_modalities[i] for i in train["logits"].argmax(1)])
    rows = []
    for subset, mask in (("all", np.ones(len(router), dtype=bool)), ("full-resolution", fullres)):
        for m in dict.fromkeys(train["labels"]):
            chosen = mask & (train["labels"] == m)
            if chosen.any():
                rows.append({"images": subset, "modality": m, "count": int(chosen.sum()),
                             "router": float((router[chosen] == m).mean()), "nearest": float((nearest[chosen] == m).mean())})
    return rows


def _shipped_row(shipped: dict, held_out: DistanceAnswers, train: dict, outside: dict) -> dict:
    """The shipped form, exactly as calibrated: tied Mahalanobis on stage_pooled, each modality's own
    threshold from its held-out scores, applied by the nearest modality."""
    unknown = np.array(held_out.modality) == UNKNOWN
    wrong = {m: float(unknown[train["labels"] == m].mean()) for m in shipped["out_of_scope"]["modalities"]}
    return {"detector": f"Mahalanobis, tied covariance, {COMPONENTS} components on stage_pooled, P(in scope) 1/2 at "
                        f"each modality's {QUANTILE} quantile of {REPEATS} held-out splits, slope {SLOPE:g} "
                        "(midol_hub.calibration's defaults)",
            "out_of_scope_called_unknown": float(np.mean(np.array(_outside(shipped, outside).modality) == UNKNOWN)),
            "auroc": float("nan"), "in_scope_images": len(train["labels"]), "out_of_scope_images": len(outside["labels"]),
            "held_out_called_unknown": wrong}


def _settings_rows(train: dict, outside: dict, groups: list, kinds: np.ndarray, crops: bool, components: int) -> list[dict]:
    """The shipped form calibrated with or without the crops of full-resolution files and with
    ``components`` directions, for every quantile and slope: held-out whole full-resolution files
    named right per modality (a fresh split, seed 99), held-out whole images (not crops or tiles)
    and out-of-scope images called unknown, and the confidence's expected calibration error and
    AUROC (right vs wrong) over those held-out whole images and the out-of-scope set together."""
    subset, kept_groups, kept_kinds = _with_crops(train, groups, kinds, crops)
    fitted = _shipped(subset, kept_groups, components)  # quantile and slope enter only the answers below
    held_out = _held_out(subset, kept_groups, components, 99)
    outside_distances = modality_distances(fitted["out_of_scope"], torch.from_numpy(outside["stage_pooled"]))
    files, whole, labels = kept_kinds == "file", np.isin(kept_kinds, ("labelled", "file")), subset["labels"]
    rows = []
    for quantile in VIEW_QUANTILES:
        for slope in VIEW_SLOPES:
            calibration = {**fitted, "out_of_scope": {**fitted["out_of_scope"], "quantile": quantile, "slope": slope}}
            held, out = answer_by_distance(calibration, held_out), answer_by_distance(calibration, outside_distances)
            said, said_outside = np.array(held.modality), np.array(out.modality)
            right = np.r_[said[whole] == labels[whole], said_outside == UNKNOWN]
            confidence = np.r_[held.confidence.numpy()[whole], out.confidence.numpy()]
            rows.append({"crops": crops, "components": components, "quantile": quantile, "slope": slope,
                         "full_resolution_named_right": {m: float((said[files & (labels == m)] == m).mean())
                                                         for m in dict.fromkeys(labels) if (files & (labels == m)).any()},
                         "held_out_called_unknown": float((said[whole] == UNKNOWN).mean()),
                         "out_of_scope_called_unknown": float((said_outside == UNKNOWN).mean()),
                         "ece": calibration_error(confidence, right), "auroc": float(roc_auc_score(right, confidence)),
                         "answers_under_one_half": float((confidence < 0.5).mean())})
    return rows


def worst(row: dict) -> float:
    """The worst of a calibration row's held-out full-resolution pathology and dermoscopy files named
    right and out-of-scope images caught (the hardest of the issue's targets on the development side)."""
    named = row["full_resolution_named_right"]
    return min(named["pathology"], named["dermoscopy"], row["out_of_scope_called_unknown"])


def meets_confidence_targets(row: dict) -> bool:
    """Issue 28's development-side bars: held-out whole images called unknown at most 0.05, the
    confidence's expected calibration error at most 0.05 and its AUROC (right vs wrong) at least 0.90."""
    return row["held_out_called_unknown"] <= 0.05 and row["ece"] <= 0.05 and row["auroc"] >= 0.90


def chosen_setting(rows: list[dict]) -> dict:
    """The rule behind the shipped calibration settings: among rows whose held-out whole images are
    called unknown at most 0.05 of the time, those meeting :func:`meets_confidence_targets` first,
    then the highest :func:`worst`, then the lowest expected calibration error."""
    return max((r for r in rows if r["held_out_called_unknown"] <= 0.05),
               key=lambda r: (meets_confidence_targets(r), worst(r), -r["ece"]))


def settings_markdown(rows: list[dict]) -> str:
    modalities = list(rows[0]["full_resolution_named_right"])
    lines = ["| calibrated on | components | quantile (P(in scope) 1/2) | slope | "
             + " | ".join(f"held-out full-res {m} named right" for m in modalities)
             + " | held-out whole training images called unknown | out-of-scope images called unknown | ECE | AUROC "
               "right vs wrong |", "|---|---|---|---|" + "---|" * (len(modalities) + 4)]
    for r in rows:
        what = f"+ {VIEW_CROPS} crops of each full-resolution file" if r["crops"] else "whole files and region tiles"
        lines.append(f"| {what} | {r['components']} | {r['quantile']} | {r['slope']:g} | "
                     + " | ".join(f"{r['full_resolution_named_right'][m]:.3f}" for m in modalities)
                     + f" | {r['held_out_called_unknown']:.3f} | {r['out_of_scope_called_unknown']:.3f} | {r['ece']:.3f} | "
                       f"{r['auroc']:.3f} |")
    return "\n".join(lines)


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
    shared = next(r for r in rows if r["detector"] == f"Mahalanobis, tied covariance, {COMPONENTS} components on stage_pooled")
    lines += ["", f"Held-out training images called unknown per modality, one threshold for all (Mahalanobis, {COMPONENTS} "
              "components, stage_pooled, one split) against one per modality: " + ", ".join(
                  f"{m} {shared['held_out_called_unknown'][m]:.3f} -> {one[m]:.3f}" for m in one) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="midol-micro")
    parser.add_argument("--init", choices=INITS, default="trained",
                        help="trained: the model's weights; a baseline of its architecture: imagenet (the backbone's "
                             "installed ImageNet weights before M-IDoL) or random (seeded)")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    model = model_at(args.model, args.init)
    rows, naming, settings, new_sources = compare(model, data_root())
    if args.out:
        Path(args.out).write_text(json.dumps({"detectors": rows, "naming": naming, "settings": settings,
                                              "new_sources": new_sources}, indent=2))
    print(markdown(rows))
    print()
    print(naming_markdown(naming))
    print()
    print(settings_markdown(settings))
    print()
    print(new_source_markdown(new_sources))
    chosen = chosen_setting(settings)
    print(f"\nchosen (benchmarks.ood.chosen_setting): crops {chosen['crops']}, {chosen['components']} components, "
          f"quantile {chosen['quantile']}, slope {chosen['slope']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
