"""Embed real medical images with M-IDoL and show the router's view of each.

    python examples/quickstart.py                 # scikit-image's bundled fundus and IHC photos
    python examples/quickstart.py IMG [IMG ...]   # your own files
    python examples/quickstart.py --model DIR_OR_HUB_ID --modality oct IMG ...

The default model (``midol_hub.DEFAULT_MODEL``: ``midol-micro``) is trained here on the training splits of the shared
medical images and shipped inside the package (no download). With ``--modality auto`` it
names each image's modality (or ``unknown``) with the probability that this answer is right.
"""

from __future__ import annotations

import argparse
import warnings

from midol_hub import DEFAULT_MODEL, WeightsNotAvailableError, load_model


def bundled_images() -> tuple[list, list[str]]:
    """Real photographs that ship with scikit-image (the `examples` extra)."""
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("no images given and scikit-image is missing: pip install 'midol-hub[examples]'") from None
    return [data.retina(), data.immunohistochemistry()], ["skimage retina.jpg (fundus)", "skimage ihc.png (pathology)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, TIFF, BMP, GIF, DICOM)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name, directory or Hub id")
    parser.add_argument("--modality", default="auto", help="auto, xray, fundus, oct, dermoscopy or pathology")
    args = parser.parse_args()

    try:
        model = load_model(args.model)
    except WeightsNotAvailableError:  # a registry architecture without published weights (midol-swin-base, ...)
        print(f"NOTICE: {args.model} has no published weights yet; using random weights (numbers are meaningless).")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model(args.model, pretrained=False)

    images, names = (args.images, args.images) if args.images else bundled_images()
    encoding = model.encode(images, modality=args.modality)
    feature = model.config.default_feature  # the vector the model serves best ("pooled" or "embedding")
    for name, modality, confidence, row in zip(names, encoding.modality, encoding.confidence, getattr(encoding, feature)):
        print(f"{name}: modality={modality} confidence={confidence:.2f} {feature} shape={tuple(row.shape)}")


if __name__ == "__main__":
    main()
