"""Write the training data of the shared medical images: ``python -m training.prepare_shared_data OUT_DIR``.

Uses exactly the training sides of ``training.shared_data`` (the labelled sets' splits and the
written-down full-resolution split), so pretraining never sees a test image, nor the two
quickstart images. Prints the ``--data`` arguments for ``training.pretrain``.

- The MedMNIST files are used as they are (their ``train`` split).
- Full-resolution files are resized once (shortest side ``CACHE_SIDE``) into ``OUT_DIR/fullres``,
  so decoding a 3,400 px fundus photograph does not slow every step; multi-scale crops are then
  cut from that copy. The large pathology regions are first cut into tiles
  (``training.shared_data.region_tiles``: 112 um and twice that, overlapping by half).
- With ``--second-pneumonia-copy``, also the radiographs that only the second PneumoniaMNIST copy
  holds (``training.shared_data.pneumonia_second_copy_train``; unlabelled, in no probe's split).
- Each modality's full-resolution list repeats its files so that they make up about
  ``FULLRES_SHARE`` of that modality's draws (at most ``MAX_REPEATS`` copies): a few dozen real
  images are otherwise lost among thousands of 28 px ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .shared_data import (
    PATHOLOGY_REGIONS,
    TRAINING_ARRAYS,
    data_root,
    fullres_parts,
    isic_splits,
    pathmnist_splits,
    pneumonia_second_copy_train,
    region_tiles,
)

CACHE_SIDE = 256
FULLRES_SHARE = 1 / 3
MAX_REPEATS = 40


def _cached(image: Image.Image, out: Path) -> str:
    scale = CACHE_SIDE / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return str(out)


def cache_fullres(root: Path, out_dir: Path) -> dict[str, list[str]]:
    """The full-resolution training side, resized (and regions tiled) into ``out_dir``: {modality: paths}."""
    cached: dict[str, list[str]] = {}
    regions = {str(root / folder) for folder in PATHOLOGY_REGIONS}
    for modality, paths in fullres_parts(root, "train").items():
        files = cached.setdefault(modality, [])
        for path in map(Path, paths):
            target = out_dir / modality / path.relative_to(root).with_suffix(".png")
            if str(path.parent) in regions:
                files += [_cached(tile, target.with_name(f"{target.stem}-tile{i:03d}.png"))
                          for i, tile in enumerate(region_tiles(path))]
            elif str(target) not in files:  # a tile stored twice (as .tif and .jpg) is listed once
                files.append(_cached(Image.open(path), target))
    return cached


def repeats(small: int, fullres: int) -> int:
    """Copies of each full-resolution file so they make up about ``FULLRES_SHARE`` of their modality."""
    if small == 0 or fullres == 0:
        return 1
    return int(np.clip(round(FULLRES_SHARE * small / ((1 - FULLRES_SHARE) * fullres)), 1, MAX_REPEATS))


def prepare(out_dir: Path, root: Path | None = None, second_pneumonia_copy: bool = False) -> list[str]:
    """Write the training files into ``out_dir``; return the ``TAG=PATH`` data arguments (with
    ``second_pneumonia_copy``, also the radiographs only the second PneumoniaMNIST copy holds)."""
    root = root or data_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    isic_train, _ = isic_splits(root)
    path_train, _ = pathmnist_splits(root)
    (out_dir / "isic_train.txt").write_text("\n".join(isic_train.images) + "\n")
    np.savez(out_dir / "pathmnist_train.npz", train_images=np.stack(path_train.images), train_labels=path_train.labels)
    small = {modality: len(np.load(root / relative, mmap_mode="r")["train_images"]) for modality, relative in TRAINING_ARRAYS.items()}
    small["pathology"] += len(path_train)
    small["dermoscopy"] = len(isic_train)
    args = [f"{modality}={root / relative}" for modality, relative in TRAINING_ARRAYS.items()]
    args += [f"pathology={out_dir / 'pathmnist_train.npz'}", f"dermoscopy={out_dir / 'isic_train.txt'}"]
    if second_pneumonia_copy:
        extra = pneumonia_second_copy_train(root)
        np.savez(out_dir / "pneumoniamnist_second_copy_train.npz", train_images=extra)
        small["xray"] += len(extra)
        args.append(f"xray={out_dir / 'pneumoniamnist_second_copy_train.npz'}")
    for modality, files in cache_fullres(root, out_dir / "fullres").items():
        copies = repeats(small.get(modality, 0), len(files))
        listing = out_dir / f"{modality}_fullres.txt"
        listing.write_text("".join(f"{f}\n" for f in files) * copies)
        args.append(f"{modality}={listing}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.prepare_shared_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--second-pneumonia-copy", action="store_true",
                        help="also the radiographs that only the second PneumoniaMNIST copy holds (unlabelled)")
    args = parser.parse_args(argv)
    print(" ".join(prepare(Path(args.out_dir), second_pneumonia_copy=args.second_pneumonia_copy)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
