"""The project's real data: where ``$MIDOL_DATA`` is, its labelled sets and every split.

The one place that knows the layout of the shared images (see their ``PROVENANCE.md``):
training (``training.prepare_shared_data``), the evaluation table (``benchmarks.evaluate``),
the benchmarks and the tests all read it through these functions. The inference package
``midol_hub`` knows nothing of it.

Splits never leak a patient, lesion or slide: MedMNIST files keep their official splits, OCT
is split by patient id, ISIC by lesion id (the same lesion at every resolution stays on one
side), the Kather 2016 tiles by source slide. The full-resolution train/test parts are written
down in ``fullres_split.json`` beside this file (``python -m training.shared_data`` rewrites
it from the rules in :func:`fullres_split`). Test parts are for reporting only, never for a
choice. The two quickstart images stay out of every split, calibration and choice.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from midol_hub import DatasetError, LabelledImages, from_npz, group_split
from midol_hub.utils import image_files

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLIT_FILE = Path(__file__).with_name("fullres_split.json")
OCT_CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
QUICKSTART_IMAGES = ("fundus/skimage_examples/retina.jpg", "pathology/skimage_examples/ihc.png")
"""Shown in the README's quickstart: kept out of training, calibration and every choice."""
PATHOLOGY_REGIONS = ("pathology/openslide_os1_he_crop", "pathology/openslide_os2_ki67_ihc_crops")
"""Large single regions (one tissue region each): training only, cut into tiles
(:func:`region_tiles`); there is therefore no independent IHC test part."""
KATHER_2016 = "pathology/kather2016_texture_tiles_examples"
TILE_MICRONS = 112  # the field of view of a 224 px CRC-VAL-HE tile at 0.5 um/px
CALIBRATION_CROPS = 0
"""Multi-scale crops of each full-resolution training file in the calibration set. Four helped
midol-micro v3 name held-out full-resolution H&E files (0.958 against 0.875) under the first
threshold rule; with the batch-4 radiographs and the coherent rule of issue 28, calibrating
without them catches more out-of-scope images (0.771 against 0.686 at the same settings;
``python -m benchmarks.ood``, calibration-settings table)."""


def data_root() -> Path:
    """``$MIDOL_DATA``, else ``shared/data`` beside the repository; a missing folder is an error."""
    root = Path(os.environ.get("MIDOL_DATA", DEFAULT_ROOT)).expanduser().resolve()
    if not (root / "PROVENANCE.md").is_file():
        raise DatasetError(f"MIDOL_DATA={root} is not the shared data folder (no PROVENANCE.md); point MIDOL_DATA at it")
    return root


def _npz(relative: str, classes: list[str]) -> Callable[[Path], tuple[LabelledImages, LabelledImages]]:
    def load(root: Path):
        return from_npz(root / relative, "train", classes), from_npz(root / relative, "test", classes)
    return load


def pathmnist_splits(root: Path) -> tuple[LabelledImages, LabelledImages]:
    """Only a 718-image slice of the PathMNIST test split is available: split it 60/40 by class."""
    names = ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal mucosa", "stroma", "tumour"]
    data = from_npz(root / "pathology/pathmnist_test_subset/pathmnist.npz", "test", names)
    train, test = group_split(data, [0.6, 0.4], seed=0)
    return train, test


def isic_splits(root: Path) -> tuple[LabelledImages, LabelledImages]:
    """Nevus vs melanoma from the two small-size UDA-1 folders (500 distinct lesions), split by lesion id."""
    images, labels, groups = [], [], []
    for folder in ("dermoscopy/isic_uda1_300x225", "dermoscopy/isic_uda1_250px"):
        for meta_path in sorted((root / folder).glob("ISIC_*.json")):
            diagnosis = json.loads(meta_path.read_text()).get("meta", {}).get("clinical", {}).get("diagnosis")
            if diagnosis in ("nevus", "melanoma"):
                images.append(str(meta_path.with_suffix(".jpg")))
                labels.append(int(diagnosis == "melanoma"))
                groups.append(meta_path.stem)
    data = LabelledImages(images, np.array(labels), ["nevus", "melanoma"], groups, "isic")
    train, test = group_split(data, [0.7, 0.3], seed=0)
    return train, test


def oct_patient(path: Path) -> tuple[str, str]:
    """(class, patient id) of a Kermany OCT file name ``CLASS-patient-slice`` (or ``test_class``)."""
    match = re.match(r"(?:test_)?([A-Za-z]+)(?:-(\d+)-\d+)?", path.stem)
    return match.group(1).upper(), match.group(2) or path.stem


def oct_splits(root: Path) -> tuple[LabelledImages, LabelledImages]:
    """Kermany OCT 4-class from all OCT folders, split by patient id."""
    images, labels, groups = [], [], []
    for path in sorted((root / "oct").rglob("*.jpeg")):
        label, patient = oct_patient(path)
        images.append(str(path))
        labels.append(OCT_CLASSES.index(label))
        groups.append(patient)
    data = LabelledImages(images, np.array(labels), OCT_CLASSES, groups, "oct")
    train, test = group_split(data, [0.7, 0.3], seed=0)
    return train, test


HANNOVER_CXR = "xray/hannover_covid19_cxr"


def hannover_splits(root: Path) -> tuple[LabelledImages, LabelledImages]:
    """AP vs PA projection of the Hannover chest radiographs (243 images of 71 patients), split by patient."""
    images, labels, groups = [], [], []
    with open(root / HANNOVER_CXR / "data.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            images.append(str(root / HANNOVER_CXR / "png" / f"{row['image_id']}.png"))
            labels.append(["ap", "pa"].index(row["projection"].lower()))
            groups.append(row["patient_id"])
    data = LabelledImages(images, np.array(labels), ["AP", "PA"], groups, "hannover")
    train, test = group_split(data, [0.7, 0.3], seed=0)
    return train, test


SOURCES = {
    "xray/pneumoniamnist": "PneumoniaMNIST",
    "xray/hannover_covid19_cxr": "Hannover COVID-19 CXR",
    "xray/nih_chestxray14": "NIH ChestX-ray14",
    "fundus/retinamnist": "RetinaMNIST",
    "fundus/idrid": "IDRiD",
    "fundus/skimage_examples": "scikit-image",
    "pathology/skimage_examples": "scikit-image",
    "pathology/bloodmnist": "BloodMNIST",
    "pathology/pathmnist": "CRC-VAL-HE-7K",  # PathMNIST's test split is CRC-VAL-HE-7K at 28 px
    "pathology/crc_val_he_7k": "CRC-VAL-HE-7K",
    "pathology/kather2016": "Kather 2016",
    "pathology/openslide_os1_he": "OpenSlide H&E",
    "pathology/openslide_os2_ki67_ihc": "OpenSlide Ki67 IHC",
    "dermoscopy/isic_uda1": "ISIC UDA-1",
    "oct/kermany_oct2017": "Kermany OCT 2017",
}
"""Folder-name prefix (below ``$MIDOL_DATA``) -> the dataset its images come from (PROVENANCE.md):
one dataset at several sizes or in several folders is one source."""


def source_of(relative: str | Path) -> str:
    """The dataset (:data:`SOURCES`) of a path or folder below ``$MIDOL_DATA``."""
    relative = str(relative)
    found = [name for prefix, name in SOURCES.items() if relative.startswith(prefix)]
    if not found:
        raise DatasetError(f"{relative} is in no known source; add its folder to training.shared_data.SOURCES")
    return found[0]


BENCHMARKS: dict[str, tuple[str, Callable[[Path], tuple[LabelledImages, LabelledImages]]]] = {
    "PneumoniaMNIST": ("xray", _npz("xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz", ["normal", "pneumonia"])),
    "RetinaMNIST": ("fundus", _npz("fundus/retinamnist/retinamnist.npz", [f"grade {i}" for i in range(5)])),
    "BloodMNIST": ("pathology", _npz("pathology/bloodmnist/bloodmnist.npz",
                                     ["basophil", "eosinophil", "erythroblast", "immature granulocyte", "lymphocyte",
                                      "monocyte", "neutrophil", "platelet"])),
    "PathMNIST (subset)": ("pathology", pathmnist_splits),
    "ISIC nevus vs melanoma": ("dermoscopy", isic_splits),
    "Kermany OCT": ("oct", oct_splits),
    "Hannover CXR AP vs PA": ("xray", hannover_splits),
}
"""Labelled sets: name -> (modality, root -> (train, test))."""
BENCHMARK_SOURCES = {"PneumoniaMNIST": "PneumoniaMNIST", "RetinaMNIST": "RetinaMNIST", "BloodMNIST": "BloodMNIST",
                     "PathMNIST (subset)": "CRC-VAL-HE-7K", "ISIC nevus vs melanoma": "ISIC UDA-1",
                     "Kermany OCT": "Kermany OCT 2017", "Hannover CXR AP vs PA": "Hannover COVID-19 CXR"}
"""The dataset (:data:`SOURCES`) each labelled set's images come from."""


TRAINING_ARRAYS = {"xray": "xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz",
                   "fundus": "fundus/retinamnist/retinamnist.npz", "pathology": "pathology/bloodmnist/bloodmnist.npz"}
"""The MedMNIST files pretraining reads as they are (their ``train`` split)."""
PNEUMONIA_SECOND_COPY = "xray/pneumoniamnist_reduced_train/pneumoniamnist.npz"
"""PROVENANCE.md's file b, a second copy of PneumoniaMNIST: the labelled set reads the first
(``TRAINING_ARRAYS["xray"]``); this one's training split also holds the pneumonia radiographs that
the first dropped when it balanced its classes."""


def pneumonia_second_copy_train(root: Path) -> np.ndarray:
    """(N, 28, 28) the second PneumoniaMNIST copy's training images that are in no split of the first
    copy and not in its own val or test split, each once (by pixels): unlabelled pretraining images
    that no probe, check or test reads."""
    def digests(images: np.ndarray) -> list[str]:
        return [hashlib.sha256(image.tobytes()).hexdigest() for image in images]

    with np.load(root / TRAINING_ARRAYS["xray"]) as first, np.load(root / PNEUMONIA_SECOND_COPY) as second:
        seen = {d for split in ("train", "val", "test") for d in digests(first[f"{split}_images"])}
        seen |= {d for split in ("val", "test") for d in digests(second[f"{split}_images"])}
        images = second["train_images"]
        kept = []
        for index, digest in enumerate(digests(images)):
            if digest not in seen:
                seen.add(digest)
                kept.append(index)
        return images[kept]


FILE_FOLDERS = ("oct", "dermoscopy/isic_uda1_250px", "pathology/crc_val_he_7k_examples")
"""515 real JPEG and TIFF files in folders, for loader benchmarks."""


def labelled_splits(root: Path, part: str) -> dict[str, list]:
    """Every labelled set's ``part`` ("train" or "test") images, pooled per modality."""
    return labelled_sources(root, part)[0]


def labelled_sources(root: Path, part: str) -> tuple[dict[str, list], dict[str, list[str]]]:
    """:func:`labelled_splits` and, for each image, the dataset it comes from (:data:`BENCHMARK_SOURCES`)."""
    index = {"train": 0, "test": 1}[part]
    images: dict[str, list] = {}
    sources: dict[str, list[str]] = {}
    for name, (modality, load) in BENCHMARKS.items():
        loaded = load(root)[index].images
        images.setdefault(modality, []).extend(loaded)
        sources.setdefault(modality, []).extend([BENCHMARK_SOURCES[name]] * len(loaded))
    return images, sources


@dataclass
class CalibrationSet:
    """What midol-micro is calibrated on: ``images`` {modality: images} and, for each image, the
    ``groups`` {modality: ids} that held-out scoring keeps together (patient, lesion, slide or
    source file; see :func:`midol_hub.calibrate`), ``kinds`` {modality: "labelled" | "file" |
    "crop" | "tile"}: a labelled set's image, a whole full-resolution file, a crop of one, a tile
    of a large region, and ``sources`` {modality: dataset} (:data:`SOURCES`)."""

    images: dict[str, list]
    groups: dict[str, list[str]]
    kinds: dict[str, list[str]]
    sources: dict[str, list[str]]


def calibration_set(root: Path, per_modality: int = 500, crops: int = CALIBRATION_CROPS, seed: int = 0) -> CalibrationSet:
    """Training sides only: up to ``per_modality`` labelled training images per modality (a seeded
    sample), every full-resolution training file whole, ``crops`` multi-scale crops of each
    (users feed whole files, tiles and crops of them alike), and the large pathology regions
    cut into the tiles pretraining saw (:func:`region_tiles`) instead of whole."""
    rng, crop_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])  # the picks do not depend on crops
    full = fullres_parts(root, "train")
    regions = {str(root / folder) for folder in PATHOLOGY_REGIONS}
    images: dict[str, list] = {}
    groups: dict[str, list[str]] = {}
    kinds: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = {}
    labelled, labelled_from = labelled_sources(root, "train")
    for modality, items in labelled.items():
        chosen = sorted(rng.permutation(len(items))[:per_modality])
        picks = [items[i] for i in chosen]
        paths = {item for item in picks if isinstance(item, str)}  # OCT's labelled split is its full-resolution files
        files = [p for p in full.get(modality, []) if p not in paths and str(Path(p).parent) not in regions]
        images[modality] = picks + files
        sources[modality] = [labelled_from[modality][i] for i in chosen]
        sources[modality] += [source_of(Path(p).relative_to(root)) for p in files]
        groups[modality] = [group_of(root, item) if isinstance(item, str) else f"array {i}" for i, item in enumerate(picks)]
        groups[modality] += [group_of(root, p) for p in files]
        whole_files = set(full.get(modality, []))  # OCT's labelled images are its full-resolution files
        kinds[modality] = ["file" if isinstance(item, str) and item in whole_files else "labelled" for item in picks]
        kinds[modality] += ["file"] * len(files)
        for path in full.get(modality, []):
            if str(Path(path).parent) in regions:
                views, kind = region_tiles(Path(path)), "tile"
            elif not crops:
                continue
            else:
                with Image.open(path) as opened:
                    views, kind = random_crops(opened.convert("RGB"), crops, crop_rng), "crop"
            images[modality] += views
            groups[modality] += [group_of(root, path)] * len(views)
            kinds[modality] += [kind] * len(views)
            sources[modality] += [source_of(Path(path).relative_to(root))] * len(views)
    return CalibrationSet(images, groups, kinds, sources)


def random_crops(image: Image.Image, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """``count`` crops of 15-80% of the area (aspect 3:4 to 4:3), each scaled to at most 512 px."""
    crops = []
    for _ in range(count):
        area = rng.uniform(0.15, 0.8) * image.width * image.height
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        width, height = int(min(image.width, np.sqrt(area * aspect))), int(min(image.height, np.sqrt(area / aspect)))
        left, top = rng.integers(0, image.width - width + 1), rng.integers(0, image.height - height + 1)
        crop = image.crop((left, top, left + width, top + height))
        scale = 512 / max(crop.size)
        if scale < 1:
            crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.LANCZOS)
        crops.append(crop)
    return crops


def group_of(root: Path, path: str | Path) -> str:
    """What a file must stay together with: its patient (OCT, the Hannover radiographs), source slide (Kather 2016), tissue
    region (the OpenSlide crops: both Ki67 files show one region), else the file name's stem (an
    ISIC lesion id, shared by its copies at every size)."""
    path = Path(path)
    relative = path.relative_to(root)
    if relative.parts[0] == "oct":
        return f"oct patient {oct_patient(path)[1]}"
    if str(relative.parent) in PATHOLOGY_REGIONS:
        return f"region {relative.parent}"
    if relative.is_relative_to(KATHER_2016):
        return f"slide {kather_slides(root)[str(relative.relative_to(KATHER_2016))]}"
    if relative.is_relative_to(HANNOVER_CXR):
        return f"cxr patient {hannover_patients(root)[path.stem]}"
    return path.stem


@functools.cache
def hannover_patients(root: Path) -> dict[str, str]:
    """Hannover radiograph image id -> its patient id (from the folder's data.csv)."""
    with open(root / HANNOVER_CXR / "data.csv", newline="") as handle:
        return {row["image_id"]: row["patient_id"] for row in csv.DictReader(handle)}


@functools.cache
def kather_slides(root: Path) -> dict[str, str]:
    """Kather 2016 tile (path below its folder) -> its source slide (from the folder's labels.csv)."""
    with open(root / KATHER_2016 / "labels.csv", newline="") as handle:
        return {row["file"]: row["source_slide"] for row in csv.DictReader(handle)}


def region_tiles(path: Path) -> list[Image.Image]:
    """Tiles of ``TILE_MICRONS`` (non-overlapping) and of twice that (stride half) from one large
    pathology region, at the micrometres per pixel its folder's labels.csv records."""
    with open(path.parent / "labels.csv", newline="") as handle:
        microns_per_pixel = {row["file"]: float(row["um_per_px"]) for row in csv.DictReader(handle)}[path.name]
    with Image.open(path) as opened:
        region = opened.convert("RGB")
    tiles = []
    for microns in (TILE_MICRONS, 2 * TILE_MICRONS):
        side = round(microns / microns_per_pixel)
        stride = side if microns == TILE_MICRONS else side // 2
        for top in range(0, region.height - side + 1, stride):
            for left in range(0, region.width - side + 1, stride):
                tiles.append(region.crop((left, top, left + side, top + side)))
    return tiles


def _relative(root: Path, paths) -> list[str]:
    return sorted(str(Path(p).relative_to(root)) for p in paths)


def fullres_split(root: Path) -> dict[str, dict[str, list[str]]]:
    """The rules behind ``fullres_split.json``: {"train"|"test": {modality: [relative paths]}}, each
    source split by its groups (patient, lesion, slide), so a group never spans train and test."""
    split: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}

    def put(modality: str, train: list[str], test: list[str]) -> None:
        split["train"][modality], split["test"][modality] = sorted(train), sorted(test)

    def by_group(paths: list[Path], group: Callable[[Path], str], fraction: float, seed: int) -> tuple[list, list]:
        files = [str(p) for p in paths]
        data = LabelledImages(files, np.zeros(len(files), dtype=int), ["any"], [group(p) for p in paths], "fullres")
        train, test = group_split(data, [fraction, 1 - fraction], seed=seed)
        return _relative(root, train.images), _relative(root, test.images)

    # chest X-ray: the two NIH files one each side; the Hannover radiographs on their probe's sides (by patient)
    xray = _relative(root, image_files(root / "xray/nih_chestxray14_examples"))
    cxr_train, cxr_test = hannover_splits(root)
    put("xray", xray[:1] + _relative(root, cxr_train.images), xray[1:] + _relative(root, cxr_test.images))
    # fundus: IDRiD has no patient ids in its names; split by file
    put("fundus", *by_group(image_files(root / "fundus/idrid_segmentation_train_cropped"), lambda p: p.stem, 0.7, 0))
    # OCT: the labelled split's own sides (by patient)
    oct_train, oct_test = oct_splits(root)
    put("oct", _relative(root, oct_train.images), _relative(root, oct_test.images))
    # dermoscopy: each full-resolution lesion on the side its small copy has in isic_splits
    isic_train, isic_test = isic_splits(root)
    side = {Path(p).stem: "train" for p in isic_train.images} | {Path(p).stem: "test" for p in isic_test.images}
    derm = image_files(root / "dermoscopy/isic_uda1_fullres") + image_files(root / "dermoscopy/isic_uda1_fullres_b")
    unsided = [p for p in derm if p.stem not in side]  # lesions with another diagnosis: split by lesion
    extra_train, extra_test = by_group(unsided, lambda p: p.stem, 0.7, 0) if unsided else ([], [])
    put("dermoscopy", _relative(root, [p for p in derm if side.get(p.stem) == "train"]) + extra_train,
        _relative(root, [p for p in derm if side.get(p.stem) == "test"]) + extra_test)
    # pathology: Kather 2016 tiles by source slide, CRC-VAL-HE tiles by tile (two are stored twice), regions train only
    kather = by_group(image_files(root / KATHER_2016), lambda p: group_of(root, p), 0.6, 0)
    crc = by_group(image_files(root / "pathology/crc_val_he_7k_examples"), lambda p: p.stem, 0.6, 0)
    regions = [f for folder in PATHOLOGY_REGIONS for f in _relative(root, image_files(root / folder))]
    put("pathology", kather[0] + crc[0] + regions, kather[1] + crc[1])
    return split


def fullres_parts(root: Path, part: str) -> dict[str, list[str]]:
    """The written-down full-resolution ``part`` ("train" or "test"): {modality: absolute paths}."""
    written = json.loads(SPLIT_FILE.read_text())
    return {modality: [str(root / p) for p in paths] for modality, paths in written[part].items()}


def _package_files(package: str, relative: str, names: list[str] | None = None) -> list[Path]:
    module = __import__(package)
    folder = Path(module.__file__).parent / relative
    return [folder / n for n in names] if names else image_files(folder)


SKIMAGE_OUT_OF_SCOPE = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png",
                        "coins.png", "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg",
                        "logo.png", "moon.png", "motorcycle_left.png", "page.png", "phantom.png", "rocket.jpg",
                        "text.png", "chessboard_GRAY.png"]
"""scikit-image's bundled photographs, textures, documents and a CT phantom (not cell.png: microscopy)."""
PYDICOM_OUT_OF_SCOPE = ["693_J2KI.dcm", "CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "ExplVR_BigEnd.dcm",
                        "examples_jpeg2k.dcm", "examples_palette.dcm", "examples_rgb_color.dcm", "JPEG2000.dcm",
                        "JPGExtended.dcm", "image_dfl.dcm", "liver_1frame.dcm"]
"""pydicom's single-frame test images with real pixel data: CT, MR, ultrasound, nuclear-medicine bone scans, a
segmentation and a secondary capture."""


PHOTOGRAPHS_OUT_OF_SCOPE = {("sklearn", "datasets/images"): ["china.jpg", "flower.jpg"],
                            ("matplotlib", "mpl-data/sample_data"): ["grace_hopper.jpg"]}
"""More natural photographs, a person among them: scikit-learn's sample images (Flickr, CC BY 2.0:
china.jpg by danielbuechele, flower.jpg by vultilion) and matplotlib's portrait of Grace Hopper
(U.S. Navy photograph, public domain)."""


def out_of_scope_set(root: Path) -> list[str]:
    """Real images that are none of the five modalities, deduplicated by content: ``$MIDOL_DATA/other``,
    scikit-image's, scikit-learn's and matplotlib's photographs and pydicom's CT / MR / US / NM test
    files (installed with the ``examples``, ``eval``, ``plot`` and ``dicom`` extras)."""
    photographs = [path for (package, folder), names in PHOTOGRAPHS_OUT_OF_SCOPE.items()
                   for path in _package_files(package, folder, names)]
    candidates = (image_files(root / "other") + _package_files("skimage", "data", SKIMAGE_OUT_OF_SCOPE) + photographs
                  + _package_files("pydicom", "data/test_files", PYDICOM_OUT_OF_SCOPE))
    seen, kept = set(), []
    for path in candidates:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            kept.append(str(path))
    return kept


def main() -> int:
    SPLIT_FILE.write_text(json.dumps(fullres_split(data_root()), indent=1) + "\n")
    print(f"wrote {SPLIT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
