"""The fine-tuning examples and the evaluation command, end to end on real images."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from midol_hub import (
    MIDoLForImageClassification,
    WeightsMismatchError,
    MIDoLForSemanticSegmentation,
    extract_features,
    from_npz,
    linear_probe,
    load_lora,
    load_model,
)

from .helpers import make_micro

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def classification():
    return example("finetune_classification")


@pytest.fixture(scope="module")
def segmentation():
    return example("finetune_segmentation")

MICRO = ["--model", "midol-micro", "--random-weights"]


def test_linear_probe_on_a_real_npz_with_the_cache(tmp_path, data_root, capsys, classification):
    npz = str(data_root / "fundus/retinamnist/retinamnist.npz")
    argv = [*MICRO, "--data", npz, "--modality", "fundus", "--epochs", "5", "--output-dir", str(tmp_path / "run")]
    assert classification.main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["sizes"] == {"train": 1080, "val": 120, "test": 400}
    for block in ("val", "test"):
        assert set(metrics[block]) == {"accuracy", "balanced_accuracy", "auc", "f1", "per_class", "confusion_matrix"}
    assert np.array(metrics["test"]["confusion_matrix"]).sum() == 400
    assert metrics["test"]["auc"] > 0.6  # random micro features still carry signal on RetinaMNIST
    model = MIDoLForImageClassification.from_pretrained(tmp_path / "run" / "model")
    assert model.config.num_labels == 5 and model.config.task_modality == "fundus"
    cached = sorted((tmp_path / "run" / "feature_cache").glob("*.safetensors"))
    assert len(cached) == 3  # train, val, test
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert classification.main(argv) == 0  # second run: every split comes from the cache
    assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_example_linear_probe_matches_the_library_on_pneumoniamnist(tmp_path, data_root, classification):
    npz = data_root / "xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz"
    argv = ["--model", "midol-micro", "--data", str(npz), "--modality", "xray", "--output-dir", str(tmp_path / "run")]
    assert classification.main(argv) == 0  # default settings, as a new user runs it
    example_accuracy = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["accuracy"]
    encoder = load_model("midol-micro")
    cache = str(tmp_path / "run" / "feature_cache")
    train, test = from_npz(npz, "train"), from_npz(npz, "test")
    features = [extract_features(encoder, part.images, "xray", cache_dir=cache) for part in (train, test)]
    library_accuracy = float((linear_probe(features[0], train.labels, features[1]).argmax(1) == test.labels).mean())
    # the example picks its strength on the validation split, the library uses a fixed one (v3: 0.808 vs 0.821)
    assert example_accuracy >= library_accuracy - 0.02, (example_accuracy, library_accuracy)
    # the saved model reproduces the probe: its head is the fitted regression
    model = MIDoLForImageClassification.from_pretrained(tmp_path / "run" / "model")
    with torch.no_grad():
        logits = model.classifier(model.eval().norm(features[1]))
    assert float((logits.argmax(1).numpy() == test.labels).mean()) == pytest.approx(example_accuracy)
    # and so does the whole saved model on the images themselves (the embedding normalised as extract_features has it)
    probabilities = model.predict(test.images[:64])
    assert float((probabilities - logits[:64].softmax(-1)).abs().max()) < 1e-4


def test_finetune_on_a_real_class_folder(tmp_path, data_root, classification):
    argv = [*MICRO, "--data", str(data_root / "oct/kermany_oct2017_samples_c"), "--modality", "oct", "--mode", "finetune",
            "--epochs", "2", "--batch-size", "8", "--split", "0.5,0.25,0.25", "--output-dir", str(tmp_path / "ft")]
    assert classification.main(argv) == 0
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["mode"] == "finetune" and sum(metrics["sizes"].values()) == 28
    probs = MIDoLForImageClassification.from_pretrained(tmp_path / "ft" / "model").predict(
        [str(data_root / "oct/kermany_oct2017_samples_b/test_cnv.jpeg")])
    assert probs.shape == (1, 4)


def test_lora_trains_an_adapter_that_loads_back_onto_the_base_exactly(tmp_path, data_root, classification):
    argv = ["--model", "midol-micro", "--data", str(data_root / "oct/kermany_oct2017_samples_c"), "--modality", "oct",
            "--mode", "lora", "--lora-rank", "4", "--epochs", "2", "--batch-size", "8", "--split", "0.5,0.25,0.25",
            "--output-dir", str(tmp_path / "lora")]
    assert classification.main(argv) == 0
    metrics = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    encoder = load_model("midol-micro")
    attention = [m for name, m in encoder.named_modules() if name.endswith(("attn.qkv", "attn.proj"))]
    rank, classes, width = 4, 4, encoder.config.num_features
    lora = sum(rank * (m.in_features + m.out_features) for m in attention)
    assert metrics["trainable_parameters"] == lora + classes * (width + 1)  # LoRA matrices + the linear classifier
    adapter = tmp_path / "lora" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                        "midol_head.safetensors", "midol_task.json"]
    assert (adapter / "adapter_model.safetensors").stat().st_size < 0.1 * encoder.num_parameters() * 4  # no base weights
    model = load_lora(encoder, adapter)
    before = encoder.backbone.layers[0].blocks[0].attn.qkv.weight.clone()
    image = str(data_root / "oct/kermany_oct2017_samples_b/test_cnv.jpeg")
    pixels = model.get_base_model().preprocess([image])
    with torch.no_grad():
        first = model(pixels).logits
        again = load_lora(load_model("midol-micro"), adapter)(pixels).logits
        merged = load_lora(load_model("midol-micro"), adapter).merge_and_unload()(pixels).logits
    assert torch.equal(first, again)
    assert float((merged - first).abs().max()) < 1e-4  # merged into the base weights: the same classifier
    assert torch.equal(before, load_model("midol-micro").backbone.layers[0].blocks[0].attn.qkv.weight)
    with pytest.raises(WeightsMismatchError, match="trained on base weights"):
        load_lora(load_model("midol-micro", pretrained=False), adapter)


def multilabel_csv(tmp_path: Path, data_root: Path, broken: bool = False) -> Path:
    files = sorted((data_root / "dermoscopy/isic_uda1_250px").glob("*.jpg"))[:24]
    rng = np.random.default_rng(0)
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "melanoma_risk", "large"])
        for i, path in enumerate(files):
            writer.writerow([str(path), int(rng.random() < 0.5), i % 2])
        if broken:
            (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 nope")
            writer.writerow([str(tmp_path / "broken.jpg"), 0, 1])
    return tmp_path / "labels.csv"


def test_multilabel_csv_linear_probe(tmp_path, data_root, classification):
    path = multilabel_csv(tmp_path, data_root)
    argv = [*MICRO, "--data", str(path), "--modality", "derm", "--epochs", "3", "--output-dir", str(tmp_path / "ml")]
    assert classification.main(argv) == 0
    metrics = json.loads((tmp_path / "ml" / "metrics.json").read_text())
    assert metrics["classes"] == ["melanoma_risk", "large"] and len(metrics["thresholds"]) == 2
    assert len(metrics["test"]["confusion_matrix"]) == 2  # one 2x2 matrix per label
    assert MIDoLForImageClassification.from_pretrained(tmp_path / "ml" / "model").config.problem_type == "multi_label_classification"


def test_example_errors_are_one_line(tmp_path, data_root, capsys, classification):
    cases = [
        (["--data", str(multilabel_csv(tmp_path, data_root)), "--label-columns", "diagnosis"], "no column 'diagnosis'"),
        (["--data", str(multilabel_csv(tmp_path, data_root, broken=True))], "broken.jpg"),
    ]
    (tmp_path / "classes" / "a").mkdir(parents=True)
    (tmp_path / "classes" / "b").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "classes" / "a" / "x.png")
    cases.append((["--data", str(tmp_path / "classes")], "class 'b' has no images"))
    narrow = make_micro(expert_modalities=["xray", "xray", "fundus", "dermoscopy", "pathology"])
    narrow.save_pretrained(tmp_path / "narrow")
    cases.append((["--model", str(tmp_path / "narrow"), "--data", str(data_root / "oct/kermany_oct2017_samples_c"),
                   "--modality", "oct"], "this model has no expert for 'oct'"))
    for extra, message in cases:
        argv = [*MICRO, "--modality", "derm", "--epochs", "1", "--output-dir", str(tmp_path / "out"), *extra]
        assert classification.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("finetune_classification: error: ") and message in err


def test_segmentation_decoder_overfits_real_images(tmp_path, data_root, segmentation):
    """Masks made here by thresholding the darker lesion in real dermoscopy photographs."""
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    for path in sorted((data_root / "dermoscopy/isic_uda1_250px").glob("*.jpg"))[:4]:
        gray = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        Image.fromarray(((gray < gray.mean() - 0.5 * gray.std()) * 255).astype(np.uint8)).save(tmp_path / "mask" / f"{path.stem}.png")
        Image.open(path).save(tmp_path / "img" / path.name)
    argv = [*MICRO, "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"), "--modality", "derm",
            "--epochs", "80", "--batch-size", "4", "--val-fraction", "0", "--output-dir", str(tmp_path / "seg")]
    assert segmentation.main(argv) == 0
    metrics = json.loads((tmp_path / "seg" / "metrics.json").read_text())
    assert metrics["best"]["dice"] > 0.9 and metrics["num_classes"] == 2
    model = MIDoLForSemanticSegmentation.from_pretrained(tmp_path / "seg" / "model")
    assert model.config.num_labels == 2
