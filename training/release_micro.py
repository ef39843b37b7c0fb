"""Reproduce the shipped midol-micro: ``python -m training.release_micro WORK_DIR``.

Writes the training splits of the shared data, trains M-IDoL and the plain-DINO baseline
with ``configs/midol_micro_release.yaml`` (same backbone, data and budget), evaluates random
initialisation, DINO and M-IDoL with ``midol_hub.evaluate``, and exports M-IDoL, calibrated
on the training splits only and stored in fp16, with its model card into ``--install``
(default: the package's ``midol_hub/weights/midol-micro``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from midol_hub import load_model
from midol_hub.evaluate import BENCHMARKS, SEPARATION, data_root, evaluate, modality_separation

from . import export, pretrain
from .prepare_shared_data import prepare

CONFIG = Path(__file__).parent / "configs" / "midol_micro_release.yaml"
PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "midol_hub" / "weights" / "midol-micro"


def train(work: Path, data: list[str], objective: str) -> float:
    """Train one objective unless its run is complete; returns the wall-clock minutes it took."""
    run = work / objective
    started = time.perf_counter()
    args = ["--config", str(CONFIG), "--data", *data, "--output-dir", str(run), "--objective", objective]
    if run.exists():
        args.append("--resume")
    if pretrain.main(args) != 0:
        raise SystemExit(f"training {objective} failed")
    return (time.perf_counter() - started) / 60


def evaluate_all(work: Path, models: dict) -> dict:
    results = {}
    for label, model in models.items():
        path = work / f"results-{label}.json"
        if not path.exists():
            result = evaluate(model, data_root(), cache_dir=str(work / "feature_cache"), progress=True)
            result[SEPARATION] = modality_separation(model, data_root())
            path.write_text(json.dumps(result, indent=2))
        results[label] = json.loads(path.read_text())
    return results


def comparison_notes(results: dict, minutes: dict, config_text: str, calibration: dict) -> str:
    """The card's training and comparison section, written from the measured numbers."""
    labels = {"random": "random init", "dino": "DINO baseline", "midol": "midol-micro (M-IDoL)"}
    lines = ["### Comparison on the test splits", "",
             "| dataset | protocol | " + " | ".join(labels.values()) + " |", "|---|---|---|---|---|"]
    for dataset in BENCHMARKS:
        for protocol, metric in (("linear probe", "accuracy"), ("linear probe", "auc"), ("kNN", "accuracy")):
            cells = [f"{results[k][dataset][protocol][metric]:.3f}" for k in labels]
            lines.append(f"| {dataset} | {protocol} {metric} | " + " | ".join(cells) + " |")
    for metric in ("routing_purity", "silhouette"):
        cells = [f"{results[k][SEPARATION]['auto routing'][metric]:.3f}" if metric in results[k][SEPARATION]["auto routing"]
                 else "n/a" for k in labels]
        lines.append(f"| modality separation | {metric.replace('_', ' ')} | " + " | ".join(cells) + " |")
    mean = {k: np.mean([results[k][d]["linear probe"]["accuracy"] for d in BENCHMARKS]) for k in labels}
    gap = (mean["midol"] - mean["dino"]) * 100
    if abs(gap) < 1:
        verdict = (f"M-IDoL and the DINO baseline are level at this scale: mean linear-probe accuracy {mean['midol']:.3f} "
                   f"vs {mean['dino']:.3f} ({gap:+.1f} points from one seed each, too small to favour either)")
    elif gap > 0:
        verdict = f"At this scale M-IDoL beats the DINO baseline by {gap:.1f} points of mean linear-probe accuracy"
    else:
        verdict = f"At this scale M-IDoL does **not** beat the DINO baseline: it is {-gap:.1f} points lower in mean linear-probe accuracy"
    purity = calibration["purity"]
    separated = [m for m, p in sorted(purity.items(), key=lambda i: -i[1]) if p >= 0.5]
    mixed = [m for m in purity if m not in separated]
    silhouette = {k: results[k][SEPARATION]["auto routing"]["silhouette"] for k in ("dino", "midol")}
    routed = results["midol"][SEPARATION]["auto routing"]["routing_purity"]
    lines += ["", f"{verdict}; random initialisation of the same architecture reaches {mean['random']:.3f} (means over the "
              "six datasets). The router sends "
              f"{routed:.0%} of the test images to their own modality's expert (chance: {1 / len(purity):.0%}). On the "
              f"training splits it separates {', '.join(f'{m} ({purity[m]:.0%})' for m in separated) or 'no modality'} but "
              f"routes {', '.join(f'{m} ({purity[m]:.0%})' for m in mixed) or 'nothing'} mostly to other experts, so the "
              "expert subspaces are not yet one per modality. By the cosine silhouette of the embeddings grouped by "
              f"modality, DINO separates modalities {'better' if silhouette['dino'] > silhouette['midol'] else 'worse'} "
              f"({silhouette['dino']:.3f} vs {silhouette['midol']:.3f}). One epoch on about 16,000 small images is far from "
              "the paper's 100 epochs on 1.15 M images; these numbers say the pipeline works, not that the method does or "
              "does not.", ""]
    lines += [
              "### Training", "",
              f"One epoch over the training splits (balanced by modality) on a 2-core CPU: M-IDoL {minutes['midol']:.0f} "
              f"min, DINO baseline {minutes['dino']:.0f} min, trained side by side with one thread each. Configuration "
              "(`training/configs/midol_micro_release.yaml` over `defaults.yaml`):", "", "```yaml", config_text.strip(), "```", "",
              "Reproduce the numbers above from the shipped weights: "
              "`python -m midol_hub.evaluate --model midol-micro --separation --out results.json`. "
              "Reproduce the training run: `python -m training.release_micro WORK_DIR`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.release_micro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir")
    parser.add_argument("--install", default=str(PACKAGE_WEIGHTS), help="where the released model directory goes")
    parser.add_argument("--minutes", nargs=2, type=float, metavar=("MIDOL", "DINO"), default=None,
                        help="training minutes to report when the runs were made beforehand")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    data = prepare(work / "data")
    minutes = dict(zip(("midol", "dino"), args.minutes)) if args.minutes else {o: train(work, data, o) for o in ("midol", "dino")}
    calibrate = data  # the training splits only; roots of one modality are pooled
    export.export(work / "dino", work / "dino-model")
    # evaluate exactly what ships: the fp16-stored export, so the card's numbers reproduce from it
    export.export(work / "midol", args.install, calibrate=calibrate, storage="fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)  # a reproducible random-initialisation baseline
        models = {"random": load_model("midol-micro", pretrained=False), "dino": load_model(work / "dino-model"),
                  "midol": load_model(args.install)}
    results = evaluate_all(work, models)
    notes = comparison_notes(results, minutes, CONFIG.read_text(), models["midol"].config.modality_calibration)
    exported = export.export(work / "midol", args.install, calibrate=calibrate, storage="fp16",
                          results=results["midol"], card_notes=notes)
    print(notes)
    print(f"installed {args.install}; fp16 storage moves embeddings by at most {exported.fp16_error:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

