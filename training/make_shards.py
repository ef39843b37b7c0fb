"""Write pretraining data as WebDataset shards: ``python -m training.make_shards OUT_DIR --data TAG=PATH ...``.

Reads what pretraining reads (folders, .npz files, .txt image lists, DICOM) and writes
``OUT_DIR/shard-000000.tar``, ... (each sample a lossless image and a JSON of its source, tag
and original path) and ``OUT_DIR/index.json`` (shards, samples per shard and per tag, the
inputs that could not be read). Train on them with ``--data OUT_DIR``.
"""

from __future__ import annotations

import argparse
import sys

from midol_hub.errors import DatasetError
from midol_hub.utils import run_command

from .data import FRAME_MODES, open_source
from .shards import write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.make_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="an empty (or new) folder for the shards and index.json")
    parser.add_argument("--data", nargs="+", required=True, help="folders, .npz files or .txt lists; TAG=PATH tags a root")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--split", default="train", help="which split of .npz files to write")
    parser.add_argument("--frames", choices=FRAME_MODES, default="error",
                        help="multi-frame files (DICOM, TIFF, GIF): error, or all (one sample per frame)")
    args = parser.parse_args(argv)

    def body() -> None:
        summary = write_shards(args.out_dir, [open_source(spec, args.split, args.frames) for spec in args.data],
                               args.shard_size)
        print(f"wrote {summary.samples} samples in {summary.shards} shards to {summary.directory}; "
              f"{len(summary.unreadable)} unreadable input(s)")
        for name in summary.unreadable:
            print(f"  unreadable: {name}", file=sys.stderr)

    return run_command("training.make_shards", body, (DatasetError,))


if __name__ == "__main__":
    sys.exit(main())
