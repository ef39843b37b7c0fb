"""Hugging Face conventions on real images: AutoImageProcessor, both pipelines and Trainer, for
the shipped midol-micro and for a converted official checkpoint."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    Trainer,
    TrainingArguments,
    pipeline,
)

from midol_hub import (
    MIDoLForImageClassification,
    MIDoLImageProcessor,
    convert_checkpoint,
    get_entry,
    layerwise_lr_groups,
    load_model,
)

SHIPPED = get_entry("midol-micro").embedded_path()


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("converted") / "model"
    convert_checkpoint(official[0], out, img_size=64)
    return out


@pytest.fixture(scope="module")
def real_images(data_root) -> dict[str, list]:
    return {
        "oct": sorted((data_root / "oct/kermany_oct2017_samples_b").glob("*.jpeg"))[:3],
        "fundus": [data_root / "fundus/skimage_examples/retina.jpg"],
        "pathology": sorted((data_root / "pathology/crc_val_he_7k_examples").glob("*.jpg"))[:2],
    }


@pytest.mark.parametrize("which", ["shipped", "converted"])
def test_auto_image_processor_equals_model_preprocess(which, converted, real_images, data_root):
    directory = SHIPPED if which == "shipped" else converted
    processor, model = AutoImageProcessor.from_pretrained(directory), load_model(directory)
    assert isinstance(processor, MIDoLImageProcessor)
    dicom = data_root / "other/pydicom_test_files/CT_small.dcm"
    sixteen_bit = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16)
    for modality, images in [*real_images.items(), ("xray", [dicom, sixteen_bit, Image.open(real_images["oct"][0])])]:
        inputs = processor(images, modality=modality, return_tensors="pt")
        assert torch.equal(inputs["pixel_values"], model.preprocess(images, modality))
        assert inputs["expert_index"].tolist() == [model.config.expert_for(modality)] * len(images)
        with torch.no_grad():
            embedding = model(**inputs).embedding
        expected = model.encode(images, modality=modality, normalize=False).embedding
        torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-5)
    auto = processor(real_images["oct"])
    assert set(auto) == {"pixel_values"} and torch.equal(auto["pixel_values"], model.preprocess(real_images["oct"], "auto"))
    with pytest.raises(TypeError, match="unexpected argument"):
        processor(real_images["oct"], size=224)


@pytest.mark.parametrize("which", ["shipped", "converted"])
def test_feature_extraction_pipeline_returns_encode_outputs(which, converted, real_images):
    directory = SHIPPED if which == "shipped" else converted
    extractor = pipeline("image-feature-extraction", model=str(directory))
    model = load_model(directory)
    paths = real_images["pathology"] + real_images["fundus"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        routed = torch.tensor([extractor(str(p))[0] for p in paths])
        pooled = torch.tensor([extractor(Image.open(p), pool=True)[0] for p in paths])
        forced = torch.tensor([extractor(str(p), image_processor_kwargs={"modality": "oct"})[0] for p in real_images["oct"]])
    # the pipeline decodes files in full (transformers' load_image), as encode does decoded images
    auto = model.encode([Image.open(p) for p in paths], normalize=False, output=("embedding", "pooled"))
    torch.testing.assert_close(routed, auto.embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, auto.pooled, rtol=1e-5, atol=1e-5)
    # encode decodes large JPEG files at a reduced size (image_io.JPEG_OVERSAMPLE): the same embedding
    from_files = model.encode(paths, normalize=False).embedding
    assert torch.nn.functional.cosine_similarity(from_files, routed).min() > 0.999
    oct_embedding = model.encode([Image.open(p) for p in real_images["oct"]], modality="oct", normalize=False).embedding
    torch.testing.assert_close(forced, oct_embedding, rtol=1e-5, atol=1e-5)


def pneumonia(data_root, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(data_root / "xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz") as data:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
    picks = np.random.default_rng(0).permutation(len(images))[:count]
    return images[picks], labels[picks]


class Pixels(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, labels: np.ndarray) -> None:
        self.pixels, self.labels = pixels, torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["shipped", "converted"])
def test_trainer_fine_tunes_and_the_image_classification_pipeline_serves(which, converted, data_root, tmp_path):
    encoder = load_model("midol-micro" if which == "shipped" else converted)
    model = MIDoLForImageClassification.from_encoder(encoder, ["normal", "pneumonia"], "xray")
    processor = MIDoLImageProcessor.from_config(model.config)
    train_images, train_labels = pneumonia(data_root, "train", 640 if which == "shipped" else 128)
    test_images, test_labels = pneumonia(data_root, "test", 64)
    train = Pixels(processor(train_images)["pixel_values"], train_labels)  # (N, 28, 28): a stack of grayscale images
    test = Pixels(processor(test_images)["pixel_values"], test_labels)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), num_train_epochs=3 if which == "shipped" else 1,
                             per_device_train_batch_size=32, warmup_steps=6, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    optimizer = torch.optim.AdamW(layerwise_lr_groups(model, lr=3e-3, decay=0.5, weight_decay=0.05))

    def accuracy(prediction) -> dict:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy,
                      optimizers=(optimizer, None))
    trainer.train()
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        own = (model(test.pixels).logits.argmax(-1) == test.labels).float().mean().item()
    assert metrics["eval_accuracy"] == pytest.approx(own) and np.isfinite(metrics["eval_loss"])
    if which == "shipped":  # measured: loss 0.7 -> 0.25, test accuracy 0.89 (chance 0.5, balanced)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2, losses
        assert metrics["eval_accuracy"] > 0.75

    model.save_pretrained(tmp_path / "classifier")
    classify = pipeline("image-classification", model=str(tmp_path / "classifier"))
    files = []
    for index, image in enumerate(test_images[:8]):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
        files.append(str(tmp_path / f"{index}.png"))
    served = classify(files, top_k=2)
    probs = MIDoLForImageClassification.from_pretrained(tmp_path / "classifier").predict(files)
    for answer, row in zip(served, probs):
        assert {a["label"] for a in answer} == {"normal", "pneumonia"}
        assert answer[0]["label"] == ["normal", "pneumonia"][int(row.argmax())]
        assert answer[0]["score"] == pytest.approx(float(row.max()), abs=1e-5)


def test_auto_model_loads_the_shipped_model_in_float32():
    model = AutoModel.from_pretrained(SHIPPED)
    assert next(model.parameters()).dtype == torch.float32 and model.provenance.weights_sha256
