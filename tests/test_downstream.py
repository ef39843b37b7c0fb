"""Downstream: labelled sets, metrics against scikit-learn, the feature cache, task models."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from transformers import AutoModelForImageClassification

from midol_hub import (
    DatasetError,
    MIDoLForImageClassification,
    MIDoLForSemanticSegmentation,
    classification_metrics,
    extract_features,
    few_shot,
    from_csv,
    from_folder,
    from_npz,
    group_split,
    knn_classify,
    layerwise_lr_groups,
    linear_probe,
    segmentation_scores,
)
from midol_hub.tasks import dice_loss

from .helpers import make_micro


def test_class_folders_csv_and_npz(data_root, tmp_path):
    folder = from_folder(data_root / "oct/kermany_oct2017_samples_c")
    assert folder.class_names == ["CNV", "DME", "DRUSEN", "NORMAL"] and len(folder) == 28
    assert np.bincount(folder.labels).tolist() == [7, 8, 8, 5]
    rows = [("a.jpeg", "CNV"), ("b.jpeg", "NORMAL"), ("c.jpeg", "CNV")]
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    data = from_csv(tmp_path / "labels.csv")
    assert data.class_names == ["CNV", "NORMAL"] and data.labels.tolist() == [0, 1, 0]
    assert data.images[0] == str((tmp_path / "a.jpeg").resolve())
    npz = from_npz(data_root / "xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz", "val")
    assert len(npz) == 270 and npz.labels.tolist().count(1) == 135


def test_multilabel_csv(tmp_path):
    with open(tmp_path / "ml.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "effusion", "cardiomegaly"), ("a.png", 1, 0), ("b.png", 1, 1)])
    data = from_csv(tmp_path / "ml.csv")
    assert data.multilabel and data.labels.tolist() == [[1, 0], [1, 1]] and data.class_names == ["effusion", "cardiomegaly"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: (p / "c.csv").write_text("path,label\na.png,x\n") and from_csv(p / "c.csv", ["diagnosis"]),
         r"no column 'diagnosis'; the columns are path, label"),
        (lambda p: ((p / "d" / "yes").mkdir(parents=True), (p / "d" / "no").mkdir(), (p / "d" / "yes" / "a.png").write_bytes(b"x"),
                    from_folder(p / "d")), r"class 'no' has no images"),
        (lambda p: from_npz(p / "x.npz", "val") if np.savez(p / "x.npz", train_images=np.zeros(1)) is None else None,
         "no val_images or val_labels"),
    ],
)
def test_bad_labelled_sets_are_named(tmp_path, make, message):
    with pytest.raises(DatasetError, match=message):
        make(tmp_path)


def test_group_split_keeps_patients_together_and_stratifies():
    labels = np.array([0] * 40 + [1] * 20)
    groups = [f"p{i // 2}" for i in range(60)]  # two images per patient
    from midol_hub import LabelledImages

    data = LabelledImages(list(range(60)), labels, ["a", "b"], groups)
    train, test = group_split(data, [0.7, 0.3], seed=1)
    assert not set(train.groups) & set(test.groups)
    assert len(train) + len(test) == 60
    assert abs(test.labels.mean() - 1 / 3) < 0.1


def test_metrics_agree_with_scikit_learn():
    y = np.array([0, 1, 2, 2, 1, 0, 2, 1])
    scores = np.array([[.7, .2, .1], [.1, .8, .1], [.2, .2, .6], [.5, .1, .4], [.2, .5, .3], [.3, .4, .3], [.1, .1, .8], [.6, .3, .1]])
    result = classification_metrics(y, scores, ["a", "b", "c"])
    pred = scores.argmax(1)
    assert result["accuracy"] == skm.accuracy_score(y, pred) == 0.625
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert result["auc"] == pytest.approx(skm.roc_auc_score(y, scores, multi_class="ovr"))
    assert result["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert result["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert result["per_class"]["c"]["support"] == 3
    binary = classification_metrics(np.array([0, 1, 1, 0]), np.array([[.9, .1], [.2, .8], [.6, .4], [.4, .6]]))
    assert binary["auc"] == pytest.approx(skm.roc_auc_score([0, 1, 1, 0], [.1, .8, .4, .6])) and binary["accuracy"] == 0.5


def test_multilabel_metrics_use_thresholds():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[.9, .2], [.3, .7], [.6, .4], [.1, .3]])
    result = classification_metrics(y, probs, ["e", "c"], thresholds=np.array([0.5, 0.35]))
    pred = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    assert result["accuracy"] == skm.accuracy_score(y, pred) == 1.0
    assert result["auc"] == pytest.approx(np.mean([skm.roc_auc_score(y[:, c], probs[:, c]) for c in range(2)]))


def test_knn_votes_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    probs = knn_classify(train, np.array([0, 0, 1]), torch.tensor([[1.0, 0.05]]), k=2, temperature=1.0)
    assert probs.shape == (1, 2) and probs[0, 0] == pytest.approx(1.0)  # both nearest neighbours are class 0
    probs = knn_classify(train, np.array([0, 0, 1]), torch.tensor([[0.0, 1.0]]), k=3, temperature=1.0)
    sims = np.array([0.0, 0.1 / np.hypot(0.9, 0.1), 1.0])
    weights = np.exp(sims)
    assert probs[0, 1] == pytest.approx(weights[2] / weights.sum(), rel=1e-5)


def test_linear_probe_and_few_shot_separate_clear_clusters():
    rng = np.random.default_rng(0)
    x = torch.tensor(np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(4, 1, (30, 8))]), dtype=torch.float32)
    y = np.array([0] * 30 + [1] * 30)
    probs = linear_probe(x[::2], y[::2], x[1::2])
    assert (probs.argmax(1) == y[1::2]).mean() == 1.0
    result = few_shot(x[::2], y[::2], x[1::2], y[1::2], shots=2, seeds=(0, 1, 2))
    assert result["shots"] == 2 and len(result["runs"]) == 3 and result["mean"] > 0.9
    assert result["mean"] == pytest.approx(np.mean(result["runs"])) and result["std"] == pytest.approx(np.std(result["runs"]))
    noisy = torch.tensor(rng.normal(0, 1, (60, 8)), dtype=torch.float32)  # no signal: the seeds' subsets disagree
    spread = few_shot(noisy[::2], y[::2], noisy[1::2], y[1::2], shots=2, seeds=(0, 1, 2))
    assert len(set(spread["runs"])) > 1 and spread["std"] > 0


def test_dice_and_iou_by_hand():
    pred = torch.tensor([[[0, 1], [1, 1]]])
    target = torch.tensor([[[0, 1], [0, 1]]])
    scores = segmentation_scores(pred, target, 2)
    assert scores["dice"] == pytest.approx(2 * 2 / (3 + 2)) and scores["iou"] == pytest.approx(2 / 3)


def test_feature_cache_is_hit_the_second_time(micro, tmp_path, rng):
    images = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    calls = []
    original = micro.encode

    def counting_encode(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    micro.encode = counting_encode
    try:
        first = extract_features(micro, images, "pathology", cache_dir=tmp_path)
        second = extract_features(micro, images, "pathology", cache_dir=tmp_path)
        assert len(calls) == 1 and torch.equal(first, second)
        images[0][0, 0, 0] ^= 1  # one changed pixel is a new dataset
        extract_features(micro, images, "pathology", cache_dir=tmp_path)
        extract_features(micro, images[1:], "oct", cache_dir=tmp_path)  # another modality
        assert len(calls) == 3 and len(list(tmp_path.glob("*.safetensors"))) == 3
    finally:
        del micro.encode


def test_classification_model_round_trip_and_auto_class(micro, tmp_path):
    model = MIDoLForImageClassification.from_encoder(micro, ["normal", "pneumonia"], "cxr")
    assert model.config.task_modality == "xray" and model.config.id2label == {0: "normal", 1: "pneumonia"}
    assert all(torch.equal(a, b) for a, b in zip(micro.backbone.state_dict().values(), model.midol.backbone.state_dict().values()))
    model.save_pretrained(tmp_path / "cls")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "cls")
    assert isinstance(loaded, MIDoLForImageClassification)
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        out, again = model(x, labels=labels), loaded(x, labels=labels)
    assert torch.equal(out.logits, again.logits)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    with pytest.raises(TypeError, match="output_pyramids"):
        model(x, output_pyramids=True)  # unknown arguments raise instead of being swallowed
    probs = loaded.predict([np.zeros((30, 30), dtype=np.uint8)])
    assert probs.shape == (1, 2) and probs.sum().item() == pytest.approx(1.0)


def test_a_modality_without_an_expert_is_refused():
    model = make_micro(expert_modalities=["xray", "xray", "fundus", "dermoscopy", "pathology"])
    with pytest.raises(ValueError, match="this model has no expert for 'oct'"):
        MIDoLForImageClassification.from_encoder(model, ["a", "b"], "oct")


def test_layerwise_lr_decay_scales_by_depth(micro):
    model = MIDoLForImageClassification.from_encoder(micro, ["a", "b"], "oct")
    groups = layerwise_lr_groups(model, lr=1.0, decay=0.5, weight_decay=0.05)
    scale = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert scale[id(model.classifier.weight)] == 1.0
    assert scale[id(model.midol.backbone.patch_embed.proj.weight)] == 0.5 ** 13  # 12 blocks + 1
    assert scale[id(model.midol.backbone.layers[3].blocks[1].mlp.fc1.weight)] == 0.5 ** 1
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.classifier.bias) in no_decay and id(model.classifier.weight) not in no_decay


def test_timm_layer_decay_is_one_step_off_retfounds_so_ours_is_kept(micro):
    from timm.optim import param_groups_layer_decay

    model = MIDoLForImageClassification.from_encoder(micro, ["a", "b"], "oct")
    ours = {id(p): g["lr_scale"] for g in layerwise_lr_groups(model, 1.0, 0.5, 0.05) for p in g["params"]}
    timm_groups = param_groups_layer_decay(model.midol.backbone, weight_decay=0.05, layer_decay=0.5)
    backbone = dict(model.midol.backbone.named_parameters())
    theirs = {name: g["lr_scale"] for g in timm_groups for name, p in backbone.items() if any(p is q for q in g["params"])}
    assert theirs["patch_embed.proj.weight"] == 2 * ours[id(backbone["patch_embed.proj.weight"])]  # 0.5^12 vs 0.5^13
    assert theirs["layers.0.blocks.0.attn.qkv.weight"] == 2 * ours[id(backbone["layers.0.blocks.0.attn.qkv.weight"])]
    assert len(theirs) == len(backbone)  # and nothing of the task head


def test_segmentation_model_outputs_full_resolution_logits(micro):
    model = MIDoLForSemanticSegmentation.from_encoder(micro, ["background", "lesion", "other"], "derm")
    labels = torch.randint(0, 3, (2, 64, 64))
    out = model(torch.randn(2, 3, 64, 64), labels=labels)
    assert out.logits.shape == (2, 3, 64, 64)
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, labels).item() < 1e-3 and dice_loss(-perfect, labels).item() > 0.99
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels) + dice_loss(out.logits, labels))
