"""Expert calibration: Hungarian assignment on argmax counts, shared experts, and the
out-of-scope detector behind ``modality="auto"`` answering ``"unknown"``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from midol_hub import DatasetError, calibrate, routing_report
from midol_hub.cli import main
from midol_hub.image_processing_midol import MIDoLImageProcessor
from midol_hub.model_card import render_model_card
from midol_hub.calibration import fit_detector, fit_out_of_scope, held_out_distances, in_scope_scores, platt, two_fold
from midol_hub.detection import (
    answer_by_distance,
    detect_modalities,
    in_scope_probability,
    in_scope_tail,
    modality_distances,
    nearest_margin,
    out_of_scope_score,
)
from training import shared_data

from .helpers import make_micro


def test_routing_report_matches_experts_by_argmax_counts_and_leaves_unserved_modalities_out():
    # xray and oct both go to expert 2 (the router merged them); fundus is split 6 / 4
    modalities = ["xray"] * 10 + ["oct"] * 10 + ["fundus"] * 10
    experts = [2] * 10 + [2] * 8 + [0] * 2 + [1] * 6 + [3] * 4
    report = routing_report(modalities, experts, num_experts=5)
    assert report["confusion"] == [[0, 0, 10, 0, 0], [2, 0, 8, 0, 0], [0, 6, 0, 4, 0]]
    # Hungarian maximises the matched counts: xray->2 (10), fundus->1 (6), oct->0 (2 of 10, at the 1/5 floor)
    assert report["assignment"] == {"xray": 2, "oct": 0, "fundus": 1}
    assert report["accuracy"] == {"xray": 1.0, "oct": 0.2, "fundus": 0.6}
    assert report["macro_accuracy"] == pytest.approx(0.6)
    assert report["expert_usage"] == [2 / 30, 6 / 30, 18 / 30, 4 / 30, 0.0]
    below_chance = routing_report(modalities, experts, num_experts=5, min_share=0.3)
    assert below_chance["assignment"]["oct"] is None and below_chance["accuracy"]["oct"] == 0.0
    perfect = routing_report(["a", "b"] * 5, [3, 1] * 5, num_experts=4)
    assert perfect["macro_accuracy"] == 1.0 and perfect["nmi"] == pytest.approx(1.0)


def synthetic_detector(dim: int = 4) -> tuple[dict, torch.Tensor]:
    """Two modality means on the first two axes, unit whitening, in-scope scores spread 0..4."""
    features = torch.zeros(200, dim, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    features[:100, 0], features[100:, 1] = 1.0, 1.0
    features += 0.1 * torch.randn(200, dim, generator=generator, dtype=torch.float64)
    detector = fit_detector(features, ["xray"] * 100 + ["oct"] * 100, components=2)
    scores = out_of_scope_score(detector, features).numpy()
    detector["in_scope"] = {"xray": in_scope_scores(scores[:100], 0.975), "oct": in_scope_scores(scores[100:], 0.975)}
    detector.update(quantile=0.975, slope=1.5)
    return detector, features


def test_out_of_scope_score_is_the_whitened_distance_to_the_nearest_mean():
    detector, features = synthetic_detector()
    means = torch.tensor(detector["means"], dtype=torch.float64)
    basis, variances = torch.tensor(detector["basis"], dtype=torch.float64), torch.tensor(detector["variances"])
    covariance = basis @ torch.diag(variances.double()) @ basis.T
    covariance += detector["residual_variance"] * (torch.eye(4, dtype=torch.float64) - basis @ basis.T)
    point = torch.tensor([[0.2, 0.9, 0.0, 0.0]], dtype=torch.float64)
    by_hand = min(float((point - mean) @ torch.linalg.inv(covariance) @ (point - mean).T) for mean in means)
    assert float(out_of_scope_score(detector, point)) == pytest.approx(by_hand, rel=1e-5)
    # the within-class scatter is whitened: training images score about the dimension on average
    assert float(out_of_scope_score(detector, features).mean()) == pytest.approx(4.0, rel=0.1)


def test_in_scope_probability_is_one_half_at_the_quantile_and_falls_faster_with_a_larger_slope():
    detector, _ = synthetic_detector()
    xray = detector["in_scope"]["xray"]
    threshold = xray["threshold"]  # the 0.975 quantile of 100 held-out scores
    scores = torch.tensor([0.0, threshold / 2, threshold, 2 * threshold, 10 * threshold], dtype=torch.float64)
    at_threshold = float(in_scope_tail(xray, torch.tensor([threshold], dtype=torch.float64)))
    assert at_threshold == pytest.approx(0.025, abs=0.011)
    probability = in_scope_probability(detector, "xray", scores)
    tail = in_scope_tail(xray, scores)
    torch.testing.assert_close(probability, tail**1.5 / (tail**1.5 + 0.025**1.5))
    assert float(probability[2]) == pytest.approx(0.5, abs=0.2)  # 1/2 where the share is 1 - quantile
    assert torch.all(probability[:-1] >= probability[1:]) and probability[0] > 0.95 and probability[-1] < 1e-6
    steep = in_scope_probability({**detector, "slope": 3.0}, "xray", scores)
    typical, beyond = scores < threshold, scores > threshold
    assert torch.all(steep[typical] >= probability[typical]) and torch.all(steep[beyond] <= probability[beyond])
    levels = in_scope_tail(xray, torch.tensor(xray["score_quantiles"], dtype=torch.float64))
    torch.testing.assert_close(levels, 1 - torch.arange(100, dtype=torch.float64) / 100)  # the empirical levels


def test_detection_names_the_most_probable_outcome_with_its_probability_and_reason():
    detector, _ = synthetic_detector(dim=256)
    config = make_micro().config
    config.expert_modalities = ["xray", "unassigned", "oct", "dermoscopy", "pathology"]
    config.modality_calibration = {"out_of_scope": detector, "nearest_confidence": {"scale": 1.0, "bias": 0.0}}
    near_xray, near_oct, far = torch.zeros(256), torch.zeros(256), torch.zeros(256)
    near_xray[0], near_oct[1], far[7] = 1.0, 1.0, 3.0
    logits = torch.tensor([[0, 0, 5.0, 0, 0], [5.0, 0, 0, 0, 0], [0, 5.0, 0, 0, 0]])  # the router says oct, xray, unassigned
    decided = detect_modalities(config, logits, torch.stack([near_xray, far, near_oct]))
    assert decided.modality == ["xray", "unknown", "oct"] and decided.source == ["router"] * 3
    assert decided.expert == [0, -1, 2]  # the named modality's expert, whatever the router's argmax
    assert decided.reason[0] is None and "even the nearest" in decided.reason[1] and decided.reason[2] is None
    distances = modality_distances(detector, near_xray[None].double())
    in_scope = in_scope_probability(detector, "xray", distances.min(dim=1).values)
    right = torch.sigmoid(torch.log1p(nearest_margin(distances)))  # Platt scale 1, bias 0
    assert float(decided.confidence[0]) == pytest.approx(float(in_scope * right), rel=1e-5)
    assert decided.confidence[1] > 0.99  # far beyond every training image: surely out of scope


def test_auto_answers_its_most_probable_outcome_along_a_walk_out_of_scope():
    """Walking a point from a modality's mean out of scope, the answer changes once, from the
    modality to unknown, and no answer is less probable than one half: an answer never
    contradicts its own confidence (issue 28; the threshold rule before it called the first
    points beyond its threshold unknown at a confidence under one half)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))
    features = torch.from_numpy(np.concatenate([c + rng.normal(0, 1, (300, 8)) for c in centres]))
    calibration = fit_out_of_scope(features, [m for m in ("xray", "oct", "fundus") for _ in range(300)], components=4,
                                   repeats=1)
    direction = torch.from_numpy(rng.normal(0, 1, 8))
    walk = torch.from_numpy(centres[0]) + torch.linspace(0, 12, 400)[:, None].double() * direction / direction.norm()
    answers = answer_by_distance(calibration, modality_distances(calibration["out_of_scope"], walk))
    assert answers.modality[0] == "xray" and answers.confidence[0] > 0.9
    assert answers.modality[-1] == "unknown" and answers.confidence[-1] > 0.99
    switches = [i for i in range(1, len(walk)) if answers.modality[i] != answers.modality[i - 1]]
    assert len(switches) == 1 and answers.modality[switches[0]] == "unknown"
    assert answers.confidence.min() >= 0.5
    switch = switches[0]  # the answer turns where P(in scope) x P(right) falls under 1 - P(in scope)
    before, after = (answers.in_scope[i] * answers.nearest_right[i] for i in (switch - 1, switch))
    assert before >= 1 - answers.in_scope[switch - 1] and after < 1 - answers.in_scope[switch]


def test_auto_embeds_in_the_nearest_modalitys_subspace_when_the_router_disagrees(data_root):
    model = make_micro(seed=5)
    images = {m: items[:30] for m, items in shared_data.labelled_splits(data_root, "train").items()}
    calibrate(model, images, components=8)
    test = [item for items in shared_data.labelled_splits(data_root, "test").values() for item in items[:10]]
    enc = model.encode(test, modality="auto", output="embedding", normalize=False)
    router = enc.routing.argmax(dim=1)
    for row, name in enumerate(enc.modality):
        if name != "unknown":
            assert int(enc.expert_index[row]) == model.config.expert_for(name)
            if int(router[row]) != int(enc.expert_index[row]):  # moved off the router's choice
                pixels = model.preprocess([test[row]], "auto")  # auto keeps the generic profile
                expected = model(pixels, expert_index=enc.expert_index[row : row + 1]).embedding[0]
                torch.testing.assert_close(enc.embedding[row], expected, atol=1e-5, rtol=0)
    assert (router != enc.expert_index).any()  # a random router disagrees somewhere, so the move is exercised


def test_platt_scaling_fits_the_rate_of_right_answers():
    rng = np.random.default_rng(0)
    probability = rng.uniform(0.2, 0.9, 4000)
    right = rng.uniform(size=4000) < probability  # a score whose sigmoid is already calibrated
    fit = platt(np.log(probability / (1 - probability)), right)
    assert fit["scale"] == pytest.approx(1.0, abs=0.15) and fit["bias"] == pytest.approx(0.0, abs=0.15)
    assert platt(probability, np.ones(4000, dtype=bool))["scale"] == 0.0  # nothing to separate: a constant


@pytest.fixture(scope="module")
def training_images(data_root) -> dict[str, list]:
    return {modality: images[:60] for modality, images in shared_data.labelled_splits(data_root, "train").items()}


def test_calibration_on_real_training_images(training_images):
    model = make_micro(seed=5)
    calibration = calibrate(model, training_images, quantile=0.95, components=16)
    counts = np.array(calibration["confusion"])
    assert counts.sum() == 300 and calibration["images_per_modality"]["oct"] == 60
    for row, modality in enumerate(calibration["modalities_order"]):
        if modality in model.config.expert_modalities:
            expert = model.config.expert_modalities.index(modality)
            assert calibration["accuracy"][modality] == pytest.approx(counts[row, expert] / 60)
        else:
            assert calibration["accuracy"][modality] == 0.0
    detector = calibration["out_of_scope"]
    calibrated = set(training_images)  # every modality, served by an expert of its own or not
    assert set(detector["modalities"]) == calibrated and np.array(detector["basis"]).shape == (15 * 32, 16)
    assert set(detector["in_scope"]) == calibrated and all(len(s["score_quantiles"]) == 100 for s in detector["in_scope"].values())
    assert set(calibration["shared_experts"]) == calibrated - set(model.config.expert_modalities)
    # on the images it was fitted to, about 1 - quantile of each modality are beyond its held-out quantile
    for modality in calibrated:
        encoding = model.encode(training_images[modality], modality="auto", output="stage_pooled")
        beyond = out_of_scope_score(detector, encoding.stage_pooled) > detector["in_scope"][modality]["threshold"]
        assert float(beyond.float().mean()) <= 0.05 + 0.05
    assert 0 <= encoding.confidence.min() and encoding.confidence.max() <= 1
    with pytest.raises(ValueError, match="given twice"):
        calibrate(model, {"oct": training_images["oct"][:2], "OCT": training_images["oct"][:2]})


def test_held_out_scoring_never_splits_a_group():
    # 100 pairs of identical images (a file and its copy): held out by image, the copy sits in the
    # fitting half and the score comes out near zero; held out by pair, it is an honest distance
    generator = torch.Generator().manual_seed(0)
    pairs = torch.randn(100, 6, generator=generator, dtype=torch.float64).repeat_interleave(2, dim=0)
    labels, pair_ids = ["xray"] * 200, [i // 2 for i in range(200)]
    sides = two_fold(pair_ids, seed=3)
    assert (sides[0::2] == sides[1::2]).all() and 80 < sides.sum() < 120
    by_pair = held_out_distances(pairs, labels, components=3, groups=pair_ids).squeeze(1)
    by_image = held_out_distances(pairs, labels, components=3).squeeze(1)
    # with 6 dimensions and unit variances, an honest squared distance averages about 6 * (1 + 2/100)
    assert by_pair.mean() == pytest.approx(6, rel=0.25) and by_pair.mean() > by_image.mean()


def test_calibration_set_keeps_every_lesion_slide_patient_and_region_on_one_side(data_root):
    calibration = shared_data.calibration_set(data_root)
    whole = {m: [f for f in files if not any(r in f for r in shared_data.PATHOLOGY_REGIONS)]
             for m, files in shared_data.fullres_parts(data_root, "train").items()}
    for modality, images in calibration.images.items():
        groups, kinds = calibration.groups[modality], calibration.kinds[modality]
        assert len(groups) == len(kinds) == len(images)
        assert kinds.count("crop") == shared_data.CALIBRATION_CROPS * len(whole[modality])
    # a lesion's full-resolution file and its small copy are one group (held out together)
    derm = list(zip(calibration.images["dermoscopy"], calibration.groups["dermoscopy"], calibration.kinds["dermoscopy"]))
    small = {g for _, g, k in derm if k == "labelled"}
    full = {g for image, g, k in derm if k == "file" and g == Path(image).stem}
    assert len(full) == len(whole["dermoscopy"]) and len(full & small) >= 50
    tiles = [g for g, k in zip(calibration.groups["pathology"], calibration.kinds["pathology"]) if k == "tile"]
    assert len(tiles) == 55 and set(tiles) == {f"region {r}" for r in shared_data.PATHOLOGY_REGIONS}
    slides = {g for g in calibration.groups["pathology"] if g.startswith("slide ")}
    assert 3 <= len(slides) <= 8  # Kather 2016 tiles grouped by their source slide
    assert all(g.startswith("oct patient ") for g in calibration.groups["oct"])
    assert not (set(calibration.groups["oct"]) & {shared_data.group_of(data_root, p)
                                                  for p in shared_data.fullres_parts(data_root, "test")["oct"]})
    # every image knows its dataset; one dataset in several folders or sizes is one source
    assert all(len(calibration.sources[m]) == len(images) for m, images in calibration.images.items())
    assert {m: set(s) for m, s in calibration.sources.items()} == {
        "xray": {"PneumoniaMNIST", "Hannover COVID-19 CXR", "NIH ChestX-ray14"}, "fundus": {"RetinaMNIST", "IDRiD"},
        "pathology": {"BloodMNIST", "CRC-VAL-HE-7K", "Kather 2016", "OpenSlide H&E", "OpenSlide Ki67 IHC"},
        "dermoscopy": {"ISIC UDA-1"}, "oct": {"Kermany OCT 2017"}}
    ki67 = [s for s, g in zip(calibration.sources["pathology"], calibration.groups["pathology"]) if "ki67" in g]
    assert len(ki67) == 50 and set(ki67) == {"OpenSlide Ki67 IHC"}


def test_every_shared_image_belongs_to_a_named_source(data_root):
    folders = {str(p.parent.relative_to(data_root)) for p in data_root.rglob("*.*")
               if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".npz") and p.relative_to(data_root).parts[0] != "other"}
    assert len(folders) >= 20
    assert {shared_data.source_of(f) for f in folders} == set(shared_data.SOURCES.values())
    with pytest.raises(DatasetError, match="xray/new_hospital is in no known source; add its folder"):
        shared_data.source_of("xray/new_hospital")


def test_a_modality_the_router_merged_with_another_is_still_named_and_shares_its_expert(data_root, training_images,
                                                                                         tmp_path, capsys):
    # a router that sends every image to expert 0 (equal logits: the first wins): one modality gets it, the other four none of their own
    model = make_micro(seed=5)
    with torch.no_grad():
        model.head.router.weight.zero_()
    calibration = calibrate(model, training_images, components=16)
    first, *merged = calibration["modalities_order"]
    assert model.config.expert_modalities.count("unassigned") == 4 and model.config.expert_modalities[0] == first
    assert calibration["shared_experts"] == {m: 0 for m in merged}
    assert calibration["out_of_scope"]["modalities"] == calibration["modalities_order"]  # all five are in the detector
    test = {m: items[:20] for m, items in shared_data.labelled_splits(data_root, "test").items()}
    for modality in merged:
        auto = model.encode(test[modality], modality="auto", output="embedding")
        assert sum(name == modality for name in auto.modality) >= 15, (modality, auto.modality)
        assert set(auto.expert_index.tolist()) == {0}
        forced = model.encode(test[modality][:2], modality=modality, output="embedding")
        assert forced.expert_index.tolist() == [0, 0]
        assert model.config.expert_for(modality) == 0
    card = str(render_model_card(model.config))
    assert f"{merged[0]} has no expert of its own and shares expert 0 ({first})" in card
    model.save_pretrained(tmp_path / "merged")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "merged")]) == 0
    experts = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  experts"))
    assert all(f"; {modality} shares 0" in experts for modality in merged)
    processor = MIDoLImageProcessor.from_config(model.config)
    assert processor(test[merged[0]][:1], modality=merged[0])["expert_index"].tolist() == [0]
    with pytest.raises(ValueError, match="no expert for 'oct'"):
        make_micro(expert_modalities=["xray", "fundus", "pathology", "dermoscopy", "unassigned"]).config.expert_for("oct")
