"""Reproduce a shipped model: ``python -m benchmarks.release WORK_DIR [--model midol-lite | midol-micro]``.

midol-lite: trains ``configs/midol_lite.yaml`` from ImageNet (``WORK/lite``), exports it calibrated
on the training sides (fp16) into the package and writes its card from ``benchmarks.evaluate``
of the model and its baselines side by side (:func:`release_lite`).

midol-micro (v3, ``--init V2_DIR``):

1. Writes the training data (``training.prepare_shared_data``): the MedMNIST-type training
   splits and the full-resolution training parts, resized once and tiled.
2. Trains M-IDoL with ``configs/midol_micro_v3.yaml`` from midol-micro v2 (``WORK/from-v2``;
   our analogue of the official pretrained start) and, to decide by measurement, from random
   initialisation (``WORK/from-random``, stopped after ``CHOICE_STEPS`` steps). The start whose
   teacher routes the tagged *training* images better at that step goes on.
3. Trains ``ROUNDS`` one-epoch rounds in all: round k starts from round k-1's teacher
   (``WORK/midol-micro-v3-round-K``, exported without the prototype layer), the recipe and seed unchanged.
   Every round's teacher is measured on the development side (``benchmarks.ood.compare``:
   training images held out by group and the out-of-scope set, no test image); the round with
   the best worst figure at its chosen calibration settings is released.
4. Exports it, calibrated on the training sides only (experts, out-of-scope detector,
   confidence; fp16 storage), into ``--install`` (default: the package's weights folder).
5. Evaluates v3, v2 (recalibrated the same way, so only the weights differ) and random
   initialisation with ``benchmarks.evaluate``, plus few-shot probes over three seeds, compares
   out-of-scope detectors and calibration settings (``benchmarks.ood``), and writes the model
   card from those numbers.

Every step resumes or is skipped when its output exists, so the command can be rerun after an
interruption. v2 is copied to ``WORK/v2`` from the package on the first run; once the package
holds v3, pass v2's directory with ``--init`` (git commit baf3306 holds it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks import ood, paired
from benchmarks.evaluate import (COMPARED, comparison_table, evaluate, figure, modality_separation, model_at, target_cell,
                                 verdict)
from midol_hub import calibrate, extract_features, few_shot, load_model
from midol_hub.calibration import COMPONENTS, QUANTILE, SLOPE
from midol_hub.features import weights_fingerprint
from midol_hub.model_card import SEPARATION, machines_summary, separation_table
from midol_hub.registry import get_entry
from training import export, pretrain
from training.checkpoint import list_checkpoints, load_checkpoint
from training.config import deviations_from_official
from training.prepare_shared_data import prepare
from training.shared_data import BENCHMARKS, CALIBRATION_CROPS, calibration_set, data_root

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "midol_micro_v3.yaml"
PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "midol_hub" / "weights" / "midol-micro"
CHOICE_STEPS = 300
ROUNDS = 3
SHOTS, SEEDS = 10, (0, 1, 2)
CHANGES = [
    "- **Data.** v2 saw almost only 28 px MedMNIST-type images, so on real full-resolution files `auto` failed "
    "(H&E 0.60, IHC 0.14 in a user's trial). v3 adds the full-resolution training parts of `$MIDOL_DATA` (IDRiD fundus, "
    "ISIC UDA-1 at full size, Kather 2016 and CRC-VAL-HE tiles, the OpenSlide H&E and Ki67 IHC regions cut into tiles of "
    "112 and 224 um, one NIH chest X-ray), resized once to a 256 px short side and repeated to about a third of each "
    "modality's draws (`training.prepare_shared_data`); multi-scale crops are cut from those copies.",
    "- **Stain jitter.** Pathology images get haematoxylin-eosin-DAB jitter and, half of the time, IHC re-staining "
    "(eosin removed, DAB laid on the haematoxylin of random patches; `training.augment.StainJitter`), so that the "
    "pathology expert sees H&E and IHC as one modality.",
    "- **Start.** Continued from v2, chosen over random initialisation by the routing accuracy of the training "
    "images at equal steps, then trained in one-epoch rounds, each from the previous round's teacher; the round "
    "released is the one best on the development side (tables below).",
    "- **Out-of-scope detector.** v2's diagonal Gaussian on the pooled feature called 0.71-0.75 of a user's "
    "out-of-scope images unknown (issue 17's trial); v3 uses a tied-covariance Mahalanobis distance on all four "
    "stages, with P(in scope) 1/2 at a quantile of each modality's held-out scores (comparison below, on training "
    "images and the out-of-scope set only).",
    "- **What the detector is calibrated on.** The labelled training images, every full-resolution training file "
    "whole (with the batch-4 radiographs), and the large pathology regions as the tiles pretraining saw "
    "(`training.shared_data.calibration_set`); quantiles are held out by patient, lesion, slide or file "
    "over five two-fold splits. A first calibration held out single images, so a lesion's full-size file was scored "
    "with its small copy in the fitting half: its thresholds were too tight for new lesions, and its out-of-scope "
    "rate (0.906) came from one lucky split (0.750 for the same form and settings over five grouped splits). Settings chosen on "
    "held-out training images and the out-of-scope set (table below).",
    "- **Who names the modality.** `auto` now names the nearest modality under the detector's distance (a Gaussian "
    "classifier on the four stages, calibrated on training images) and embeds in its expert's subspace: on held-out "
    "training images it was right more often than the router's argmax (table below).",
    "- **Confidence.** v2's confidence was the router's probability (0.22-0.38 for every image; AUROC 0.37 as a "
    "score for a right answer). v3's is a calibrated probability that the answer is right (see the evaluation); "
    "since issue 28 the answer is the most probable of the five modalities and unknown under that probability "
    "(the first v3 calibration called images beyond a threshold unknown while their confidence said they were "
    "probably in scope: 4.4% of its development-side answers were under 1/2).",
]


def train(run: Path, data: list[str], *extra: str, config: Path = CONFIG) -> None:
    args = ["--config", str(config), "--data", *data, "--output-dir", str(run), *extra]
    if list_checkpoints(run) if run.is_dir() else []:
        args.append("--resume")
    if pretrain.main(args) != 0:
        raise SystemExit(f"training {run.name} failed")


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def step_seconds(run: Path) -> list[float]:
    """Seconds each logged step of ``run`` took: its batch (the run's own) over its images/s."""
    batch = load_checkpoint(list_checkpoints(run)[-1])["config"]["optim"]["batch_size"]
    return [batch / r["images_per_s"] for r in read_log(run)]


def run_machines(run: Path) -> str:
    """Which machines computed ``run``'s steps, from its last checkpoint (``training.pretrain.training_machine``)."""
    state = load_checkpoint(list_checkpoints(run)[-1])
    return machines_summary(state.get("machines") or [{"from_step": 0}], state["step"])


def training_minutes(runs: list[Path]) -> float:
    """Minutes the logged steps of ``runs`` took."""
    return sum(sum(step_seconds(run)) for run in runs) / 60


def routing_curve(run: Path) -> dict[int, float]:
    return {r["step"]: r["routing"]["macro_accuracy"] for r in read_log(run) if "routing" in r}


def choice_rows(runs: dict[str, Path]) -> list[str]:
    """The start-point table: what each run changes from the official objective (derived from
    ``defaults.yaml``) and its routing accuracy on the tagged training images."""
    lines = ["| start | differs from the official objective in | routing accuracy at step 50 / 100 / 200 / 300 / last |",
             "|---|---|---|"]
    for label, run in runs.items():
        config = load_checkpoint(list_checkpoints(run)[-1])["config"]  # what trained it (a resume re-saves config.yaml)
        changed = ", ".join(f"{k}={v}" for k, v in deviations_from_official(config).items()) or "nothing"
        curve = routing_curve(run)
        last = max(curve)
        points = " / ".join(f"{curve[s]:.2f}" if s in curve else "-" for s in (50, 100, 200, 300))
        lines.append(f"| {label} | {changed} | {points} / {curve[last]:.2f} (step {last}) |")
    return lines


def teacher(work: Path, run: Path, k: int) -> Path:
    """Round ``k``'s teacher, exported uncalibrated without the prototype layer (the next round's init;
    its folder name is what the next round's card records as ``init``)."""
    path = work / f"midol-micro-v3-round-{k}"
    if not path.is_dir() or path.stat().st_mtime < list_checkpoints(run)[-1].stat().st_mtime:
        export.export(run, path)
    return path


def train_rounds(work: Path, first: Path, data: list[str]) -> list[Path]:
    """``ROUNDS`` one-epoch runs: ``first`` and then ``WORK/round-K``, each from the previous teacher."""
    runs = [first]
    for k in range(2, ROUNDS + 1):
        train(work / f"round-{k}", data, "--set", f"model.init={teacher(work, runs[-1], k - 1)}")
        runs.append(work / f"round-{k}")
    return runs


def measure_rounds(work: Path, runs: list[Path], root: Path) -> list[tuple]:
    """``benchmarks.ood.compare`` of every round's teacher (development side only), kept in
    ``WORK/ood-round-K-KEY.json`` (KEY: :func:`results_key`)."""
    measured = []
    for k, run in enumerate(runs, 1):
        model = load_model(teacher(work, run, k))
        path = work / f"ood-round-{k}-{results_key(model)}.json"
        if not path.exists():
            path.write_text(json.dumps(ood.compare(model, root)))
        measured.append(tuple(json.loads(path.read_text())))
    return measured


def best_round(measured: list[tuple]) -> int:
    """The round to release (0-based): the highest worst figure at its chosen calibration settings,
    the earlier round on a tie."""
    return max(range(len(measured)), key=lambda k: ood.worst(ood.chosen_setting(measured[k][2])))


def round_rows(runs: list[Path], measured: list[tuple], released: int) -> list[str]:
    """The rounds table: routing of the tagged training images and, at each round's chosen
    calibration settings, the development figures whose worst decides the release."""
    lines = ["| round | teacher routing accuracy, tagged training images (last step) | settings chosen "
             "(crops, components, quantile, slope) | held-out full-res pathology / dermoscopy named right | out-of-scope "
             "images called unknown | held-out whole images called unknown | worst of the three |",
             "|---|---|---|---|---|---|---|"]
    for k, (run, compared) in enumerate(zip(runs, measured), 1):
        curve, view = routing_curve(run), ood.chosen_setting(compared[2])
        named = view["full_resolution_named_right"]
        lines.append(f"| {k}{' (released)' if k == released else ''} | {curve[max(curve)]:.3f} | "
                     f"{'with' if view['crops'] else 'without'} crops, {view['components']}, {view['quantile']}, {view['slope']:g} | "
                     f"{named['pathology']:.3f} / {named['dermoscopy']:.3f} | {view['out_of_scope_called_unknown']:.3f} | "
                     f"{view['held_out_called_unknown']:.3f} | {ood.worst(view):.3f} |")
    return lines


def few_shot_results(model, root: Path, cache: Path) -> dict:
    """``SHOTS`` training images per class, linear probe, over ``SEEDS``: mean and spread per set."""
    results = {}
    for name, (modality, load) in BENCHMARKS.items():
        train, test = load(root)
        train_x = extract_features(model, train.images, modality, cache_dir=str(cache))
        test_x = extract_features(model, test.images, modality, cache_dir=str(cache))
        results[name] = few_shot(train_x, train.labels, test_x, test.labels, SHOTS, seeds=SEEDS)
    return results


def results_key(model) -> str:
    """What a kept measurement of ``model`` depends on: its weights and its calibration."""
    return hashlib.sha256((weights_fingerprint(model) + model.config.calibration_hash()).encode()).hexdigest()[:12]


def evaluate_all(work: Path, models: dict) -> dict:
    """``benchmarks.evaluate`` with the separation and few-shot figures of every model, kept in
    ``WORK/results-LABEL-KEY.json`` (so a rerun after the weights or calibration changed re-measures)."""
    results = {}
    for label, model in models.items():
        path = work / f"results-{label}-{results_key(model)}.json"
        if not path.exists():
            root = data_root()
            result = evaluate(model, root, cache_dir=str(work / "feature_cache"), progress=True)
            result[SEPARATION] = modality_separation(model, root)
            result["few-shot"] = few_shot_results(model, root, work / "feature_cache")
            path.write_text(json.dumps(result, indent=2))
        results[label] = json.loads(path.read_text())
    return results


SHIPPED_SETTINGS = {"crops": CALIBRATION_CROPS > 0, "components": COMPONENTS, "quantile": QUANTILE, "slope": SLOPE}
"""The calibration settings ``midol_hub.calibrate`` and ``calibration_set`` use by default."""


def settings_of(row: dict) -> dict:
    """The calibration settings of a ``benchmarks.ood`` settings row."""
    return {key: row[key] for key in SHIPPED_SETTINGS}


def detector_notes(compared: tuple, shipped: dict = SHIPPED_SETTINGS, name: str = "midol-micro") -> list[str]:
    """The detector and calibration-settings tables of ``benchmarks.ood.compare`` for model ``name``;
    refuses when the ``shipped`` settings are not what their stated rule chooses from these tables."""
    detectors, naming, settings, new_sources = compared
    chosen = settings_of(ood.chosen_setting(settings))
    if chosen != shipped:
        raise SystemExit(f"the calibration rule chooses {chosen}; the model ships {shipped}: midol_hub.calibration "
                         "and training.shared_data.CALIBRATION_CROPS give the defaults, update one or the other")
    return ["### Out-of-scope detector, what it is calibrated on, and the confidence", "",
            "Fitted on the calibration set only (training sides: labelled images, full-resolution files whole, the "
            "large pathology regions as tiles; the settings table also tries four crops of each file), held out "
            "two-fold by patient, lesion, slide or file; tested on the out-of-scope set: real images that are none of "
            "the five modalities (scikit-image's, scikit-learn's and matplotlib's photographs, textures, documents and "
            "CT phantom; `$MIDOL_DATA/other`; pydicom's CT, MR, ultrasound, nuclear-medicine, segmentation and "
            "secondary-capture test files). No test image entered these choices; `python -m benchmarks.ood --model "
            f"{name}` reproduces every table here.", "",
            ood.markdown(detectors), "", ood.naming_markdown(naming), "",
            f"Shipped: the tied-covariance Mahalanobis distance on all four stages, {shipped['components']} components, "
            f"P(in scope) 1/2 at each modality's {shipped['quantile']} quantile with slope {shipped['slope']:g}, "
            f"calibrated {'with' if shipped['crops'] else 'without'} crops; the answer is the most probable of the five "
            "modalities and unknown, the confidence its probability (`midol_hub.detection`). Of the settings below, "
            "among those whose held-out whole images are called unknown at most 0.05 of the time, the rule prefers "
            "confidence ECE <= 0.05 and AUROC >= 0.90, then the highest worst of held-out full-resolution pathology "
            "and dermoscopy files named right and out-of-scope images caught, then the lowest ECE "
            "(`benchmarks.ood.chosen_setting`).", "", ood.settings_markdown(settings), "",
            "Images of a dataset calibration never saw: each modality calibrated from more than one dataset, with "
            "one dataset left out of the calibration at a time (the shipped settings).", "",
            ood.new_source_markdown(new_sources)]


def comparison_notes(results: dict, choice: list[str], rounds: list[str], minutes: float, machines: str,
                     config_text: str, compared: tuple) -> str:
    """The card's comparison, modality detection, detector, start choice and training sections; ``machines``:
    which computed the released chain of runs (:func:`run_machines`)."""
    labels = {"random": "random init", "v2": "midol-micro v2", "v3": "midol-micro v3 (this model)"}
    lines = ["### v3 against v2 and random initialisation (test splits)", "",
             "| dataset | protocol | " + " | ".join(labels.values()) + " |", "|---|---|---|---|---|"]
    for dataset in BENCHMARKS:
        for protocol, metric in (("linear probe", "accuracy"), ("linear probe", "auc"), ("kNN", "accuracy")):
            cells = [f"{results[k][dataset][protocol][metric]:.3f}" for k in labels]
            lines.append(f"| {dataset} | {protocol} {metric} | " + " | ".join(cells) + " |")
        shots = [results[k]["few-shot"][dataset] for k in labels]
        lines.append(f"| {dataset} | {SHOTS}-shot linear probe accuracy, mean ± sd over {len(SEEDS)} seeds | "
                     + " | ".join(f"{s['mean']:.3f} ± {s['std']:.3f}" for s in shots) + " |")
    mean = {k: float(np.mean([results[k][d]["linear probe"]["accuracy"] for d in BENCHMARKS])) for k in labels}
    lines.append("| **mean over the six** | linear probe accuracy | " + " | ".join(f"{mean[k]:.3f}" for k in labels) + " |")
    lines += ["", *verdict(results["v3"][SEPARATION]), "",
              "### `modality=\"auto\"` of v2, recalibrated the same way (v3's is in the evaluation above)", "",
              separation_table(results["v2"][SEPARATION]), ""]
    lines += ["### What changed from v2, and why", "", *CHANGES, "", *detector_notes(compared), ""]
    lines += ["### Where v3 starts: v2 or random initialisation, decided by measurement", "",
              f"Same data, recipe and seed; the run from random initialisation stopped at step {CHOICE_STEPS} (CPU "
              "budget). Routing accuracy is the teacher's on 100 fixed tagged *training* images per modality "
              "(Hungarian-matched argmax experts); no test image entered the choice.", "", *choice, "",
              f"Then {ROUNDS} one-epoch rounds in all, each started from the previous round's teacher with a fresh "
              "prototype layer (same recipe and seed). Each round's teacher is measured on the development side "
              "only (`benchmarks.ood.compare`, fp32 export; the calibration settings are chosen per round by "
              "`benchmarks.ood.chosen_setting`); the round with the highest worst figure is released:", "", *rounds, ""]
    lines += ["### Training", "",
              f"Trained on {machines}: {minutes:.0f} min, in fp32, as v2 (whose AVX2 machine ran bf16 "
              "6-9x slower than fp32). Configuration (`training/configs/midol_micro_v3.yaml` over `defaults.yaml`):", "",
              "```yaml", config_text.strip(), "```", "",
              "Reproduce the numbers above: `python -m benchmarks.evaluate --model midol-micro --separation --out "
              "results.json`. Reproduce the model: `python -m benchmarks.release WORK_DIR`."]
    return "\n".join(lines)


LITE_CONFIG = Path(__file__).resolve().parents[1] / get_entry("midol-lite").recipe  # the registry names the recipe
LITE_FEATURE = get_entry("midol-lite").make_config().default_feature
LITE_OTHER = "embedding" if LITE_FEATURE == "pooled" else "pooled"
MICRO_FEATURE = get_entry("midol-micro").make_config().default_feature
LITE_COLUMNS = {"lite": (f"midol-lite `{LITE_FEATURE}` (this model's default)", LITE_FEATURE),
                f"lite-{LITE_OTHER}": (f"midol-lite `{LITE_OTHER}`", LITE_OTHER),
                "lite-combined": ("midol-lite `combined`", "combined"),
                "imagenet": ("ImageNet EfficientNet-Lite0 `pooled` (the start)", "pooled"),
                "random": ("random EfficientNet-Lite0 `pooled`", "pooled"),
                f"micro-{MICRO_FEATURE}": (f"midol-micro v3 `{MICRO_FEATURE}` (its default)", MICRO_FEATURE)}
"""The lite card's comparison columns: label -> (heading, feature measured)."""


def release_lite(work: Path, install: Path) -> None:
    """midol-lite: one run of ``midol_lite.yaml`` from ImageNet (``WORK/lite``), exported calibrated
    (fp16) into ``install`` with the calibration settings chosen on its own development side and
    its head's batch norm refitted on the calibration images (``training.head_norm.refit_head_norm_statistics``),
    and its card from :func:`lite_results` and the targets."""
    data = prepare(work / "data")
    run = work / "lite"
    train(run, data, config=LITE_CONFIG)
    root = data_root()
    compared = lite_development_side(work, run, root)
    settings = settings_of(ood.chosen_setting(compared[2]))
    calibration = calibration_set(root, crops=ood.VIEW_CROPS if settings["crops"] else 0)
    calibrated = dict(calibrate=calibration.images, groups=calibration.groups, storage="fp16", refit_head_norm=True,
                      calibration_settings={key: settings[key] for key in ("components", "quantile", "slope")})
    export.export(run, install, **calibrated)
    model = load_model(install)
    results = lite_results(work, model)
    notes = lite_notes(results, lite_intervals(work, model), step_seconds(run), run_machines(run), LITE_CONFIG.read_text(),
                       detector_notes(compared, settings, "midol-lite"))
    card = {key: value for key, value in results["lite"].items() if key != "few-shot"}
    exported = export.export(run, install, **calibrated, results=card, card_notes=notes)
    print(notes)
    print(f"installed {install}; fp16 storage moves embeddings by at most {exported.fp16_error:.2e}")


def lite_development_side(work: Path, run: Path, root: Path) -> tuple:
    """``benchmarks.ood.compare`` of the run's teacher (exported uncalibrated to ``WORK/lite-uncalibrated``;
    development side only), kept in ``WORK/ood-lite-KEY.json``: midol-lite's calibration settings
    are chosen on it by the rule that chose midol-micro's."""
    path = work / "lite-uncalibrated"
    export.export(run, path)
    model = load_model(path)
    kept = work / f"ood-lite-{results_key(model)}.json"
    if not kept.exists():
        kept.write_text(json.dumps(ood.compare(model, root)))
    return tuple(json.loads(kept.read_text()))


def lite_results(work: Path, model) -> dict:
    """Every column of :data:`LITE_COLUMNS` measured by ``benchmarks.evaluate`` on the same splits (the
    model's with ``modality="auto"``), kept in ``WORK/results-LABEL-KEY.json``."""
    models = {"lite": model, "imagenet": model_at("midol-lite", "imagenet"), "random": model_at("midol-lite", "random"),
              "micro": load_model("midol-micro")}
    results = {}
    for label, (_, feature) in LITE_COLUMNS.items():
        measured = models[label.split("-")[0]]
        path = work / f"results-{label}-{results_key(measured)}.json"
        if not path.exists():
            root = data_root()
            result = evaluate(measured, root, feature=feature, cache_dir=str(work / "feature_cache"), progress=True)
            if label == "lite":
                result[SEPARATION] = modality_separation(measured, root)
            path.write_text(json.dumps(result, indent=2))
        results[label] = json.loads(path.read_text())
    return results


def lite_intervals(work: Path, model) -> dict:
    """``benchmarks.paired.compare`` of the model's default feature against its ImageNet start on the
    splits :func:`lite_results` measures (features from its cache), kept in ``WORK/paired-KEY.json``."""
    path = work / f"paired-{results_key(model)}.json"
    if not path.exists():
        cache, root = str(work / "feature_cache"), data_root()
        measured = [paired.outcomes(model, root, LITE_FEATURE, cache_dir=cache),
                    paired.outcomes(model_at("midol-lite", "imagenet"), root, "pooled", cache_dir=cache)]
        path.write_text(json.dumps(paired.compare(*measured), indent=1))
    return json.loads(path.read_text())


def lite_targets(results: dict, intervals: dict) -> list[str]:
    """The issue's feature targets: the default feature against its own ImageNet start, each difference
    with its 95% interval from ``intervals`` (:func:`lite_intervals`, whose differences must be these)."""
    lines = ["| target | wanted | measured | 95% interval | |", "|---|---|---|---|---|"]
    for index, (protocol, metric) in enumerate(COMPARED):
        gains = {d: figure(results["lite"], d, protocol, metric) - figure(results["imagenet"], d, protocol, metric)
                 for d in ["mean", *BENCHMARKS]}
        for dataset, gain in gains.items():
            if abs(gain - intervals[dataset]["difference"][index]) > 1e-6:
                raise ValueError(f"{dataset} {protocol} {metric}: the intervals were measured on other images than the "
                                 f"results ({intervals[dataset]['difference'][index]:+.4f} against {gain:+.4f})")
        span = {d: f"{intervals[d]['low'][index]:+.3f} to {intervals[d]['high'][index]:+.3f}" for d in gains}
        worst = min((gains[d], d) for d in BENCHMARKS)
        lines.append(f"| mean {protocol} {metric} over the ImageNet start | >= +0.02 | {gains['mean']:+.3f} | "
                     f"{span['mean']} | {target_cell(gains['mean'], 0.02)} |")
        lines.append(f"| worst set, {protocol} {metric} | >= -0.02 | {worst[0]:+.3f} ({worst[1]}) | {span[worst[1]]} | "
                     f"{target_cell(worst[0], -0.02)} |")
    oct_probe = results["lite"]["Kermany OCT"]["linear probe"]["accuracy"]
    lines.append(f"| Kermany OCT linear probe | >= 0.80 | {oct_probe:.3f} | | {target_cell(oct_probe, 0.8)} |")
    return lines


def lite_notes(results: dict, intervals: dict, seconds: list[float], machines: str, config_text: str,
               detector: list[str]) -> str:
    """The lite card's comparison, targets (with ``intervals``: :func:`lite_intervals`), detector
    (:func:`detector_notes`) and training sections;
    ``seconds``: each training step's (:func:`step_seconds`): their median is the run's pace on the
    machine alone, their sum also counts steps slowed by other work sharing the cores; ``machines``:
    which machines computed them (:func:`run_machines`)."""
    pace = float(np.median(seconds))
    lines = ["### Against its ImageNet start, random initialisation and midol-micro (test splits)", "",
             "Linear probe accuracy / kNN accuracy (k = 20) / precision@10 of test queries against the training "
             "images, each column's own feature, the same splits (`benchmarks.evaluate`, training sets capped at 3,000 "
             "and test sets at 2,000 images).", "",
             comparison_table({heading: results[label] for label, (heading, _) in LITE_COLUMNS.items()}), "",
             f"**Feature targets** (the default `{LITE_FEATURE}` against the ImageNet start's pooled feature):", "",
             *lite_targets(results, intervals), "",
             "How far chance moves these differences (`python -m benchmarks.paired --model midol-lite`: the same test "
             f"images and protocols, per image; 95% intervals from {paired.DRAWS:,} paired bootstrap draws of test patients, "
             "lesions or images, each set on its own). An interval that holds a target's bound says these test images "
             "cannot tell whether it is met:", "", paired.markdown(intervals, "the ImageNet start"), "",
             *verdict(results["lite"][SEPARATION]), "", *detector, "",
             "### Training", "",
             f"Trained on {machines}: "
             f"{len(seconds):,} logged steps (steps computed again after a resume count again) in "
             f"{sum(seconds) / 60:.0f} min of logged step time (median step {pace:.2f} s: "
             f"{len(seconds) * pace / 60:.0f} min at that pace; the rest is steps slowed by other work on the cores). "
             "Configuration "
             "(`training/configs/midol_lite.yaml` over `defaults.yaml`):", "", "```yaml", config_text.strip(), "```", "",
             "Reproduce the numbers: `python -m benchmarks.evaluate --model midol-lite --separation --out results.json` "
             "(and `--init imagenet --feature pooled` for the start). Reproduce the model: "
             "`python -m benchmarks.release WORK_DIR --model midol-lite`."]
    return "\n".join(lines)


def recalibrate(install: Path, work: Path) -> None:
    """Calibrate the model in ``install`` anew with the current rules (weights untouched): its
    config's ``modality_calibration``, and the card's ``auto`` evaluation, targets and detector
    sections, re-measured (``WORK/results-recalibrated-KEY.json``, ``WORK/ood-KEY.json``)."""
    model = load_model(install)
    root = data_root()
    calibration = calibration_set(root)
    calibrate(model, calibration.images, calibration.groups)
    config_path = install / "config.json"
    config = json.loads(config_path.read_text())
    config.update(expert_modalities=model.config.expert_modalities, modality_calibration=model.config.modality_calibration)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    model = load_model(install)
    work.mkdir(parents=True, exist_ok=True)
    measured = work / f"results-recalibrated-{results_key(model)}.json"
    if not measured.exists():
        measured.write_text(json.dumps(modality_separation(model, root), indent=2))
    compared_path = work / f"ood-{results_key(model)}.json"
    if not compared_path.exists():
        compared_path.write_text(json.dumps(ood.compare(model, root)))
    separation, compared = json.loads(measured.read_text()), json.loads(compared_path.read_text())
    card_path = install / "README.md"
    card = card_path.read_text()
    card = _replace_section(card, '`modality="auto"` on ', "### v3 against v2", separation_table(separation) + "\n\n")
    card = _replace_section(card, "**Targets.**", "### `modality=\"auto\"` of v2", "\n".join(verdict(separation)) + "\n\n")
    card = _replace_section(card, "### What changed from v2, and why", "### Where v3 starts",
                            "\n".join(["### What changed from v2, and why", "", *CHANGES, "", *detector_notes(compared)])
                            + "\n\n")
    card_path.write_text(card)
    print(separation_table(separation))
    print("\n".join(verdict(separation)))


def _replace_section(text: str, start: str, end: str, new: str) -> str:
    """``text`` with the part from the first ``start`` up to the next ``end`` replaced by ``new``."""
    first = text.index(start)
    return text[:first] + new + text[text.index(end, first):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir")
    parser.add_argument("--model", choices=("midol-micro", "midol-lite"), default="midol-micro", help="which model to release")
    parser.add_argument("--install", default=None, help="where the released model directory goes (default: the package's)")
    parser.add_argument("--init", default=None, help="midol-micro v2's model directory (default: WORK/v2, copied from "
                                                     "the package on the first run)")
    parser.add_argument("--recalibrate", action="store_true", help="only calibrate the installed midol-micro anew "
                                                                  "(weights untouched) and re-measure its card's auto sections")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    if args.recalibrate:
        recalibrate(Path(args.install or PACKAGE_WEIGHTS), work)
        return 0
    if args.model == "midol-lite":
        release_lite(work, Path(args.install or PACKAGE_WEIGHTS.with_name("midol-lite")))
        return 0
    args.install = args.install or str(PACKAGE_WEIGHTS)
    v2 = Path(args.init) if args.init else work / "v2"
    if not v2.is_dir():
        shipped = json.loads((PACKAGE_WEIGHTS / "config.json").read_text()).get("pretraining") or {}
        if (shipped.get("init") or "").startswith("midol-micro"):  # the package holds v3 (from v2 or its rounds)
            raise SystemExit("the package holds midol-micro v3; pass --init with v2's model directory, e.g. "
                             "`git archive baf3306 midol_hub/weights/midol-micro | tar -x -C /tmp` and "
                             "--init /tmp/midol_hub/weights/midol-micro")
        shutil.copytree(PACKAGE_WEIGHTS, v2)
    data = prepare(work / "data")
    train(work / "from-v2", data, "--set", f"model.init={v2}")
    train(work / "from-random", data, "--max-steps", str(CHOICE_STEPS))
    start = {label: routing_curve(work / label).get(CHOICE_STEPS, 0.0) for label in ("from-v2", "from-random")}
    chosen = work / max(start, key=start.get)
    if chosen.name != "from-v2":
        train(chosen, data)  # finish the run from random initialisation before going on with it
    root = data_root()
    runs = train_rounds(work, chosen, data)
    measured = measure_rounds(work, runs, root)
    best = best_round(measured)
    released = runs[best]
    calibration = calibration_set(root)
    export.export(released, args.install, calibrate=calibration.images, groups=calibration.groups, storage="fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)  # a reproducible random-initialisation baseline
        v2_model = load_model(v2)
        calibrate(v2_model, calibration.images, calibration.groups)
        models = {"random": load_model("midol-micro", pretrained=False), "v2": v2_model, "v3": load_model(args.install)}
    results = evaluate_all(work, models)
    minutes = training_minutes(runs[:best + 1])
    compared = ood.compare(load_model(args.install), root)
    notes = comparison_notes(results, choice_rows({"midol-micro v2 (released)": work / "from-v2",
                                                   "random initialisation": work / "from-random"}),
                             round_rows(runs, measured, best + 1), minutes,
                             "; ".join(f"{run.name}, {run_machines(run)}" for run in runs[:best + 1]),
                             CONFIG.read_text(), compared)
    card = {key: value for key, value in results["v3"].items() if key != "few-shot"}
    exported = export.export(released, args.install, calibrate=calibration.images, groups=calibration.groups,
                             storage="fp16", results=card, card_notes=notes)
    print(notes)
    print(f"installed {args.install}; fp16 storage moves embeddings by at most {exported.fp16_error:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
