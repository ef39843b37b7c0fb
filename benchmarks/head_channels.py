"""How much of a CNN's pooled feature is alive: ``python -m benchmarks.head_channels --model NAME [--init imagenet]``.

Per labelled set, over evenly spaced training images: the share of the pooled channels that
never fire (0 on every image: the head's ReLU6 below zero; docs/midol-lite-runs.md, "Dead head
channels") and the effective rank of the pooled feature (the exponential of the entropy of its
centred covariance spectrum; k equally strong independent directions give k). The model's ImageNet start (where
its backbone has installable ImageNet weights) is measured beside it, as the baseline.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from midol_hub import DatasetError, ModelNotFoundError, WeightsNotAvailableError, extract_features
from midol_hub.utils import run_command
from training.imagenet import IMAGENET_WEIGHTS, ImageNetWeightsError
from training.shared_data import BENCHMARKS, data_root

from .evaluate import INITS, model_at

SETS = ("BloodMNIST", "PathMNIST (subset)", "PneumoniaMNIST", "ISIC nevus vs melanoma")
"""The sets of the README's table."""


def silent_share(pooled: torch.Tensor) -> float:
    """The share of ``pooled``'s channels (columns) that are 0 on every image (row)."""
    return float((pooled.abs().amax(0) == 0).float().mean())


def effective_rank(pooled: torch.Tensor) -> float:
    """exp(entropy) of the normalised eigenvalues of ``pooled``'s covariance over its rows."""
    variances = torch.linalg.svdvals((pooled - pooled.mean(0)).double()) ** 2
    shares = variances[variances > 0] / variances.sum()
    return float(torch.exp(-(shares * shares.log()).sum()))


def measure(model, names: tuple[str, ...] = SETS, images: int = 120) -> dict[str, dict[str, float]]:
    """``{set: {"silent": share, "effective rank": rank}}`` over ``images`` evenly spaced training images of each set."""
    root, found = data_root(), {}
    for name in names:
        if name not in BENCHMARKS:
            raise DatasetError(f"no labelled set {name!r}; choose from: {', '.join(BENCHMARKS)}")
        modality, splits = BENCHMARKS[name]
        train = splits(root)[0]
        picks = np.linspace(0, len(train) - 1, min(images, len(train))).astype(int)
        pooled = extract_features(model, [train.images[i] for i in picks], modality, "pooled").float()
        found[name] = {"silent": silent_share(pooled), "effective rank": effective_rank(pooled)}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.head_channels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registry name, model directory or Hub id")
    parser.add_argument("--init", choices=INITS, default="trained", help="as in benchmarks.evaluate; the ImageNet start is printed beside trained and random")
    parser.add_argument("--datasets", nargs="+", default=list(SETS), help=f"subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--images", type=int, default=120, help="training images per set")
    args = parser.parse_args(argv)

    def body() -> None:
        model = model_at(args.model, args.init)
        columns = {f"{args.model} ({args.init})": measure(model, tuple(args.datasets), args.images)}
        if args.init != "imagenet" and model.config.backbone in IMAGENET_WEIGHTS:
            columns["ImageNet start"] = measure(model_at(args.model, "imagenet"), tuple(args.datasets), args.images)
        print("| set | " + " | ".join(f"{name}: channels that never fire / effective rank of pooled" for name in columns)
              + " |\n|---|" + "---|" * len(columns))
        for name in columns[next(iter(columns))]:
            cells = [f"{found[name]['silent']:.3f} / {found[name]['effective rank']:.0f}" for found in columns.values()]
            print(f"| {name} | " + " | ".join(cells) + " |")

    return run_command("benchmarks.head_channels", body, (DatasetError, ModelNotFoundError, WeightsNotAvailableError,
                                                           ImageNetWeightsError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
