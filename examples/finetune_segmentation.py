"""Train an M-IDoL segmentation model (Swin feature pyramid + FPN decoder) on image/mask folders.

    python examples/finetune_segmentation.py --model DIR_OR_NAME --images imgs/ --masks masks/ \\
        --modality dermoscopy --epochs 50 --output-dir runs/seg

Masks are PNG files with the images' names (any extension for the image), holding class
indices 0..C-1 (0 = background); binary 0/255 masks are read as 0/1. Images and masks are
resized whole to the model's input size (nearest-neighbour for masks). The best epoch by
validation Dice is saved to OUTPUT_DIR/model with OUTPUT_DIR/metrics.json (Dice, IoU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from midol_hub import (
    ImageReadError,
    MIDoLForSemanticSegmentation,
    ModalityTransform,
    ModelNotFoundError,
    WeightsNotAvailableError,
    load_model,
    run_command,
    segmentation_scores,
)

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registry name, model directory or Hub id")
    parser.add_argument("--images", required=True, help="folder of images")
    parser.add_argument("--masks", required=True, help="folder of PNG masks named like the images")
    parser.add_argument("--modality", required=True)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--val-fraction", type=float, default=0.2, help="0 evaluates on the training images (overfit check)")
    parser.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-weights", action="store_true", help="the architecture with random weights (no trained weights needed)")
    return parser.parse_args(argv)


def read_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    if not images.is_dir() or not masks.is_dir():
        raise ValueError(f"--images {images} and --masks {masks} must both be folders")
    pairs = []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in SUFFIXES):
        mask = masks / f"{image.stem}.png"
        if not mask.is_file():
            raise ValueError(f"{image.name} has no mask {mask}")
        pairs.append((image, mask))
    if not pairs:
        raise ValueError(f"{images} holds no images")
    return pairs


def read_mask(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as mask:
        array = np.asarray(mask.convert("L").resize((size, size), Image.NEAREST))
    return torch.from_numpy(np.where(array == 255, 1, array).astype(np.int64))


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    encoder = load_model(args.model, pretrained=not args.random_weights)
    size = encoder.config.img_size
    profile = dataclasses.replace(encoder.config.profile(args.modality), resize="whole", crop_border=False)
    transform = ModalityTransform(profile)
    pairs = read_pairs(Path(args.images), Path(args.masks))
    pixels = torch.stack([transform(str(image)) for image, _ in pairs])
    masks = torch.stack([read_mask(mask, size) for _, mask in pairs])
    num_classes = int(masks.max()) + 1
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed))
    n_val = int(round(args.val_fraction * len(pairs)))
    train_idx, val_idx = (order, order) if n_val == 0 else (order[n_val:], order[:n_val])
    names = ["background"] + [f"class_{c}" for c in range(1, num_classes)]
    model = MIDoLForSemanticSegmentation.from_encoder(encoder, names, args.modality)
    if args.freeze_encoder:
        model.midol.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=1e-4)
    output_dir = Path(args.output_dir)
    best = {"dice": -1.0}
    for epoch in tqdm(range(args.epochs), desc="segmentation", unit="epoch"):
        model.train()
        shuffled = train_idx[torch.randperm(len(train_idx))]
        for start in range(0, len(shuffled), args.batch_size):
            batch = shuffled[start : start + args.batch_size]
            loss = model(pixels[batch], labels=masks[batch]).loss  # cross-entropy + Dice
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode():
            prediction = torch.cat([model(pixels[val_idx[i : i + 16]]).logits.argmax(1) for i in range(0, len(val_idx), 16)])
        scores = segmentation_scores(prediction, masks[val_idx], num_classes)
        if scores["dice"] > best["dice"]:
            best = {"epoch": epoch, "dice": scores["dice"], "iou": scores["iou"]}
            model.save_pretrained(output_dir / "model")
    metrics = {"images": len(pairs), "train": len(train_idx), "val": len(val_idx), "num_classes": num_classes, "best": best}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        best = run(args)["best"]
        print(f"best validation Dice {best['dice']:.3f}, IoU {best['iou']:.3f} (epoch {best['epoch']}); "
              f"saved to {args.output_dir}")

    return run_command("finetune_segmentation", body, (ImageReadError, ModelNotFoundError, WeightsNotAvailableError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
