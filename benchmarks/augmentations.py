"""How much of a labelled set's class information each pretraining augmentation leaves:
``python -m benchmarks.augmentations --model midol-lite --init imagenet --dataset BloodMNIST``.

Self-distillation teaches a network to give an image and its augmented views one feature, so an
augmentation that erases what tells a set's classes apart teaches the feature to forget it. Each
augmentation of ``training.augment`` is applied at full strength to every image of the set, and a
linear probe (``midol_hub.linear_probe``) on a model's frozen feature measures:

- ``moved``: the probe fit on the original training images, tested on augmented test images
  (how far the augmentation carries features across the classes' boundaries);
- ``left``: a probe fit and tested on augmented images (the class information it leaves).

Run it on the start of a pretraining run (``--init imagenet``) before choosing its augmentations.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import numpy as np
import torch
from torchvision.transforms import v2

from midol_hub import DatasetError, ModelNotFoundError, classification_metrics, linear_probe
from midol_hub.image_io import read_any, unit_pixels
from midol_hub.utils import run_command

from training.augment import StainJitter, colour_jitter
from training.imagenet import ImageNetWeightsError
from training.shared_data import BENCHMARKS, data_root

from .evaluate import INITS, capped, features_of, model_at

AUGMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "stain jitter (HED-light, no re-staining)": StainJitter(restain_p=0.0),
    "IHC re-staining": StainJitter(restain_p=1.0),
    "colour jitter (DINO's)": colour_jitter(),
    "grayscale": v2.Grayscale(num_output_channels=3),
    "solarize": v2.RandomSolarize(0.5, p=1.0),
}
"""Name -> transform of a (3, H, W) image in [0, 1], each at full strength (always applied)."""


def augmented(images: list, augmentation: Callable[[torch.Tensor], torch.Tensor],
              input_size: int | None = None) -> list[np.ndarray]:
    """``images`` (anything ``encode`` reads; JPEG files decoded for ``input_size``) as (H, W, 3)
    float arrays in [0, 1], augmented."""
    out = []
    for index, image in enumerate(images):
        pixels = unit_pixels(read_any(image, index, warn=None, input_size=input_size).pixels)
        colour = torch.from_numpy(pixels[:, :, :3] if pixels.shape[-1] >= 3 else pixels[:, :, :1].repeat(3, axis=-1))
        out.append(augmentation(colour.permute(2, 0, 1).contiguous()).clamp(0, 1).permute(1, 2, 0).numpy())
    return out


def information_left(model, dataset: str, names: list[str] | None = None, feature: str = "pooled",
                     max_train: int = 1000, max_test: int = 400, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{augmentation: {"moved": accuracy, "left": accuracy}}`` on ``dataset``'s test split, with
    ``"none"`` (no augmentation: both are the plain probe's accuracy) first."""
    if dataset not in BENCHMARKS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose from {', '.join(BENCHMARKS)}")
    unknown = sorted(set(names or ()) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {', '.join(map(repr, unknown))}; choose from {', '.join(AUGMENTATIONS)}")
    modality, load = BENCHMARKS[dataset]
    train, test = (capped(split, cap, seed) for split, cap in zip(load(data_root()), (max_train, max_test)))

    def accuracy(train_x: torch.Tensor, test_x: torch.Tensor) -> float:
        scores = linear_probe(train_x, train.labels, test_x)
        return float(classification_metrics(test.labels, scores, train.class_names)["accuracy"])

    size = model.config.img_size
    plain_train = features_of(model, train.images, modality, feature)
    plain = accuracy(plain_train, features_of(model, test.images, modality, feature))
    results = {"none": {"moved": plain, "left": plain}}
    for name in names or list(AUGMENTATIONS):
        torch.manual_seed(seed)
        train_x = features_of(model, augmented(train.images, AUGMENTATIONS[name], size), modality, feature)
        test_x = features_of(model, augmented(test.images, AUGMENTATIONS[name], size), modality, feature)
        results[name] = {"moved": accuracy(plain_train, test_x), "left": accuracy(train_x, test_x)}
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per augmentation, the probe's test accuracy both ways."""
    lines = ["| augmentation (always applied) | probe fit on originals, tested augmented (`moved`) | "
             "probe fit and tested augmented (`left`) |", "|---|---|---|"]
    lines += [f"| {name} | {row['moved']:.3f} | {row['left']:.3f} |" for name, row in results.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.augmentations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registry name, model directory or Hub id")
    parser.add_argument("--init", choices=INITS, default="trained",
                        help="trained, or a baseline: random (seeded) or imagenet (the backbone's installed ImageNet weights)")
    parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--augmentations", nargs="+", default=None, help=f"subset of: {', '.join(AUGMENTATIONS)}")
    parser.add_argument("--feature", choices=("embedding", "pooled"), default="pooled")
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-test", type=int, default=400)
    args = parser.parse_args(argv)

    def body() -> None:
        model = model_at(args.model, args.init)
        print(table(information_left(model, args.dataset, args.augmentations, args.feature, args.max_train,
                                     args.max_test)))

    return run_command("benchmarks.augmentations", body, (DatasetError, ModelNotFoundError, ImageNetWeightsError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
