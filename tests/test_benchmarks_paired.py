"""Paired bootstrap intervals of a comparison on the test splits (benchmarks.paired)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import evaluate, paired
from midol_hub import DatasetError, LabelledImages, load_model


def test_whole_groups_are_drawn_and_weighted_by_their_images():
    # group a: three images, each +1; group b: one image, 0. A draw holds a twice (1), b twice (0) or
    # one of each (3 of 4 images: 0.75), with probabilities 1/4, 1/4, 1/2.
    differences = np.array([[1.0, 1.0, 1.0, 0.0]])
    draws = paired.group_draws(differences, ["a", "a", "a", "b"], draws=20_000, seed=1)
    assert draws.shape == (20_000, 1)
    values, counts = np.unique(draws.round(12), return_counts=True)
    assert values.tolist() == [0.0, 0.75, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.015)


def test_identical_outcomes_differ_by_nothing_and_other_images_are_refused():
    rng = np.random.default_rng(0)
    one = {"set": {"scores": (rng.random((3, 40)) > 0.5).astype(float), "groups": [str(i // 2) for i in range(40)]}}
    rows = paired.compare(one, one, draws=500)
    for row in (rows["set"], rows["mean"]):
        assert row["difference"] == [0.0, 0.0, 0.0] and row["low"] == [0.0] * 3 and row["high"] == [0.0] * 3
    assert rows["set"]["images"] == 40 and rows["set"]["groups"] == 20
    other = {"set": {**one["set"], "groups": [str(i) for i in range(40)]}}
    with pytest.raises(ValueError, match="set: the two outcomes are not of the same test images"):
        paired.compare(one, other)


def test_the_differences_are_those_of_the_evaluation_table_on_real_images(tmp_path, data_root, capsys):
    names = ["Kermany OCT", "Hannover CXR AP vs PA"]
    cache = str(tmp_path / "cache")
    model, start = load_model("midol-micro"), evaluate.model_at("midol-micro", "random")
    ours = paired.outcomes(model, data_root, "pooled", cache_dir=cache, names=names)
    theirs = paired.outcomes(start, data_root, "pooled", cache_dir=cache, names=names)
    tables = [evaluate.evaluate(m, data_root, names, feature="pooled", cache_dir=cache) for m in (model, start)]
    rows = paired.compare(ours, theirs, draws=2000)
    for name in names:
        expected = [evaluate.figure(tables[0], name, p, k) - evaluate.figure(tables[1], name, p, k) for p, k in evaluate.COMPARED]
        assert rows[name]["difference"] == pytest.approx(expected, abs=1e-9)
        assert all(lo <= d <= hi for d, lo, hi in zip(rows[name]["difference"], rows[name]["low"], rows[name]["high"]))
    assert max(abs(d) for d in rows["Hannover CXR AP vs PA"]["difference"]) > 0.05  # two models, not one twice
    assert rows["Kermany OCT"]["images"] == 28 and rows["Kermany OCT"]["groups"] < 28  # patients, not images
    assert rows["Hannover CXR AP vs PA"]["groups"] < rows["Hannover CXR AP vs PA"]["images"] / 2
    assert rows["mean"]["difference"] == pytest.approx(np.mean([rows[n]["difference"] for n in names], axis=0).tolist())

    out = tmp_path / "rows.json"
    assert paired.main(["--model", "midol-micro", "--baseline", "random", "--datasets", *names, "--cache-dir", cache,
                        "--out", str(out)]) == 0
    assert json.loads(out.read_text())["Kermany OCT"]["difference"] == pytest.approx(rows["Kermany OCT"]["difference"])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].count("|") == printed.splitlines()[2].count("|") == 5  # four columns
    assert "| Kermany OCT | 28 |" in printed and "model minus random weights" in printed and "**mean over the 2**" in printed


def test_a_multi_label_set_is_refused_by_name(data_root, monkeypatch):
    with np.load(data_root / "xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz") as arrays:
        images = list(arrays["test_images"][:4])
    multi = LabelledImages(images, np.array([[1, 0], [0, 1], [1, 1], [0, 0]]), ["a", "b"], name="two findings")
    sets = {"two findings": ("xray", lambda root: (multi, multi))}
    monkeypatch.setattr(paired, "BENCHMARKS", sets)
    monkeypatch.setattr(evaluate, "BENCHMARKS", sets)  # where the splits are looked up
    with pytest.raises(DatasetError, match="two findings is multi-label; benchmarks.paired compares single-label sets"):
        paired.outcomes(None, data_root)
    with pytest.raises(DatasetError, match="unknown dataset 'PneumoniaMNIST'; choose from two findings"):
        paired.outcomes(None, data_root, names=["PneumoniaMNIST"])
