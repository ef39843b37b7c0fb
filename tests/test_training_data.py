"""Pretraining data sources, skipped files, balanced sampling, augmentation and schedules."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from midol_hub.modalities import IMAGENET_MEAN, IMAGENET_STD
from torchvision.transforms import v2

from training.augment import HED_FROM_RGB, RGB_FROM_HED, MultiCrop, SeparableGaussianBlur, StainJitter, colour_jitter
from training.config import ConfigError, load_config
from training.data import (
    DatasetError,
    PretrainDataset,
    collate,
    epoch_indices,
    open_source,
)
from training import prepare_shared_data, shared_data
from training.schedules import cosine, linear_then_constant
from training.shards import decode_sample, open_shards

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def test_sources_read_folders_npz_lists_and_plain_tars(data_root, tmp_path):
    folder = open_source(f"oct={data_root / 'oct'}")
    assert folder.tag == "oct" and len(folder) == 100 and folder.read(0).shape[2] == 1
    npz = open_source(str(data_root / "fundus/retinamnist/retinamnist.npz"))
    assert npz.tag is None and len(npz) == 1080 and npz.read(0).shape == (28, 28, 3)
    assert npz.labels.shape == (1080,)
    assert len(open_source(str(data_root / "fundus/retinamnist/retinamnist.npz"), split="test")) == 400
    with tarfile.open(tmp_path / "shard-000.tar", "w") as shard:
        for path in sorted((data_root / "pathology/crc_val_he_7k_examples").glob("*.jpg"))[:3]:
            shard.add(path, arcname=f"sample/{path.name}")
    shards = open_shards(f"pathology={tmp_path / 'shard-000.tar'}")  # a plain tar of images streams as a shard
    assert shards == [{"path": str(tmp_path / "shard-000.tar"), "tag": "pathology", "samples": 3}]
    sample = next(iter(wds.tarfile_to_samples()([{"url": shards[0]["path"]}])))
    assert decode_sample(sample).shape == (224, 224, 3)
    listed = sorted(str(p) for p in (data_root / "oct/kermany_oct2017_samples_b").glob("*.jpeg"))
    (tmp_path / "train.txt").write_text("\n".join(listed[:3]) + "\n")
    assert len(open_source(f"oct={tmp_path / 'train.txt'}")) == 3
    (tmp_path / "bad.txt").write_text("/nonexistent.png\n")
    with pytest.raises(DatasetError, match="lists 1 missing file"):
        open_source(str(tmp_path / "bad.txt"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "absent"), "does not exist"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no images"),
        (lambda p: np.savez(p / "x.npz", images=np.zeros((2, 8, 8))) or str(p / "x.npz"), r"no 'train_images' array \(it has images\)"),
        (lambda p: (p / "notes.md").write_text("x") and str(p / "notes.md"), "expected a folder, an .npz file or a .txt list"),
    ],
)
def test_bad_data_paths_say_what_to_fix(tmp_path, make, message):
    with pytest.raises(DatasetError, match=message):
        open_source(make(tmp_path))


def test_unreadable_files_are_skipped_and_named(data_root, tmp_path):
    Image.open(data_root / "oct/kermany_oct2017_samples_b/test_cnv.jpeg").save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    dataset = PretrainDataset([open_source(str(tmp_path))], MultiCrop(64, local_number=1))
    batch = collate([dataset[0], dataset[1]])
    assert len(batch["failed"]) == 1 and "bad.png" in batch["failed"][0]
    assert [c.shape for c in batch["crops"]] == [(1, 3, 64, 64)] * 3


def test_crops_are_reproducible_per_epoch_and_index(data_root):
    dataset = PretrainDataset([open_source(str(data_root / "oct/kermany_oct2017_samples_b"))], MultiCrop(64))
    first = dataset[1]["crops"]
    assert all(torch.equal(a, b) for a, b in zip(first, dataset[1]["crops"]))
    dataset.epoch = 1
    assert not torch.equal(first[0], dataset[1]["crops"][0])


def test_local_crops_can_be_rendered_smaller_then_resized(data_root):
    crops = MultiCrop(64, local_number=2, local_size=24)(torch.rand(3, 100, 120))
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 4


def test_balanced_sampling_draws_every_root_equally(data_root):
    big = open_source(f"fundus={data_root / 'fundus/retinamnist/retinamnist.npz'}")
    small = open_source(f"oct={data_root / 'oct/kermany_oct2017_samples_b'}")
    dataset = PretrainDataset([big, small], MultiCrop(64))
    plain = Counter(dataset.locate(i)[0] for i in epoch_indices(dataset, 0, 0, "none", 8))
    balanced = Counter(dataset.locate(i)[0] for i in epoch_indices(dataset, 0, 0, "tags", 8))
    assert plain[1] == 4 and plain[0] > 1000
    assert abs(balanced[0] - balanced[1]) <= 8 and balanced[0] + balanced[1] == 1080
    assert epoch_indices(dataset, 3, 0, "tags", 8) == epoch_indices(dataset, 3, 0, "tags", 8)
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        epoch_indices(PretrainDataset([small], MultiCrop(64)), 0, 0, "none", 8)


def test_batch_balancing_puts_every_group_in_every_batch_equally(data_root):
    xray = open_source(f"xray={data_root / 'xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz'}")
    fundus = open_source(f"fundus={data_root / 'fundus/retinamnist/retinamnist.npz'}")
    blood = open_source(f"pathology={data_root / 'pathology/bloodmnist/bloodmnist.npz'}")
    dataset = PretrainDataset([xray, fundus, blood], MultiCrop(64))
    order = epoch_indices(dataset, 0, 0, "tags_per_batch", 32)
    epoch = Counter(dataset.locate(i)[0] for i in order)
    assert max(epoch.values()) - min(epoch.values()) <= 32
    for start in range(0, len(order), 32):
        counts = Counter(dataset.locate(i)[0] for i in order[start : start + 32])
        assert len(counts) == 3 and max(counts.values()) - min(counts.values()) <= 2
    roots = [Counter(dataset.locate(i)[0] for i in epoch_indices(dataset, 0, 0, "tags", 32)[s : s + 32]) for s in (0, 32, 64)]
    assert any(max(c.values()) - min(c.values()) > 2 for c in roots)  # epoch balance alone leaves batches uneven


def test_schedules():
    assert cosine(0, 100, 1.0, 0.0, warmup=10) == 0.0
    assert cosine(5, 100, 1.0, 0.0, warmup=10) == 0.5
    assert cosine(10, 100, 1.0, 0.0, warmup=10) == 1.0
    assert abs(cosine(55, 100, 1.0, 0.0, warmup=10) - 0.5) < 1e-12
    assert cosine(100, 100, 1.0, 0.0, warmup=10) == 0.0
    assert cosine(0, 10, 0.996, 1.0) == 0.996 and cosine(10, 10, 0.996, 1.0) == 1.0
    assert linear_then_constant(5, 10, 0.04, 0.07) == pytest.approx(0.055)


def test_config_files_and_overrides():
    config = load_config(CONFIGS / "midol_swin_base.yaml", ["optim.lr=5e-4", "model.overrides={top_k: 2}"])
    assert config["model"]["arch"] == "midol-swin-base" and config["optim"]["batch_size"] == 256
    assert config["optim"]["lr"] == 5e-4 and config["model"]["overrides"] == {"top_k": 2}
    paper = load_config(CONFIGS / "midol_swin_base.yaml")
    assert (paper["optim"]["weight_decay"], paper["optim"]["weight_decay_end"], paper["optim"]["clip_grad"]) == (0.04, 0.4, 3.0)
    assert (paper["objective"]["sinkhorn_eps"], paper["objective"]["sinkhorn_iters"], paper["crops"]["local_number"]) == (0.05, 3, 2)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; valid keys here: batch_size"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(None, ["optim.lr=fast"])


def test_stain_jitter_round_trips_and_restains_real_he_tiles_as_ihc(data_root):
    tile = np.asarray(Image.open(data_root / "pathology/crc_val_he_7k_examples/TUM-TCGA-AAHIDTWA.jpg").convert("RGB"))
    image = torch.from_numpy(tile.astype(np.float32) / 255).permute(2, 0, 1)
    concentrations = torch.rand(32, 32, 3) * torch.tensor([1.0, 0.8, 0.5])  # physical (non-negative) stain amounts
    mixed = torch.exp(-(concentrations @ RGB_FROM_HED)).clamp(0, 1).permute(2, 0, 1)
    torch.testing.assert_close(StainJitter(sigma=0.0, restain_p=0.0)(mixed), mixed, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    stain = lambda x, k: (-torch.log(x.clamp_min(1e-6)).permute(1, 2, 0) @ HED_FROM_RGB)[..., k]  # noqa: E731
    shares, eosin = [], []
    for _ in range(20):
        restained = StainJitter(sigma=0.0, restain_p=1.0)(image)
        shares.append(float((stain(restained, 2) > stain(image, 2) + 0.05).float().mean()))
        eosin.append(float(stain(restained, 1).mean() / stain(image, 1).mean()))
    assert 0.01 < np.mean(shares) < 0.5 and max(shares) < 0.95  # some nuclei turn brown, never the whole tile
    assert max(eosin) < 0.3  # the pink counterstain is mostly gone


def test_ihc_restaining_lays_dab_on_nuclei_or_cytoplasm_as_asked(data_root):
    tile = np.asarray(Image.open(data_root / "pathology/crc_val_he_7k_examples/TUM-TCGA-AAHIDTWA.jpg").convert("RGB"))
    image = torch.from_numpy(tile.astype(np.float32) / 255).permute(2, 0, 1)
    unmixed = (-torch.log(image.clamp_min(1e-6)).permute(1, 2, 0) @ HED_FROM_RGB).clamp_min(0)
    def dab_follows(pattern: str) -> tuple[float, float]:
        """Mean correlation over re-stainings of the added DAB with the tile's haematoxylin and eosin,
        on the pixels that turned brown."""
        torch.manual_seed(0)
        with_h, with_e = [], []
        for _ in range(20):
            restained = StainJitter(sigma=0.0, restain_p=1.0, patterns=(pattern,))(image)
            dab = (-torch.log(restained.clamp_min(1e-6)).permute(1, 2, 0) @ HED_FROM_RGB)[..., 2]
            brown = dab > 0.05
            if brown.sum() > 100:
                with_h.append(float(np.corrcoef(dab[brown], unmixed[..., 0][brown])[0, 1]))
                with_e.append(float(np.corrcoef(dab[brown], unmixed[..., 1][brown])[0, 1]))
        assert len(with_h) >= 10, f"{pattern}: too few re-stainings turned any part brown"
        return float(np.mean(with_h)), float(np.mean(with_e))
    nuclear, cytoplasmic = dab_follows("nuclear"), dab_follows("cytoplasmic")
    assert nuclear[0] > 0.99 and nuclear[1] < 0.9  # DAB where the nuclei were (H and E overlap in this tumour tile)
    assert cytoplasmic[1] > 0.99 and cytoplasmic[0] < 0.9  # DAB where the eosin was
    with pytest.raises(ValueError, match="patterns .ihc_patterns. must be a non-empty subset"):
        StainJitter(patterns=("membrane",))
    assert StainJitter(patterns="cytoplasmic").patterns == ("cytoplasmic",)  # one name, not its letters


def test_only_tagged_sources_get_stain_jitter(data_root):
    image = torch.rand(3, 80, 80)
    plain, stained = MultiCrop(64), MultiCrop(64, stain_tags=("pathology",), stain_p=1.0)
    def crops(augment, tag):
        torch.manual_seed(0)
        return augment(image, tag)
    assert all(torch.equal(a, b) for a, b in zip(crops(plain, "xray"), crops(stained, "xray")))
    assert not all(torch.equal(a, b) for a, b in zip(crops(plain, "pathology"), crops(stained, "pathology")))


@pytest.mark.parametrize("side, kernel", [(160, 33), (64, 33), (224, 45), (40, (9, 5))])
def test_separable_blur_is_torchvisions_blur(data_root, side, kernel):
    """Two 1-D passes give torchvision's 2-D blur of a real fundus photo: the same sigma draw, kernel and borders."""
    with Image.open(data_root / "fundus/idrid_segmentation_train_cropped/IDRiD_01.jpg") as photo:
        image = torch.from_numpy(np.asarray(photo.convert("RGB").resize((side + 7, side)))).permute(2, 0, 1).float() / 255
    torch.manual_seed(3)
    expected = v2.GaussianBlur(kernel, sigma=(1.0, 2.0))(image)
    torch.manual_seed(3)
    separable = SeparableGaussianBlur(kernel, sigma=(1.0, 2.0))(image)
    assert separable.shape == image.shape and (separable - image).abs().max() > 0.01  # it blurred
    torch.testing.assert_close(separable, expected, atol=2e-6, rtol=0)


def test_colour_invariances_are_settings(data_root):
    """DINO's colour jitter and grayscale take away what tells blood cells apart (benchmarks.augmentations):
    their strengths and probabilities are crops settings, partial strengths keep DINO's others."""
    blood = np.load(data_root / "pathology/bloodmnist/bloodmnist.npz")["train_images"][0]
    image = torch.from_numpy(blood).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def gray(crop: torch.Tensor) -> bool:
        pixels = crop * std + mean
        return bool((pixels - pixels[:1]).abs().max() < 1e-5)

    torch.manual_seed(0)
    assert all(gray(crop) for crop in MultiCrop(64, local_number=2, grayscale_p=1.0)(image))
    torch.manual_seed(0)
    assert not any(gray(crop) for crop in MultiCrop(64, local_number=2, colour_jitter_p=0.0, grayscale_p=0.0)(image))
    assert torch.equal(colour_jitter({"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0})(image), image)
    no_hue = colour_jitter({"hue": 0})
    assert no_hue.hue is None and no_hue.brightness == (0.6, 1.4) and no_hue.saturation == (0.8, 1.2)
    with pytest.raises(ValueError, match="colour_jitter takes brightness, contrast, saturation, hue, got hew"):
        colour_jitter({"hew": 0})
    config = load_config(CONFIGS / "midol_lite.yaml", ["crops.colour_jitter={hue: 0, saturation: 0}", "crops.grayscale_p=0"])
    assert config["crops"]["colour_jitter"] == {"hue": 0, "saturation": 0} and config["crops"]["grayscale_p"] == 0.0


def test_second_pneumonia_copy_adds_only_radiographs_that_no_labelled_split_holds(data_root, tmp_path, monkeypatch):
    extra = shared_data.pneumonia_second_copy_train(data_root)
    assert extra.shape == (2263, 28, 28) and extra.dtype == np.uint8
    with np.load(data_root / shared_data.TRAINING_ARRAYS["xray"]) as first:
        labelled = {image.tobytes() for split in ("train", "val", "test") for image in first[f"{split}_images"]}
    assert not any(image.tobytes() in labelled for image in extra)  # no probe, check or test image
    assert len({image.tobytes() for image in extra}) == len(extra)
    with np.load(data_root / shared_data.PNEUMONIA_SECOND_COPY) as second:
        index = {image.tobytes(): label for image, label in zip(second["train_images"], second["train_labels"][:, 0])}
    assert {int(index[image.tobytes()]) for image in extra} == {1}  # what the first copy dropped to balance: pneumonia

    monkeypatch.setattr(prepare_shared_data, "cache_fullres", lambda root, out: {})  # the arrays alone
    plain = prepare_shared_data.prepare(tmp_path / "plain", data_root)
    args = prepare_shared_data.prepare(tmp_path / "more", data_root, second_pneumonia_copy=True)
    assert args[:len(plain)] == [a.replace("/plain/", "/more/") for a in plain]
    source = open_source(args[-1])
    assert source.tag == "xray" and len(source) == 2263 and source.read(0).shape == (28, 28, 1)
