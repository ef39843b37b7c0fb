"""Export a run's teacher as a midol_hub model: ``python -m training.export RUN_DIR MODEL_DIR``.

``--calibrate TAG=PATH ...`` routes labelled images (one root per modality) through the
teacher, assigns experts to modalities by maximising routing mass (Hungarian assignment),
and stores the mapping and each modality's routing purity in the model's config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from midol_hub import MIDoLConfig, MIDoLModel, canonical_modality
from midol_hub.modalities import MODALITIES, SHARED
from midol_hub.image_io import RawImage
from midol_hub.preprocessing import Preprocessor, WarningCollector

from .checkpoint import list_checkpoints, load_checkpoint
from .data import DataError, open_source


def export(run_dir: str | Path, model_dir: str | Path, calibrate: list[str] | None = None, keep_prototypes: bool = False,
           max_per_modality: int = 500) -> MIDoLModel:
    """Write the last checkpoint's teacher to ``model_dir``; optionally calibrate its experts."""
    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if not checkpoints:
        raise DataError(f"{run_dir} holds no checkpoint-*.pt; pass the --output-dir of a training run")
    state = load_checkpoint(checkpoints[-1])
    fields = dict(state["model_config"])
    fields.pop("transformers_version", None)
    config = MIDoLConfig(**{**fields, "drop_path_rate": 0.0})
    trained = MIDoLModel(config)
    trained.load_state_dict(state["teacher"])
    config_out = MIDoLConfig(**{**fields, "drop_path_rate": 0.0, "keep_prototypes": keep_prototypes})
    model = MIDoLModel(config_out)
    model.load_state_dict(trained.state_dict(), strict=not (config.keep_prototypes and not keep_prototypes))
    model.eval()
    if calibrate:
        calibrate_experts(model, calibrate, max_per_modality)
    model.save_pretrained(model_dir)
    return model


@torch.no_grad()
def calibrate_experts(model: MIDoLModel, specs: list[str], max_per_modality: int = 500) -> dict:
    """Assign experts to the tagged modalities by Hungarian assignment on routing mass."""
    if model.config.expert_modalities == [SHARED]:
        raise DataError("a one-expert (dino objective) model has no experts to calibrate")
    preprocessor, collector = Preprocessor(model.config.profile("auto")), WarningCollector()
    modalities, mass, chosen = [], [], []
    for spec in specs:
        if "=" not in spec:
            raise DataError(f"--calibrate {spec!r}: expected MODALITY=PATH, e.g. oct=data/oct")
        source = open_source(spec, split="train")
        modalities.append(canonical_modality(source.tag))
        pick = np.linspace(0, len(source) - 1, min(len(source), max_per_modality)).astype(int)
        raws = [RawImage(source.read(int(i)), source.name(int(i))) for i in pick]
        probs = torch.cat([
            model(preprocessor.from_raw(raws[i : i + 64], collector)).routing_logits.softmax(-1)
            for i in range(0, len(raws), 64)
        ])
        mass.append(probs.sum(0).numpy())
        chosen.append(probs.argmax(-1).numpy())
    collector.emit()
    if len(set(modalities)) != len(modalities):
        raise DataError(f"--calibrate names a modality twice: {modalities}")
    rows, cols = linear_sum_assignment(-np.stack(mass))
    assignment = {modalities[r]: int(c) for r, c in zip(rows, cols)}
    free = [m for m in MODALITIES if m not in assignment]
    experts = [None] * model.config.num_experts
    for modality, expert in assignment.items():
        experts[expert] = modality
    for index in range(len(experts)):
        experts[index] = experts[index] or free.pop(0)
    purity = {m: float((chosen[i] == assignment[m]).mean()) for i, m in enumerate(modalities) if m in assignment}
    model.config.expert_modalities = experts
    model.config.modality_calibration = {"purity": purity, "images_per_modality": {
        m: int(len(chosen[i])) for i, m in enumerate(modalities)}}
    return model.config.modality_calibration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("model_dir")
    parser.add_argument("--calibrate", nargs="+", default=None, metavar="MODALITY=PATH",
                        help="labelled roots (training data only) to assign experts to modalities")
    parser.add_argument("--keep-prototypes", action="store_true", help="keep the prototype layer (to continue training)")
    args = parser.parse_args(argv)
    try:
        model = export(args.run_dir, args.model_dir, args.calibrate, args.keep_prototypes)
    except (DataError, ValueError) as error:
        print(f"training.export: error: {error}", file=sys.stderr)
        return 1
    calibration = model.config.modality_calibration
    print(f"exported {args.run_dir} -> {args.model_dir}; experts: {model.config.expert_modalities}"
          + (f"; purity: {calibration['purity']}" if calibration else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
