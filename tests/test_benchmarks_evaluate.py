"""The evaluation command and the one place that knows the shared data's layout and splits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import evaluate, ood, release
from midol_hub import calibrate, load_model
from midol_hub.calibration import COMPONENTS, OUTSIDE_WEIGHT, QUANTILE
from midol_hub.evaluation import calibration_error
from midol_hub.model_card import evaluation_table
from training import shared_data

from .helpers import make_micro


def test_evaluation_command_writes_json_and_a_table(tmp_path, data_root, micro_dir, capsys):
    out = tmp_path / "results.json"
    argv = ["--model", str(micro_dir), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--datasets", "Kermany OCT", "ISIC nevus vs melanoma"]
    assert evaluate.main(argv) == 0
    results = json.loads(out.read_text())
    assert results["Kermany OCT"]["sizes"]["train"] + results["Kermany OCT"]["sizes"]["test"] == 100
    assert results["ISIC nevus vs melanoma"]["sizes"]["train"] + results["ISIC nevus vs melanoma"]["sizes"]["test"] == 498
    direct = evaluate.evaluate(load_model(micro_dir), data_root, ["Kermany OCT"])
    assert results["Kermany OCT"]["linear probe"] == direct["Kermany OCT"]["linear probe"]
    assert capsys.readouterr().out.strip() == evaluation_table(results).strip()
    assert "| Kermany OCT | linear probe |" in evaluation_table(results)


def test_baselines_are_measured_on_the_same_sets_and_shown_side_by_side(tmp_path, data_root, capsys):
    argv = ["--model", "midol-micro", "--out", str(tmp_path / "r.json"), "--datasets", "Kermany OCT",
            "Hannover CXR AP vs PA", "--baselines", "--cache-dir", str(tmp_path / "cache")]
    assert evaluate.main(argv) == 0
    table = capsys.readouterr().out.split("| set (linear probe / kNN / precision@10) |")[1]
    assert table.startswith(" midol-micro `embedding` | random initialisation `pooled` |\n")  # no ImageNet Swin to install
    trained = json.loads((tmp_path / "r.json").read_text())
    random = evaluate.evaluate(evaluate.model_at("midol-micro", "random"), data_root, ["Kermany OCT", "Hannover CXR AP vs PA"],
                               "pooled", cache_dir=str(tmp_path / "cache"))
    row = next(line for line in table.splitlines() if line.startswith("| **mean over the 2** |"))
    means = [" / ".join(f"{evaluate.figure(r, 'mean', p, m):.3f}" for p, m in evaluate.COMPARED) for r in (trained, random)]
    assert row == f"| **mean over the 2** | {means[0]} | {means[1]} |"
    probes = [trained[d]["linear probe"]["accuracy"] for d in ("Kermany OCT", "Hannover CXR AP vs PA")]
    assert evaluate.figure(trained, "mean", "linear probe", "accuracy") == pytest.approx(np.mean(probes))


def test_modality_separation_of_a_calibrated_model(data_root):
    model = make_micro()
    train = {modality: images[:20] for modality, images in shared_data.labelled_splits(data_root, "train").items()}
    calibrate(model, train)
    result = evaluate.modality_separation(model, data_root, per_modality=20)
    scores = result["auto routing"]
    counts = np.array(scores["confusion"]["counts"])
    assert result["sizes"]["test"] == counts.sum() == 100 and counts.shape == (5, 5)
    assert scores["macro_accuracy"] == pytest.approx(np.mean(list(scores["accuracy"].values())))
    paths, labels = evaluate._sample(shared_data.labelled_splits(data_root, "test"), 20)  # the same sample
    said = model.encode(paths, modality="auto").modality
    for modality in scores["accuracy"]:
        mine = [s for s, label in zip(said, labels) if label == modality]
        assert scores["accuracy"][modality] == pytest.approx(mine.count(modality) / len(mine))
        assert scores["unknown_rate"][modality] == pytest.approx(mine.count("unknown") / len(mine))
    full = shared_data.fullres_parts(data_root, "test")
    assert result["full resolution"]["images"] == {m: len(full[m]) for m in scores["accuracy"]}
    outside = result["out of scope"]
    assert outside["images"] == len(shared_data.out_of_scope_set(data_root)) == len(outside["answers"])
    confidence = result["confidence"]
    assert confidence["images"] == 100 + sum(map(len, full.values())) + outside["images"]
    uncalibrated = evaluate.modality_separation(make_micro(), data_root, per_modality=5)
    assert "accuracy" not in uncalibrated["auto routing"] and "full resolution" not in uncalibrated
    assert np.array(uncalibrated["auto routing"]["confusion"]["counts"]).sum() == 25


def test_expected_calibration_error_by_hand():
    # two bins: 0.9-confidence answers right 3 times in 4, 0.3-confidence answers right 1 time in 2
    confidence, right = [0.9, 0.9, 0.9, 0.9, 0.3, 0.3], [1, 1, 1, 0, 1, 0]
    assert calibration_error(confidence, right) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.2)
    assert calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)


def test_oct_split_never_shares_a_patient(data_root):
    train, test = shared_data.oct_splits(data_root)
    assert not set(train.groups) & set(test.groups)
    assert "103044" in train.groups + test.groups  # CNV-103044-* slices stay together


def test_the_written_fullres_split_follows_its_rules_and_never_leaks_a_group(data_root):
    written = json.loads(shared_data.SPLIT_FILE.read_text())
    assert written == shared_data.fullres_split(data_root)
    train = {p for paths in written["train"].values() for p in paths}
    test = {p for paths in written["test"].values() for p in paths}
    assert not train & test and all((data_root / p).is_file() for p in train | test)
    assert not {str(Path(p)) for p in shared_data.QUICKSTART_IMAGES} & (train | test)
    lesions = lambda paths: {Path(p).stem for p in paths}  # noqa: E731  the same ISIC lesion at every resolution
    isic_train, isic_test = shared_data.isic_splits(data_root)
    assert not lesions(written["train"]["dermoscopy"]) & lesions(isic_test.images)
    assert not lesions(written["test"]["dermoscopy"]) & lesions(isic_train.images)
    slides = {row["file"]: row["source_slide"] for row in __import__("csv").DictReader(
        open(data_root / "pathology/kather2016_texture_tiles_examples/labels.csv"))}
    kather = lambda paths: {slides[p.split("examples/", 1)[1]] for p in paths if "kather2016" in p}  # noqa: E731
    assert kather(written["train"]["pathology"]) and not kather(written["train"]["pathology"]) & kather(written["test"]["pathology"])
    ihc = [p for p in written["test"]["pathology"] if "ki67" in p]
    assert ihc == []  # the two Ki67 regions are one tissue region: training only
    assert {m: len(v) for m, v in written["test"].items()} == {"xray": 83, "fundus": 16, "oct": 28, "dermoscopy": 62,
                                                               "pathology": 15}
    cxr_train, cxr_test = shared_data.hannover_splits(data_root)  # the radiographs' sides are their probe's
    assert {str(Path(p).relative_to(data_root)) for p in cxr_test.images} <= set(written["test"]["xray"])


def test_radiograph_probe_is_split_by_patient_with_real_projection_labels(data_root):
    train, test = shared_data.hannover_splits(data_root)
    assert (len(train), len(test)) == (161, 82) and not set(train.groups) & set(test.groups)
    assert len(set(train.groups) | set(test.groups)) == 71 and train.class_names == ["AP", "PA"]
    rows = {r["image_id"]: r for r in csv.DictReader(open(data_root / shared_data.HANNOVER_CXR / "data.csv"))}
    for path, label in zip(test.images, test.labels):
        assert train.class_names[label].lower() == rows[Path(path).stem]["projection"]
    assert 0.15 < test.labels.mean() < 0.3  # PA is the minority (49 of 243)
    assert shared_data.group_of(data_root, test.images[0]) == f"cxr patient {test.groups[0]}"


def test_out_of_scope_set_is_real_deduplicated_and_none_of_the_five(data_root):
    paths = shared_data.out_of_scope_set(data_root)
    assert len(paths) == len(set(paths)) == 35
    names = {Path(p).name for p in paths}
    assert {"CT_small.dcm", "MR_small.dcm", "chelsea.png", "examples_palette.dcm", "JPEG2000.dcm", "grace_hopper.jpg",
            "china.jpg"} <= names
    assert all(Path(p).is_file() for p in paths)
    assert "ihc.png" not in names and "retina.jpg" not in names and "cell.png" not in names


def test_calibration_rules_pick_the_worst_case_best_setting_and_the_best_calibrated_weight():
    def row(crops, pathology, dermoscopy, outside, unknown):
        return {"crops": crops, "components": 32, "quantile": 0.95, "held_out_called_unknown": unknown,
                "full_resolution_named_right": {"pathology": pathology, "dermoscopy": dermoscopy},
                "out_of_scope_called_unknown": outside}
    rows = [row("a", 0.99, 0.99, 0.70, 0.02), row("b", 0.88, 0.92, 0.87, 0.04), row("c", 0.99, 0.99, 0.99, 0.08)]
    assert ood.chosen_view(rows)["crops"] == "b"  # "c" calls too many held-out images unknown
    assert ood.worst(rows[1]) == 0.87 and ood.worst(rows[0]) == 0.70
    # a training round is released by its chosen row's worst figure, the earlier one on a tie
    rounds = [(None, None, rows[:1]), (None, None, rows[:2]), (None, None, rows)]
    assert release.best_round(rounds) == 1 and release.best_round(rounds[:1]) == 0
    assert ood.chosen_weight([{"outside_weight": 0.05, "ece": 0.09}, {"outside_weight": 1e-3, "ece": 0.01}]) == 1e-3


def test_the_coherent_candidate_answers_its_most_probable_outcome_where_the_shipped_rule_does_not():
    """``ood.coherent_answers`` (issue 28's candidate for ``auto``): walking a point from a modality's
    mean out of scope, the answer changes once, from the modality to unknown, and never carries
    less than one half; the shipped rule calls the first points beyond its threshold unknown at a
    confidence under one half (its own probability says the answer is probably wrong)."""
    import torch

    from midol_hub.calibration import fit_out_of_scope
    from midol_hub.detection import answer_by_distance, modality_distances

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))
    features = torch.from_numpy(np.concatenate([c + rng.normal(0, 1, (300, 8)) for c in centres]))
    labels = [m for m in ("xray", "oct", "fundus") for _ in range(300)]
    calibration = fit_out_of_scope(features, labels, components=4, repeats=1)
    direction = torch.from_numpy(rng.normal(0, 1, 8))
    walk = torch.from_numpy(centres[0]) + torch.linspace(0, 12, 400)[:, None].double() * direction / direction.norm()
    distances = modality_distances(calibration["out_of_scope"], walk)
    answers, confidence = ood.coherent_answers(calibration, distances)
    assert answers[0] == "xray" and confidence[0] > 0.9 and answers[-1] == "unknown" and confidence[-1] > 0.99
    switches = [i for i in range(1, len(answers)) if answers[i] != answers[i - 1]]
    assert len(switches) == 1 and answers[switches[0]] == "unknown"
    assert confidence.min() >= 0.5
    shipped = answer_by_distance(calibration, distances)
    beyond = shipped.outside.numpy()
    assert beyond.any() and (shipped.confidence.numpy()[beyond] < 0.5).any()


@pytest.mark.xfail(strict=True, reason="the batch-4 radiographs joined the calibration set after midol-micro v3 was "
                   "calibrated: on it the rules now choose no crops and 32 components (measured); recalibrating "
                   "midol-micro is part of issue 28's coherent-auto work")
def test_shipped_calibration_settings_are_what_the_detector_benchmark_chooses(data_root):
    detectors, naming, views, confidence = ood.compare(load_model("midol-micro"), data_root)
    view = ood.chosen_view(views)
    assert (view["crops"], view["components"], view["quantile"]) == (True, COMPONENTS, QUANTILE)
    assert ood.chosen_weight(confidence) == OUTSIDE_WEIGHT
    assert detectors[-1]["out_of_scope_images"] == len(shared_data.out_of_scope_set(data_root))
    by_weight = {r["outside_weight"]: r for r in confidence}
    assert by_weight[OUTSIDE_WEIGHT]["ece"] < by_weight[1 - QUANTILE]["ece"] - 0.03  # 1/2 at the threshold: too unsure
    # crops of the full-resolution files help the held-out full-resolution files at the same settings
    plain = next(r for r in views if not r["crops"] and r["components"] == COMPONENTS and r["quantile"] == QUANTILE)
    assert view["full_resolution_named_right"]["pathology"] > plain["full_resolution_named_right"]["pathology"]
    assert {r["modality"] for r in naming if r["images"] == "full-resolution"} == {"xray", "fundus", "pathology",
                                                                                    "dermoscopy", "oct"}
