"""Class heatmaps, measured by deletion: ``python -m benchmarks.heatmaps [--model NAME]``.

A linear-probe classifier on midol-micro or ``--model``, fitted on up to 800 training images of a
labelled set; for each test image, blurring the hottest 20% of the input should lower the explained
class's probability more than blurring random 20% (as blocks of an 8 x 8 grid, as compact as
hot regions). Prints, per set and method, both drops side by side and their ratio.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torchvision.transforms.functional as TF

from midol_hub import (
    CAM_METHODS,
    ClassHeatmaps,
    MIDoLForImageClassification,
    class_heatmap,
    extract_features,
    fit_linear_probe,
    load_model,
)

from training.shared_data import BENCHMARKS, data_root

SETS = ("BloodMNIST", "PathMNIST (subset)", "ISIC nevus vs melanoma", "Kermany OCT", "PneumoniaMNIST")


def probe_classifier(name: str, train_images: int = 800, seed: int = 0, encoder_name: str = "midol-micro"):
    """(classifier, probe, encoder, test set): the encoder with a linear probe fitted on
    ``train_images`` of set ``name``."""
    modality, load = BENCHMARKS[name]
    train, test = load(data_root())
    encoder = load_model(encoder_name)
    picks = np.random.default_rng(seed).permutation(len(train))[:train_images]
    features = extract_features(encoder, [train.images[i] for i in picks], modality)
    probe = fit_linear_probe(features, train.labels[picks], cs=(0.1,))
    model = MIDoLForImageClassification.from_encoder(encoder, train.class_names, modality).load_linear_probe(probe)
    return model, probe, encoder, test


def deletion_drops(model: MIDoLForImageClassification, maps: ClassHeatmaps, fraction: float = 0.2, repeats: int = 5,
                   cells: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop when the hottest ``fraction`` is blurred, mean drop over ``repeats`` random ``fraction``s)
    of each image's explained-class probability."""
    pixels, size = maps.pixels, maps.pixels.shape[-1]
    blurred = TF.gaussian_blur(pixels, kernel_size=2 * (size // 8) + 1, sigma=size / 16)

    def drop(deleted: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(torch.where(deleted, blurred, pixels)).logits
        return maps.probability - logits.softmax(-1).gather(1, maps.target[:, None])[:, 0]

    hottest = maps.heat.flatten(1).argsort(1, descending=True)[:, : int(fraction * size * size)]
    top = torch.zeros(len(pixels), size * size, dtype=torch.bool).scatter_(1, hottest, True).view(-1, 1, size, size)
    generator, drops = torch.Generator().manual_seed(seed), []
    for _ in range(repeats):
        chosen = torch.rand(len(pixels), cells * cells, generator=generator).argsort(1)[:, : round(fraction * cells * cells)]
        grid = torch.zeros(len(pixels), cells * cells, dtype=torch.bool).scatter_(1, chosen, True).view(-1, 1, cells, cells)
        drops.append(drop(grid.repeat_interleave(size // cells, 2).repeat_interleave(size // cells, 3)))
    return drop(top), torch.stack(drops).mean(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heatmaps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="midol-micro", help="registry name, model directory or Hub id")
    args = parser.parse_args(argv)
    print(f"{'set':<24} {'method':<10} {'hot 20%':>8} {'random 20%':>11} {'ratio':>6} {'hot wins':>9}")
    for name in SETS:
        model, _, _, test = probe_classifier(name, encoder_name=args.model)
        for method in CAM_METHODS if name == "BloodMNIST" else ("gradcam",):
            hot, random = deletion_drops(model, class_heatmap(model, test.images[:200], method=method))
            print(f"{name:<24} {method:<10} {float(hot.mean()):>8.3f} {float(random.mean()):>11.3f} "
                  f"{float(hot.mean()) / float(random.mean()):>6.2f} {float((hot > random).float().mean()):>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
