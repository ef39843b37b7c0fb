"""The ``midol`` command line: encode, info, list, convert, push, cache, explain, export, index, search and plot.

Every subcommand exits 0 on success and 1 with a one-line ``midol: error: ...`` otherwise
(2 for usage errors); ``--debug`` shows the traceback. Output files are written to a
temporary file and renamed, so a failed run never leaves a partial file behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .allocator import keep_freed_memory
from .configuration_midol import VECTOR_OUTPUTS
from .dtypes import parse_dtype, supported_precisions
from .errors import DICOMwebError
from .modalities import AUTO, MODALITIES, UNKNOWN
from .registry import DEFAULT_MODEL
from .utils import (
    READABLE_SUFFIXES,
    atomic_write,
    from_rank_zero,
    image_files,
    join_torchrun,
    leave_torchrun,
    lock_for_ranks,
    run_command,
)

ENCODE_FORMATS = (".npy", ".npz", ".safetensors")
ENCODE_OUTPUTS = ("embedding", "pooled", "routing")


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    keep_freed_memory()  # encoding and training many batches: see midol_hub.allocator
    # every failure becomes one line unless --debug
    return run_command("midol", lambda: args.handler(args), (Exception,), debug=args.debug)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="midol", description="M-IDoL medical image encoders: embed, inspect, convert, publish.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    encode = commands.add_parser("encode", help="embed image files or folders into an array file")
    encode.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    encode.add_argument("--model", default=DEFAULT_MODEL, help="registry name, model directory or Hub id")
    encode.add_argument("--modality", default=AUTO, help=f"{AUTO} or one of {', '.join(MODALITIES)} (aliases work)")
    encode.add_argument("--out", required=True, help="output file: .npy (one vector output), .npz or .safetensors")
    encode.add_argument("--batch-size", type=_positive, default=32)
    encode.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="compute precision; auto: bf16 where this device computes it natively, else fp32")
    encode.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    encode.add_argument("--output", default=None, help=f"comma-separated, from {','.join(ENCODE_OUTPUTS)} "
                                                        "(default: the model's default feature)")
    encode.add_argument("--errors", choices=("raise", "skip"), default="raise",
                        help="raise: stop at the first unreadable file; skip: leave unreadable files out and list them")
    encode.add_argument("--skip-errors", action="store_true", help=argparse.SUPPRESS)  # old spelling of --errors skip
    encode.add_argument("--frames", type=_frames, default=None, metavar="all|middle|INDEX",
                        help="multi-frame DICOM, multi-page TIFF and animated images: one row per frame (all), the "
                             "middle frame, or frame INDEX; without it such files are an error")
    encode.add_argument("--random-weights", action="store_true", help="the architecture with random weights (no trained weights needed)")
    encode.add_argument("--workers", type=_non_negative, default=None, help="DataLoader worker processes that decode (default: the cores beyond two, up to 8; 0: the main thread decodes)")
    encode.add_argument("--part-size", type=_positive, default=1024, help="images per part written as the run goes")
    encode.add_argument("--resume", action="store_true", help="continue a killed run: skip files its parts already hold")
    encode.set_defaults(handler=run_encode)

    info = commands.add_parser("info", help="architecture, parameters, experts, preprocessing and provenance")
    info.add_argument("model", nargs="?", help="registry name, model directory, .safetensors file or Hub id; "
                      "without it, only this machine (CPU, cores, native bf16, what dtype='auto' picks)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(handler=run_info)

    listing = commands.add_parser("list", help="the registered model names")
    listing.set_defaults(handler=run_list)

    convert = commands.add_parser("convert", help="convert an official M-IDoL or Swin checkpoint to a model directory")
    convert.add_argument("src", help="checkpoint (.pth, .pt, .safetensors)")
    convert.add_argument("out_dir", help="directory to write config.json, model.safetensors and README.md")
    convert.add_argument("--use", choices=("teacher", "student"), default="teacher")
    convert.add_argument("--arch", default=None, help="registry name to take the architecture from")
    convert.add_argument("--img-size", type=int, default=None, help="input size when the checkpoint does not tell")
    convert.add_argument("--backbone-only", action="store_true",
                         help="convert the Swin backbone of a checkpoint without a complete MoE head (pooled features only)")
    convert.set_defaults(handler=run_convert)

    push = commands.add_parser("push", help="upload a model directory to the Hugging Face Hub")
    push.add_argument("model_dir")
    push.add_argument("repo_id", help="org/name")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    push.set_defaults(handler=run_push)

    cache = commands.add_parser("cache", help="manage models in the Hugging Face cache")
    cache_commands = cache.add_subparsers(title="cache commands", metavar="ACTION")
    prefetch = cache_commands.add_parser("prefetch", help="download a model so later runs work offline")
    prefetch.add_argument("model", help="Hub id or registry name with published weights")
    prefetch.add_argument("--revision", default=None)
    prefetch.add_argument("--cache-dir", default=None)
    prefetch.set_defaults(handler=run_cache_prefetch)
    listing_cache = cache_commands.add_parser("ls", help="list the M-IDoL models in the cache")
    listing_cache.add_argument("--cache-dir", default=None)
    listing_cache.set_defaults(handler=run_cache_ls)

    explain = commands.add_parser("explain", help="routing maps (why modality='auto' chose its expert), or class heatmaps of a classifier")
    explain.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    explain.add_argument("--model", default=DEFAULT_MODEL, help="registry name, model directory or Hub id")
    explain.add_argument("--out", required=True, help="folder for one PNG per image (per frame)")
    explain.add_argument("--frames", type=_frames, default=None, metavar="all|middle|INDEX",
                         help="multi-frame files: as for midol encode")
    explain.add_argument("--classifier", default=None, metavar="DIR",
                         help="a fine-tuned MIDoLForImageClassification: draw its class heatmaps instead of routing maps")
    explain.add_argument("--target", type=int, default=None, help="--classifier: the class to explain (default: the predicted one)")
    explain.add_argument("--method", default="gradcam", help="--classifier: gradcam (default), gradcam++, hirescam, "
                                                             "xgradcam, layercam or eigencam")
    explain.set_defaults(handler=run_explain)

    export = commands.add_parser("export", help="export a model for deployment")
    export_formats = export.add_subparsers(title="formats", metavar="FORMAT")
    onnx = export_formats.add_parser("onnx", help="an ONNX file checked against torch, with a .midol.json sidecar")
    onnx.add_argument("model", help="registry name, model directory or Hub id")
    onnx.add_argument("out", help="the .onnx file to write (the sidecar goes beside it)")
    onnx.add_argument("--modality", default=None,
                      help="fix one modality's expert: the graph outputs that embedding only (default: every expert)")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    onnx.set_defaults(handler=run_export_onnx)

    app = commands.add_parser("app", help="a local browser app: modality, routing map, similar cases, class heatmaps")
    app.add_argument("--model", default=DEFAULT_MODEL, help="registry name, model directory or Hub id")
    app.add_argument("--index", default=None, help="an index folder: show the most similar cases")
    app.add_argument("--classifier", default=None, metavar="DIR", help="a fine-tuned classifier folder: show class heatmaps")
    app.add_argument("-k", type=_positive, default=6, help="similar cases shown per image")
    app.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=_positive, default=7860)
    app.add_argument("--max-file-mb", type=_positive, default=64, help="uploads larger than this are refused")
    app.set_defaults(handler=run_app)

    index = commands.add_parser("index", help="build and grow an image index for similar-case search")
    index_commands = index.add_subparsers(title="index commands", metavar="ACTION")
    build = index_commands.add_parser("build", help="encode images and index them, one sub-index per modality")
    build.add_argument("paths", nargs="+", help="image files or folders (searched recursively), or a PACS: "
                       "dicomweb+http://HOST:PORT/dicom-web (credentials: MIDOL_DICOMWEB_USER/_PASSWORD or netrc)")
    build.add_argument("--model", default=DEFAULT_MODEL, help="registry name, model directory or Hub id")
    build.add_argument("--index", required=True, help="the index folder (created)")
    build.add_argument("--exact-limit", type=int, default=None,
                       help="rows of one modality up to which search is exact (default 50000; above: IVF tuned to recall 0.95)")
    build.add_argument("--backend", choices=("faiss", "milvus"), default="faiss",
                       help="faiss (embedded, default) or milvus: the rows in a Milvus server, cluster or milvus-lite file")
    build.add_argument("--uri", default=None, help="milvus: http://host:19530, or a local file such as cases.db (milvus-lite)")
    build.add_argument("--collection", default="midol", help="milvus: collection prefix, one collection per modality")
    build.add_argument("--milvus-index", default="FLAT", help="milvus: index type (FLAT: exact; HNSW, IVF_FLAT, AUTOINDEX)")
    build.add_argument("--output", choices=VECTOR_OUTPUTS, default=None,
                       help="the vector indexed and searched: the expert's embedding or the backbone's pooled feature "
                            "(default: the model's default feature)")
    _index_options(build)
    build.set_defaults(handler=run_index_build)
    grow = index_commands.add_parser("add", help="add images to an index (files it holds, by content, are skipped)")
    grow.add_argument("index", help="the index folder")
    grow.add_argument("paths", nargs="+", help="image files or folders, or a PACS (dicomweb+http://...)")
    grow.add_argument("--model", default=None, help="default: the model the index was built with")
    _index_options(grow)
    grow.set_defaults(handler=run_index_add)
    about = index_commands.add_parser("info", help="rows per modality, model and settings of an index")
    about.add_argument("index", help="the index folder")
    about.add_argument("--json", action="store_true")
    about.set_defaults(handler=run_index_info)

    search = commands.add_parser("search", help="the most similar indexed images of each query, within its modality")
    search.add_argument("queries", nargs="+", help="query image files")
    search.add_argument("--index", required=True, help="the index folder")
    search.add_argument("-k", type=_positive, default=10, help="neighbours per query")
    search.add_argument("--modality", default=None, help="force the queries' modality (default: auto)")
    search.add_argument("--model", default=None, help="default: the model the index was built with")
    search.add_argument("--include-unknown", action="store_true", help="also search images auto called unknown")
    search.add_argument("--json", action="store_true", help="print JSON: per query its modality and neighbours")
    search.add_argument("--show", default=None, metavar="OUT.png", help="draw each query beside its neighbours")
    search.set_defaults(handler=run_search)

    plot = commands.add_parser("plot", help="2-D map of encoded features coloured by modality or label")
    plot.add_argument("features", help=".npz written by `midol encode` (or with 'pooled' or 'embedding', and 'labels')")
    plot.add_argument("--output", choices=VECTOR_OUTPUTS, default=None,
                      help="the vector to map (default: the one the file holds; pooled when it holds both)")
    plot.add_argument("--by", default="modality",
                      help="modality (forced, from the DICOM header or the router's), source (which of those three), label, or folder (each file's top folder below the "
                           "files' common root: the true groups); comma-separated for panels side by side, e.g. folder,modality")
    plot.add_argument("--out", required=True, help="image file, e.g. map.png")
    plot.add_argument("--method", choices=("pca", "umap"), default=None, help="default: umap when installed, else pca")
    plot.set_defaults(handler=run_plot)
    return parser


# ----------------------------------------------------------------------------- encode


def _frames(text: str) -> str | int:
    if text in ("all", "middle"):
        return text
    try:
        return _non_negative(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected all, middle or a frame index (0, 1, ...), got {text!r}") from None


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def collect_images(paths: Sequence[str]) -> list[Path]:
    """Files as given, plus every image below each folder (sorted, recursive)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise CLIError(f"{path}: folder holds no images ({', '.join(READABLE_SUFFIXES)})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise CLIError(f"{path}: no such file or folder")
    return files


def run_encode(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_writable(out, ENCODE_FORMATS)
    outputs = [name.strip() for name in (args.output or "").split(",") if name.strip()]  # none: the model's default
    unknown = sorted(set(outputs) - set(ENCODE_OUTPUTS))
    if unknown:
        raise CLIError(f"--output {','.join(unknown)}: choose from {','.join(ENCODE_OUTPUTS)}")
    if out.suffix == ".npy" and outputs and outputs not in (["embedding"], ["pooled"]):
        raise CLIError(f"{out}: .npy holds one array (embedding or pooled); use .npz or .safetensors for {args.output}")
    if args.skip_errors:
        warnings.warn("--skip-errors is now spelled --errors skip", FutureWarning, stacklevel=2)
        args.errors = "skip"
    files = list(dict.fromkeys(str(f) for f in collect_images(args.paths)))
    rank, world, device = join_torchrun(args.device)
    with ExitStack() as held:
        lock_for_ranks(held, out.with_name(out.name + ".lock"), str(out), rank, world)
        _encode_locked(args, out, outputs, files, rank, world, device)
    leave_torchrun()


def _encode_locked(args: argparse.Namespace, out: Path, outputs: list[str], files: list[str], rank: int, world: int,
                   device: str | None) -> None:
    import torch

    from . import load_model
    from .bulk import encode_files, merge_parts, parts_dir, remove_parts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = load_model(args.model, pretrained=not args.random_weights, device=device)
    if args.random_weights and rank == 0:
        print(f"NOTICE: {args.model} has random weights; the embeddings are meaningless", file=sys.stderr)
    outputs = outputs or [model.config.default_feature]
    try:
        resumed = encode_files(model, files, out, modality=args.modality, outputs=outputs,
                               batch_size=args.batch_size, dtype=parse_dtype(args.dtype, device or "cpu"),
                               workers=args.workers, errors=args.errors, part_size=args.part_size,
                               resume=args.resume, rank=rank, world=world, frames=args.frames)
    except FileExistsError as error:
        raise CLIError(str(error)) from None
    except Exception:
        directory = parts_dir(out)
        if directory.is_dir() and not any(p.name != "run.json" for p in directory.iterdir()):
            remove_parts(out)  # nothing encoded yet: leave nothing behind (written parts stay, for --resume)
        raise
    if resumed and rank == 0:
        print(f"resumed: {resumed} file(s) were already encoded", file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()  # every rank's parts are written
    if rank == 0:
        merged = merge_parts(out, files, outputs)
        manifest = {"model": args.model, "provenance": model.provenance.to_dict() if model.provenance else {},
                    "experts": list(model.config.expert_modalities), "frames": args.frames, "rows": merged.rows,
                    "failures": merged.failures}
        write_features(out, merged.arrays, merged.rows, manifest)
        remove_parts(out)
        print(f"wrote {len(merged.rows)} row(s) to {out} and {manifest_path(out)}; {len(merged.failures)} failure(s)")
        for failure in merged.failures:
            print(f"  skipped {failure['path']}: {failure['error']}", file=sys.stderr)


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


def write_features(out: Path, arrays: dict[str, np.ndarray], rows: list[dict], manifest: dict) -> None:
    """The arrays, and per row its path, frame (-1: single-frame file), modality and modality source."""
    paths = [row["path"] for row in rows]
    columns = {"paths": np.array(paths), "frames": np.array([-1 if r["frame"] is None else r["frame"] for r in rows]),
               "modality": np.array([r["modality"] for r in rows]), "source": np.array([r["modality_source"] for r in rows])}
    if out.suffix == ".npy":
        with atomic_write(out) as tmp:
            with open(tmp, "wb") as handle:
                (vectors,) = arrays.values()  # run_encode allows .npy for one vector output only
                np.save(handle, vectors)
    elif out.suffix == ".npz":
        with atomic_write(out) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays, **columns)
    else:
        import torch
        from safetensors.torch import save_file

        with atomic_write(out) as tmp:
            tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in arrays.items()}
            save_file(tensors, tmp, metadata={name: json.dumps(values.tolist()) for name, values in columns.items()})
    with atomic_write(manifest_path(out)) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def check_writable(out: Path, formats: Sequence[str]) -> None:
    if out.suffix.lower() not in formats:
        raise CLIError(f"{out}: unknown output format {out.suffix or '(none)'}; use {', '.join(formats)}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"{out}: the folder {parent} does not exist")
    if out.is_dir():
        raise CLIError(f"{out}: is a directory; give a file name")
    try:  # a real write, since permission bits say little to root or on special file systems
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{out.name}.", suffix=".check"):
            pass
    except OSError as error:
        raise CLIError(f"{out}: not writable ({error.strerror or error})") from None


# ----------------------------------------------------------------------------- info, list, convert


def describe_model(spec: str) -> dict[str, Any]:
    """What `midol info` prints: from the config alone when no weights are published."""
    import torch

    from . import load_model
    from .modeling_midol import MIDoLModel
    from .registry import get_entry

    entry = get_entry(spec)
    if entry is not None and not entry.has_weights:
        config, provenance = entry.make_config(), {"source": "registry", "weights": "not published"}
    else:
        model = load_model(spec)
        config, provenance = model.config, model.provenance.to_dict()
    with torch.device("meta"):
        skeleton = MIDoLModel(config)
    backbone = sum(p.numel() for p in skeleton.backbone.parameters())
    head = sum(p.numel() for p in skeleton.head.parameters())
    return {
        "name": spec,
        "architecture": {
            "backbone": config.backbone,
            **({"embed_dim": config.embed_dim, "depths": config.depths, "num_heads": config.num_heads,
                "window_size": config.window_size, "patch_size": config.patch_size} if config.is_swin else {}),
            "img_size": config.img_size,
            "embedding_dim": config.num_features,
        },
        "parameters": {"backbone": backbone, "head": head, "total": backbone + head},
        "experts": {str(i): m for i, m in enumerate(config.expert_modalities)},
        "shared_experts": config.shared_experts,
        "top_k": config.top_k,
        "calibration": config.modality_calibration,
        "preprocessing": config.preprocessing,
        "provenance": provenance,
        "this_machine": this_machine(),
    }


def this_machine() -> dict[str, Any]:
    """Native bf16 on the device models run on here, and what ``dtype="auto"`` picks there."""
    import torch

    return supported_precisions("cuda" if torch.cuda.is_available() else "cpu")


def run_info(args: argparse.Namespace) -> None:
    info = describe_model(args.model) if args.model else {"this_machine": this_machine()}
    if args.json:
        print(json.dumps(info, indent=2))
        return
    if args.model:
        print_model_info(info)
    print(("  " if args.model else "") + machine_summary(info["this_machine"]))


def machine_summary(machine: dict[str, Any]) -> str:
    features = f" ({', '.join(machine['cpu_bf16_features'])})" if machine["cpu_bf16_features"] else ""
    return (f"this machine {machine['device']} ({machine['cpu']}, {machine['cores']} cores): native bf16 "
            f"{'yes' if machine['native_bf16'] else 'no'}{features}; "
            f"dtype='auto' computes in {machine['auto']}")


def print_model_info(info: dict[str, Any]) -> None:
    arch, params = info["architecture"], info["parameters"]
    print(f"{info['name']}")
    swin = (f"embed {arch['embed_dim']}, depths {arch['depths']}, heads {arch['num_heads']}, window "
            f"{arch['window_size']}, patch {arch['patch_size']}, ") if "depths" in arch else ""
    print(f"  backbone     {arch['backbone']}: {swin}{arch['img_size']} px")
    print(f"  parameters   {params['total'] / 1e6:.2f} M (backbone {params['backbone'] / 1e6:.2f} M, head {params['head'] / 1e6:.2f} M)")
    print(f"  embedding    {arch['embedding_dim']}-d")
    shared = "".join(f"; {m} shares {e}" for m, e in info["shared_experts"].items())
    print(f"  experts      {', '.join(f'{i}: {m}' for i, m in info['experts'].items())} (top-k {info['top_k']}){shared}")
    print(f"  calibrated   {'yes' if info['calibration'] else 'no'}")
    for modality, profile in info["preprocessing"].items():
        print(f"  {modality:<12} {profile['channels']}, {profile['resize']}, {profile['size']} px"
              f"{', border removed' if profile['crop_border'] else ''}")
    print("  provenance   " + ", ".join(f"{k}={v}" for k, v in info["provenance"].items() if v is not None))


def run_list(args: argparse.Namespace) -> None:
    from .registry import get_entry, list_models

    for name in list_models():
        entry = get_entry(name)
        weights = entry.hub_id or ("in the package" if entry.embedded else "no published weights")
        print(f"{name:<18} {weights:<24} {entry.description}")


def run_convert(args: argparse.Namespace) -> None:
    from .convert import convert_checkpoint

    out_dir = Path(args.out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CLIError(f"{out_dir}: exists and is not an empty directory; choose a new one")
    if not out_dir.absolute().parent.is_dir():
        raise CLIError(f"{out_dir}: the folder {out_dir.absolute().parent} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.absolute().parent))
    try:
        model = convert_checkpoint(args.src, staging, use=args.use, arch=args.arch, img_size=args.img_size,
                                   backbone_only=args.backbone_only)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            for file in staging.iterdir():
                file.unlink()
            staging.rmdir()
    kind = "backbone only: pooled features" if model.config.backbone_only else f"{model.config.num_experts} experts"
    print(f"converted {args.src} -> {out_dir} ({model.config.num_features}-d, {kind})")


# ----------------------------------------------------------------------------- push and cache


def run_push(args: argparse.Namespace) -> None:
    from huggingface_hub import HfApi, ModelCard

    from . import load_model

    model_dir = Path(args.model_dir)
    load_model(model_dir)  # refuses a directory that does not load
    card_path = model_dir / "README.md"
    if not card_path.is_file():
        raise CLIError(f"{model_dir}: no model card README.md; save the model with save_pretrained")
    try:
        card = ModelCard.load(card_path)  # parses the front matter and its model-index
    except (ValueError, KeyError, TypeError) as error:
        raise CLIError(f"{card_path}: the card's YAML front matter does not parse ({error})") from None
    meta = card.data.to_dict()
    if not meta.get("license") or meta.get("library_name") != "midol-hub":
        raise CLIError(f"{card_path}: the card's YAML front matter lacks license or library_name: midol-hub")
    api = HfApi(token=args.token)
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    if args.revision:
        api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=args.repo_id,
        folder_path=model_dir,
        revision=args.revision,
        allow_patterns=["config.json", "model.safetensors", "preprocessor_config.json", "README.md"],
        commit_message="Upload M-IDoL model with midol-hub",
    )
    print(f"pushed {model_dir} to {args.repo_id} ({commit.oid if hasattr(commit, 'oid') else commit})")


def run_cache_prefetch(args: argparse.Namespace) -> None:
    from huggingface_hub import snapshot_download

    from .loading import HUB_FILES
    from .registry import get_entry

    entry = get_entry(args.model)
    repo_id = args.model
    if entry is not None:
        if entry.embedded is not None:
            print(f"{entry.name} ships inside the package ({entry.embedded_path()}); nothing to prefetch")
            return
        if entry.hub_id is None:
            raise CLIError(f"{entry.name} has no published weights to prefetch; to get a model: {entry.how_to_get_weights()}")
        repo_id = entry.hub_id
    path = snapshot_download(repo_id, revision=args.revision, cache_dir=args.cache_dir, allow_patterns=HUB_FILES)
    print(f"{repo_id} is cached at {path}")


def run_cache_ls(args: argparse.Namespace) -> None:
    from huggingface_hub import scan_cache_dir

    found = 0
    for repo in sorted(scan_cache_dir(args.cache_dir).repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            config = next((f.file_path for f in revision.files if f.file_name == "config.json"), None)
            if config is None or json.loads(Path(config).read_text()).get("model_type") != "midol":
                continue
            refs = ",".join(sorted(revision.refs)) or "-"
            print(f"{repo.repo_id:<32} {revision.commit_hash[:12]}  refs={refs:<12} {revision.size_on_disk / 2**20:8.1f} MiB")
            found += 1
    if not found:
        print("no M-IDoL models in the cache")


# ----------------------------------------------------------------------------- plot


def run_explain(args: argparse.Namespace) -> None:
    from . import load_model
    from .explain import draw_class_heatmaps, draw_routing_maps

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("drawing needs matplotlib: pip install 'midol-hub[plot]'") from None
    files = [str(f) for f in collect_images(args.paths)]
    if args.classifier is None:
        written = draw_routing_maps(load_model(args.model), files, args.out, frames=args.frames)
        print(f"wrote {len(written)} routing map(s) to {args.out}")
        return
    written = draw_class_heatmaps(_load_classifier(args.classifier), files, args.out, target=args.target, method=args.method)
    print(f"wrote {len(written)} class heatmap(s) to {args.out}")


def run_app(args: argparse.Namespace) -> None:
    from . import load_model
    from .app import CaseViewer, launch

    model = load_model(args.model)
    index = None
    if args.index is not None:
        from .search import ImageIndex

        index = ImageIndex(args.index)
    classifier = _load_classifier(args.classifier) if args.classifier else None
    launch(CaseViewer(model, index, classifier, k=args.k, max_file_bytes=args.max_file_mb * 2**20, model_name=args.model),
           args.host, args.port)


def _load_classifier(folder: str) -> Any:
    from .tasks import MIDoLForImageClassification

    if not (Path(folder) / "config.json").is_file():
        raise CLIError(f"--classifier {folder}: not a model folder (no config.json); give the folder that "
                       "save_pretrained (or examples/finetune_classification.py, OUTPUT_DIR/model) wrote")
    return MIDoLForImageClassification.from_pretrained(folder)


def run_export_onnx(args: argparse.Namespace) -> None:
    from . import load_model
    from .deploy import export_onnx, sidecar_path

    out = Path(args.out)
    if out.suffix != ".onnx":
        raise CLIError(f"{out}: the export file must end in .onnx")
    path = export_onnx(load_model(args.model), out, modality=args.modality, opset=args.opset)
    print(f"wrote {path} and {sidecar_path(path).name} (checked against torch: every output within 1e-4)")


def _index_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", default=AUTO, help=f"{AUTO} or one of {', '.join(MODALITIES)}")
    parser.add_argument("--labels", default=None, help="CSV with a path column and label columns to store with each image")
    parser.add_argument("--batch-size", type=_positive, default=32)
    parser.add_argument("--workers", type=_non_negative, default=None, help="DataLoader workers that decode")
    parser.add_argument("--part-size", type=_positive, default=1024, help="images per part written as the run goes")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted build")
    parser.add_argument("--errors", choices=("raise", "skip"), default="skip",
                        help="skip (default): leave unreadable files out and list them; raise: stop at the first")
    parser.add_argument("--frames", type=_frames, default=None, metavar="all|middle|INDEX")
    pacs = parser.add_argument_group("DICOMweb sources (QIDO-RS filters)")
    pacs.add_argument("--pacs-modality", default=None, metavar="CODE", help="DICOM Modality code, e.g. CR, OP, OCT")
    pacs.add_argument("--study-date", default=None, metavar="DATE[-DATE]", help="study date or range, e.g. 20240101-20241231")
    pacs.add_argument("--study-uid", action="append", default=[], help="index this study only (repeat for several)")
    pacs.add_argument("--series-uid", action="append", default=[], help="index this series only (repeat for several)")


def _index_model(args: argparse.Namespace, index: Any, device: str | None = None) -> Any:
    from . import load_model

    name = args.model or index.manifest.get("model")
    if name is None:
        raise CLIError(f"{index.directory}: the index does not name its model; pass --model")
    return load_model(name, device=device)


def _fill_index(args: argparse.Namespace, index: Any, model: Any, rank: int, world: int, sources: list[str]) -> None:
    from .search import add_files, read_labels

    labels = read_labels(args.labels)[1] if args.labels else None
    try:
        report = add_files(index, model, sources, modality=args.modality,
                           labels=labels, batch_size=args.batch_size, workers=args.workers, errors=args.errors,
                           part_size=args.part_size, resume=args.resume, rank=rank, world=world, frames=args.frames)
    except FileExistsError as error:
        raise CLIError(str(error)) from None
    if rank == 0:
        finished = f"finished the interrupted add ({report['finished_earlier']} row(s)); " if args.resume else ""
        duplicates = f", {report['duplicates']} duplicate(s) of content already there" if report["duplicates"] else ""
        print(f"{finished}indexed {report['added']} new row(s) in {index.directory} ({report['already_indexed']} file(s) "
              f"already there{duplicates}); {report['rows']} row(s): " + ", ".join(f"{m} {n}" for m, n in index.counts().items()))
        for failure in report["failures"]:
            print(f"  skipped {failure['path']}: {failure['error']}", file=sys.stderr)
    leave_torchrun()


def index_sources(args: argparse.Namespace) -> list[str]:
    """The files below ``args.paths``, and the instances each DICOMweb service's QIDO-RS finds."""
    from .dicomweb import DICOMwebSource, is_dicomweb

    sources: list[str] = []
    for raw in args.paths:
        if not is_dicomweb(raw):
            sources += [str(f) for f in collect_images([raw])]
            continue
        found = DICOMwebSource(raw).instances(modality=args.pacs_modality, study_date=args.study_date,
                                              study_uids=args.study_uid, series_uids=args.series_uid)
        if not found:
            raise CLIError(f"{raw}: QIDO-RS finds no instances" + (" matching the filters" if args.pacs_modality or
                           args.study_date or args.study_uid or args.series_uid else ""))
        sources += [instance.url for instance in found]
    return sources


def _listed_sources(args: argparse.Namespace, rank: int, world: int) -> list[str]:
    """:func:`index_sources` listed once, by rank 0 (a PACS may change between two queries), on every rank."""
    listed, problem = None, None
    if rank == 0:
        try:
            listed = index_sources(args)
        except (CLIError, DICOMwebError) as error:
            problem = str(error)
    listed, problem = from_rank_zero((listed, problem), world)
    if problem is not None:
        raise CLIError(problem)
    return listed


def run_index_build(args: argparse.Namespace) -> None:
    from . import load_model
    from .search import EXACT_LIMIT, ImageIndex, read_labels

    rank, world, device = join_torchrun(None)
    model = load_model(args.model, device=device)
    directory = Path(args.index)
    sources = _listed_sources(args, rank, world)  # before anything is created: a PACS that refuses leaves no empty index
    problem = None
    if rank == 0:  # one rank decides and creates; the others learn the outcome (never a race on index.json)
        try:
            if (directory / "index.json").is_file():
                if not args.resume:
                    raise CLIError(f"{directory}: an index is already there; add to it with `midol index add {directory} ...`")
            else:
                columns = read_labels(args.labels)[0] if args.labels else []
                ImageIndex.create(directory, model, columns, args.exact_limit or EXACT_LIMIT, model_name=args.model,
                                  backend=args.backend, uri=args.uri, collection=args.collection,
                                  milvus_index=args.milvus_index, output=args.output).close()
        except (CLIError, ValueError) as error:
            problem = str(error)
    problem = from_rank_zero(problem, world)
    if problem is not None:
        raise CLIError(problem)
    _fill_index(args, ImageIndex(directory), model, rank, world, sources)


def run_index_add(args: argparse.Namespace) -> None:
    from .search import ImageIndex

    rank, world, device = join_torchrun(None)
    index = ImageIndex(args.index)
    model = _index_model(args, index, device)
    _fill_index(args, index, model, rank, world, _listed_sources(args, rank, world))


def run_index_info(args: argparse.Namespace) -> None:
    from .search import ImageIndex

    info = ImageIndex(args.index).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.index}: {info['rows']} row(s), model {info['model']} (weights {info['weights_sha256'][:12]}, "
          f"preprocessing {info['preprocessing_sha256'][:12]}), {info['output']} vectors of dimension {info['dim']}")
    for modality, about in info["modalities"].items():
        print(f"  {modality:<11} {about['rows']:>8}  {about['search']}")
    if info["label_columns"]:
        print(f"  labels: {', '.join(info['label_columns'])}")


def run_search(args: argparse.Namespace) -> None:
    from .search import ImageIndex, draw_search

    index = ImageIndex(args.index)
    model = _index_model(args, index)
    queries = [str(q) for q in collect_images(args.queries)]
    if args.show:
        check_writable(Path(args.show), (".png",))
    hits, modalities = index.search(model, queries, k=args.k, modality=args.modality, include_unknown=args.include_unknown)
    if args.show:
        draw_search(queries, hits, modalities, args.show, index.manifest["label_columns"])
    if args.json:
        print(json.dumps([{"query": q, "modality": m, "neighbours": [h.to_dict() for h in found]}
                          for q, m, found in zip(queries, modalities, hits)], indent=2))
        return
    for query, modality, found in zip(queries, modalities, hits):
        empty = (" not searched: auto calls it none of the five modalities (--include-unknown searches such images)"
                 if modality == UNKNOWN and not args.include_unknown else " no indexed images of this modality")
        print(f"{query} ({modality}):" + ("" if found else empty))
        for hit in found:
            labels = "  " + " ".join(f"{k}={v}" for k, v in hit.labels.items()) if hit.labels else ""
            print(f"  {hit.rank:>3}  {hit.score:.4f}  {hit.path}{labels}")
    if args.show:
        print(f"drew {args.show}")


def run_plot(args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("plotting needs matplotlib: pip install 'midol-hub[plot]'") from None
    out = Path(args.out)
    check_writable(out, (".png", ".pdf", ".svg", ".jpg"))
    path = Path(args.features)
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise CLIError(f"{path}: not a readable .npz file ({error})") from None
    panels = [name.strip() for name in args.by.split(",") if name.strip()]
    unknown = sorted(set(panels) - set(PLOT_GROUPS))
    if unknown or not panels:
        raise CLIError(f"--by {args.by}: choose from {', '.join(PLOT_GROUPS)} (comma-separated for several panels)")
    held = [name for name in ("pooled", "embedding") if name in data]
    vector = args.output or (held[0] if held else "pooled")
    if vector not in data:
        raise CLIError(f"{path}: has no {vector!r} array (it has {', '.join(data.files)}); "
                       f"encode with `midol encode --output {vector}`")
    groupings = {name: plot_groups(data, name, path) for name in panels}
    features = data[vector].astype(np.float64)
    if len(features) < 3:
        raise CLIError(f"{path}: needs at least 3 rows to draw a map, has {len(features)}")
    points, method = project_2d(features, args.method)
    figure, all_axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), dpi=120, squeeze=False)
    for axes, (name, groups) in zip(all_axes[0], groupings.items()):
        for group in sorted(set(groups)):
            mask = groups == group
            axes.scatter(points[mask, 0], points[mask, 1], s=12, label=f"{group} ({mask.sum()})")
        axes.set_title(f"{path.name} ({vector}): {method.upper()} by {name}")
        axes.legend(fontsize=8, markerscale=1.5)
    figure.tight_layout()
    with atomic_write(out) as tmp:
        figure.savefig(tmp, format=out.suffix.lstrip("."))
    plt.close(figure)
    summary = "; ".join(f"{name}: " + ", ".join(f"{g} ({(groups == g).sum()})" for g in sorted(set(groups)))
                        for name, groups in groupings.items())
    print(f"wrote {out} ({method} of {vector}, {len(features)} points; {summary})")


PLOT_GROUPS = ("modality", "source", "label", "folder")


def plot_groups(data: Any, by: str, path: Path) -> np.ndarray:
    """Each row's group for a panel: its modality, where that came from (forced, dicom, router),
    its label, or its file's top folder."""
    key = {"modality": "modality", "source": "source", "label": "labels", "folder": "paths"}[by]
    if key not in data:
        raise CLIError(f"{path}: has no '{key}' array for --by {by} (it has {', '.join(data.files)})")
    values = data[key].astype(str)
    if by != "folder":
        return values
    common = Path(os.path.commonpath(list(values)))
    parts = [Path(p).relative_to(common).parts for p in values]
    return np.array([p[0] if len(p) > 1 else "." for p in parts])


def project_2d(features: np.ndarray, method: str | None) -> tuple[np.ndarray, str]:
    """UMAP when requested or installed, else PCA via SVD of the centred features."""
    if method in (None, "umap"):
        try:
            import umap

            return umap.UMAP(n_components=2, random_state=0).fit_transform(features), "umap"
        except ImportError:
            if method == "umap":
                raise CLIError("--method umap needs umap-learn: pip install umap-learn") from None
    centred = features - features.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T, "pca"


if __name__ == "__main__":
    sys.exit(main())
