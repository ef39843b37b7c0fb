"""Write the training splits of the shared medical images: ``python -m training.prepare_shared_data OUT_DIR``.

Uses exactly the splits of ``midol_hub.evaluate`` (OCT by patient id, ISIC by lesion id,
the PathMNIST subset 60/40), so pretraining never sees an evaluation test image. Prints the
``--data`` arguments for ``training.pretrain``; the MedMNIST files are used as they are
(their ``train`` split).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from midol_hub.evaluate import isic_splits, oct_splits, pathmnist_splits, data_root


def prepare(out_dir: Path, root: Path | None = None) -> list[str]:
    """Write the split files into ``out_dir``; return the ``TAG=PATH`` data arguments."""
    root = (root or data_root()).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    oct_train, _ = oct_splits(root)
    isic_train, _ = isic_splits(root)
    path_train, _ = pathmnist_splits(root)
    (out_dir / "oct_train.txt").write_text("\n".join(oct_train.images) + "\n")
    (out_dir / "isic_train.txt").write_text("\n".join(isic_train.images) + "\n")
    np.savez(out_dir / "pathmnist_train.npz", train_images=np.stack(path_train.images), train_labels=path_train.labels)
    return [
        f"xray={root / 'xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz'}",
        f"fundus={root / 'fundus/retinamnist/retinamnist.npz'}",
        f"oct={out_dir / 'oct_train.txt'}",
        f"dermoscopy={out_dir / 'isic_train.txt'}",
        f"pathology={out_dir / 'pathmnist_train.npz'}",
        f"pathology={root / 'pathology/bloodmnist/bloodmnist.npz'}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.prepare_shared_data", description=__doc__)
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    print(" ".join(prepare(Path(args.out_dir))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
