"""Export a run's teacher as a midol_hub model: ``python -m training.export RUN_DIR MODEL_DIR``.

``--calibrate TAG=PATH ...`` routes labelled training images (roots tagged with their
modality) through the teacher and calibrates its experts with :func:`midol_hub.calibrate`:
experts matched to modalities by Hungarian assignment on argmax-routing counts, routing
accuracy per modality, and the out-of-scope detector behind ``"unknown"``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from timm.utils.model import unfreeze_batch_norm_2d

from midol_hub import MIDoLConfig, MIDoLModel, canonical_modality
from midol_hub import calibrate as midol_calibrate
from midol_hub.errors import DatasetError
from midol_hub.modalities import SHARED
from midol_hub.utils import run_command

from .checkpoint import list_checkpoints, load_checkpoint
from .config import deviations_from_official, objective_options
from .data import open_source
from .head_norm import refit_head_norm_statistics
from .pretrain import freeze_batch_norm


@dataclass
class Exported:
    """The exported model (in fp32) and, for fp16 storage, the largest embedding change it causes."""

    model: MIDoLModel
    fp16_error: float | None = None


def export(run_dir: str | Path, model_dir: str | Path, calibrate: list[str] | Mapping[str, Sequence] | None = None,
           keep_prototypes: bool = False, max_per_modality: int = 500, storage: str = "fp32",
           groups: Mapping[str, Sequence[str]] | None = None, calibration_settings: Mapping[str, float] | None = None,
           refit_head_norm: bool = False, **card: object) -> Exported:
    """Write the last checkpoint's teacher to ``model_dir``; optionally calibrate its experts on
    ``calibrate``: ``MODALITY=PATH`` roots, or images by modality (with their ``groups`` and
    ``calibration_settings``: ``quantile``, ``components``, ``slope``, see :func:`midol_hub.calibrate`).
    ``refit_head_norm`` first re-estimates the backbone's last batch norm on those images
    (:func:`refit_head_norm_statistics`; for runs with frozen batch norm).

    ``storage="fp16"`` halves the file; it is refused unless embeddings of the calibration
    images stay within 1e-3 of fp32. ``card`` goes to ``save_pretrained`` (``results``,
    ``card_notes``).
    """
    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if not checkpoints:
        raise DatasetError(f"{run_dir} holds no checkpoint-*.pt; pass the --output-dir of a training run")
    state = load_checkpoint(checkpoints[-1])
    fields = dict(state["model_config"])
    fields.pop("transformers_version", None)
    config = MIDoLConfig(**{**fields, "drop_path_rate": 0.0})
    trained = MIDoLModel(config)
    frozen_norm = state["config"]["model"].get("batch_norm") == "frozen"
    if frozen_norm:  # trained with timm's FrozenBatchNorm2d: load it as such, then back to plain batch norm
        freeze_batch_norm(trained)
    trained.load_state_dict(state["teacher"])
    if frozen_norm:
        trained.backbone = unfreeze_batch_norm_2d(trained.backbone)
    config_out = MIDoLConfig(**{**fields, "drop_path_rate": 0.0, "keep_prototypes": keep_prototypes,
                                "pretraining": pretraining_record(state)})
    model = MIDoLModel(config_out)
    model.load_state_dict(trained.state_dict(), strict=not (config.keep_prototypes and not keep_prototypes))
    model.eval()
    samples = None
    if refit_head_norm and not calibrate:
        raise DatasetError("refitting the head's batch norm needs training images: pass them with calibrate= (--calibrate)")
    if calibrate:
        if config.expert_modalities == [SHARED]:
            raise DatasetError("a one-expert (dino objective) model has no experts to calibrate")
        images = calibrate if isinstance(calibrate, Mapping) else calibration_images(calibrate, max_per_modality)
        if refit_head_norm:
            record = model.config.pretraining  # a step the official code does not take: the card lists it
            record["deviations_from_official"] = {**record["deviations_from_official"],
                                                  "head_norm_refit_images": refit_head_norm_statistics(model, images)}
        midol_calibrate(model, images, groups, **(calibration_settings or {}))
        samples = torch.cat([model.preprocess(group[:8], "auto") for group in images.values()])
    fp16_error = None
    if storage == "fp16":
        if samples is None:
            raise DatasetError("--storage fp16 needs --calibrate images to check the rounding on")
        fp16_error = fp16_rounding_error(model, samples)
        if fp16_error > 1e-3:
            raise DatasetError(f"fp16 storage moves embeddings by {fp16_error:.2e} > 1e-3; keep fp32")
        kept = {name: tensor.clone() for name, tensor in model.state_dict().items() if keeps_fp32(model, name, tensor)}
        model.half()
        for name, tensor in kept.items():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            if leaf in module._parameters:
                module._parameters[leaf].data = tensor
            else:
                module._buffers[leaf] = tensor
    elif storage != "fp32":
        raise DatasetError(f"--storage must be fp32 or fp16, got {storage!r}")
    model.save_pretrained(model_dir, **card)
    return Exported(model.float(), fp16_error)


def keeps_fp32(model: MIDoLModel, name: str, tensor: torch.Tensor) -> bool:
    """Whether fp16 storage keeps ``name`` in fp32: 1-D tensors (norms, biases, batch-norm statistics; a
    channel whose running variance is 0 is scaled by 1/sqrt(eps)) and the backbone's stem and first two
    stages, whose rounding every later layer amplifies (midol-lite all in fp16: embeddings move by 0.10;
    with these 99 k parameters in fp32, 7e-4). Together a few hundred kB."""
    if not tensor.is_floating_point():
        return False
    early = (("backbone.patch_embed.", "backbone.layers.0.", "backbone.layers.1.") if model.config.is_swin
             else ("backbone.conv_stem.", "backbone.bn1.", "backbone.blocks.0.", "backbone.blocks.1."))
    return tensor.ndim <= 1 or name.startswith(early)


@torch.no_grad()
def fp16_rounding_error(model: MIDoLModel, batch: torch.Tensor) -> float:
    """Largest change of any L2-normalised embedding when the weights are stored as fp16 storage stores
    them (:func:`keeps_fp32`)."""
    rounded = MIDoLModel(model.config).eval()
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() and not keeps_fp32(model, k, v) else v
                             for k, v in model.state_dict().items()})
    expected = torch.nn.functional.normalize(model(batch).embedding, dim=-1)
    return float((torch.nn.functional.normalize(rounded(batch).embedding, dim=-1) - expected).abs().max())


def pretraining_record(state: dict) -> dict:
    """What trained these weights: the objective and its options, as the run's config.yaml has them,
    the machines that computed its steps (``training.pretrain.training_machine``), the checkpoints a soup averages (``training.soup``), and, for a run started from a model, that
    model's own record (``init_pretraining``; nested, the whole lineage)."""
    config = state["config"]
    objective, optim = config["objective"], config["optim"]
    record = {"objective": objective["name"], **objective_options(config), "clip_grad": optim["clip_grad"],
              "steps": state["step"], "epochs": optim["epochs"], "batch_size": optim["batch_size"],
              "machines": state.get("machines", [])}
    if objective["name"] != "midol":
        record["routing"] = None
    record["deviations_from_official"] = deviations_from_official(config) if objective["name"] == "midol" else {}
    if "soup" in state:  # training.soup: the teacher averages these checkpoints
        record["soup"] = state["soup"]
        runs = len({item["run"] for item in state["soup"]})
        record["deviations_from_official"]["weight_soup"] = f"{len(state['soup'])} checkpoints of {runs} runs"
    if record["init"]:
        record["init_pretraining"] = state["model_config"].get("pretraining")
    return record


def calibration_images(specs: list[str], max_per_modality: int = 500) -> dict[str, list[np.ndarray]]:
    """Up to ``max_per_modality`` evenly spaced images of every ``MODALITY=PATH`` root (roots of
    one modality share its budget), as (H, W, C) arrays in [0, 1]."""
    by_modality: dict[str, list] = {}
    for spec in specs:
        if "=" not in spec:
            raise DatasetError(f"--calibrate {spec!r}: expected MODALITY=PATH, e.g. oct=data/oct")
        source = open_source(spec, split="train")
        by_modality.setdefault(canonical_modality(source.tag), []).append(source)
    images = {}
    for modality, sources in by_modality.items():
        share = max_per_modality // len(sources)
        images[modality] = [source.read(int(i)) for source in sources
                            for i in np.linspace(0, len(source) - 1, min(len(source), share)).astype(int)]
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("model_dir")
    parser.add_argument("--calibrate", nargs="+", default=None, metavar="MODALITY=PATH",
                        help="labelled roots (training data only) to assign experts to modalities")
    parser.add_argument("--refit-head-norm", action="store_true",
                        help="re-estimate the backbone's last batch norm on the --calibrate images first "
                             "(runs with model.batch_norm: frozen)")
    parser.add_argument("--keep-prototypes", action="store_true", help="keep the prototype layer (to continue training)")
    parser.add_argument("--storage", choices=("fp32", "fp16"), default="fp32",
                        help="fp16 halves the file; refused if embeddings move by more than 1e-3")
    parser.add_argument("--results", default=None, help="results JSON of `python -m benchmarks.evaluate` for the card")
    parser.add_argument("--card-notes", default=None, help="markdown file added to the model card")
    args = parser.parse_args(argv)
    card = {"results": args.results, "card_notes": Path(args.card_notes).read_text() if args.card_notes else None}

    def body() -> None:
        exported = export(args.run_dir, args.model_dir, args.calibrate, args.keep_prototypes, storage=args.storage,
                          refit_head_norm=args.refit_head_norm, **card)
        calibration = exported.model.config.modality_calibration
        print(f"exported {args.run_dir} -> {args.model_dir}; experts: {exported.model.config.expert_modalities}"
              + (f"; routing accuracy: {calibration['accuracy']}" if calibration else "")
              + (f"; fp16 storage moves embeddings by at most {exported.fp16_error:.2e}" if args.storage == "fp16" else ""))

    return run_command("training.export", body, (DatasetError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
