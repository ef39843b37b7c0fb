"""One teacher from several M-IDoL runs that share a start (a model soup, Wortsman et al. 2022):
``python -m training.soup OUT_DIR --run A_3000.pt A_3500.pt ... --run B_3984.pt``.

Each ``--run`` group (checkpoints of one run) is averaged whole; then the groups' backbones are
averaged with equal weight, one vote per run. The MoE head (router, experts, prototypes) comes
from the first group: runs seeded differently learn their experts in different orders, so
averaging their heads would mix unrelated experts. The soup is written to ``OUT_DIR`` as the
first group's last checkpoint with the averaged teacher and a ``soup`` record of its
ingredients (each checkpoint's path, step, seed and ``--run`` index), so ``python -m training.export OUT_DIR MODEL_DIR`` exports it like a run (the
card's lineage lists the ingredients). It is for export only: it cannot be resumed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .learner import TrainingError

BACKBONE = "backbone."
FOR_EXPORT = ("teacher", "config", "model_config", "step", "epoch", "batch_in_epoch")
"""What a soup checkpoint keeps of its template: what ``training.export`` reads (no student or optimizer)."""


def average(states: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The mean of ``states`` at ``keys`` (in float64, stored in each tensor's own dtype); integer
    buffers (batch-norm step counts) are the first state's."""
    return {key: torch.stack([s[key].double() for s in states]).mean(0).to(states[0][key].dtype)
            if states[0][key].is_floating_point() else states[0][key] for key in keys}


def soup_teacher(groups: Sequence[Sequence[Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Teacher state dicts grouped by run -> one: each group's mean, then the groups' backbones
    averaged, the rest (the MoE head) from the first group's mean."""
    means = [average(group, list(group[0])) for group in groups]
    backbone = [key for key in means[0] if key.startswith(BACKBONE)]
    return {**means[0], **average(means, backbone)}


def write_soup(groups: Sequence[Sequence[Path]], out: Path) -> Path:
    """Load the checkpoints of each run in ``groups``, soup their teachers (:func:`soup_teacher`) and
    write the result as ``out/checkpoint-STEP.pt`` (STEP: the first group's last checkpoint's)."""
    if not groups or any(not group for group in groups):
        raise TrainingError("a soup needs at least one checkpoint per --run")
    existing = list_checkpoints(out) if out.is_dir() else []
    if existing:  # saving keeps one checkpoint there: a run's own would be deleted
        raise TrainingError(f"{out} already holds checkpoints ({existing[-1].name}, ...); write the soup to a folder of its own")
    states = [[load_checkpoint(Path(path)) for path in group] for group in groups]
    template = states[0][-1]
    shapes = {key: tuple(value.shape) for key, value in template["teacher"].items()}
    for group, paths in zip(states, groups):
        for state, path in zip(group, paths):
            theirs = {key: tuple(value.shape) for key, value in state["teacher"].items()}
            if theirs != shapes or state["model_config"].get("backbone") != template["model_config"].get("backbone"):
                raise TrainingError(f"{path}: its teacher's architecture differs from {groups[0][-1]}'s; a soup "
                                    "averages checkpoints of one architecture (runs of one config and start)")
    teacher = soup_teacher([[state["teacher"] for state in group] for group in states])
    ingredients = [{"checkpoint": str(path), "run": run, "step": state["step"], "seed": state["config"]["run"]["seed"]}
                   for run, (group, paths) in enumerate(zip(states, groups)) for state, path in zip(group, paths)]
    out.mkdir(parents=True, exist_ok=True)
    payload = {key: template[key] for key in FOR_EXPORT} | {"teacher": teacher, "soup": ingredients}
    return save_checkpoint(out, template["step"], payload, keep=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.soup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="where the soup checkpoint goes (then: python -m training.export OUT_DIR MODEL_DIR)")
    parser.add_argument("--run", nargs="+", action="append", required=True, metavar="CHECKPOINT",
                        help="checkpoints of one run (averaged whole); repeat for each run (backbones averaged)")
    args = parser.parse_args(argv)
    try:
        path = write_soup([[Path(p) for p in group] for group in args.run], Path(args.out_dir))
    except (TrainingError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
