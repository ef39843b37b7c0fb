"""training.soup: each run's checkpoints averaged, then the runs' backbones; the head from the first run."""

from __future__ import annotations

from pathlib import Path

import torch

from training import export, soup
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import load_config

from .helpers import REPO, make_micro

MICRO = REPO / "training" / "configs" / "midol_micro.yaml"


def checkpoint(folder: Path, step: int, seed: int, **overrides) -> Path:
    """A checkpoint as training writes it, holding a seeded random midol-micro as its teacher."""
    folder.mkdir(parents=True, exist_ok=True)
    model = make_micro(seed=seed, **overrides)
    config = load_config(MICRO, [f"run.seed={seed}"])
    payload = {"teacher": model.state_dict(), "student": {}, "learner": {}, "config": config,
               "model_config": model.config.to_dict(), "step": step, "epoch": 0, "batch_in_epoch": step}
    return save_checkpoint(folder, step, payload, keep=10)


def test_a_soup_averages_each_run_then_the_runs_backbones_and_keeps_the_first_runs_head(tmp_path, capsys):
    a1, a2, b = checkpoint(tmp_path / "a", 10, 0), checkpoint(tmp_path / "a", 20, 1), checkpoint(tmp_path / "b", 5, 2)
    assert soup.main([str(tmp_path / "soup"), "--run", str(a1), str(a2), "--run", str(b)]) == 0
    written = tmp_path / "soup" / "checkpoint-00000020.pt"  # the first run's last step
    assert f"wrote {written}" in capsys.readouterr().out
    state = load_checkpoint(written)
    assert set(state) == {*soup.FOR_EXPORT, "soup"}  # no student or optimizer: it exports, it does not resume
    assert [(item["run"], item["step"], item["seed"]) for item in state["soup"]] == [(0, 10, 0), (0, 20, 1), (1, 5, 2)]

    model = export.export(tmp_path / "soup", tmp_path / "model").model
    exported = model.state_dict()
    s0, s1, s2 = (load_checkpoint(p)["teacher"] for p in (a1, a2, b))
    backbone = [k for k in s0 if k.startswith("backbone.") and s0[k].is_floating_point()]
    head = [k for k in s0 if k.startswith("head.") and s0[k].is_floating_point()]
    assert backbone and head
    for key in backbone:  # one vote per run, not per checkpoint
        torch.testing.assert_close(exported[key], ((s0[key] + s1[key]) / 2 + s2[key]) / 2, rtol=0, atol=1e-6)
    for key in head:  # the first run's experts, in its own order
        torch.testing.assert_close(exported[key], (s0[key] + s1[key]) / 2, rtol=0, atol=1e-6)
    assert not torch.allclose(exported[backbone[0]], (s0[backbone[0]] + s1[backbone[0]]) / 2)
    record = model.config.pretraining
    assert record["steps"] == 20 and [item["checkpoint"] for item in record["soup"]] == [str(a1), str(a2), str(b)]
    assert record["deviations_from_official"]["weight_soup"] == "3 checkpoints of 2 runs"
    assert "weight_soup=3 checkpoints of 2 runs" in (tmp_path / "model" / "README.md").read_text()


def test_a_soup_of_two_architectures_is_refused_by_name(tmp_path, capsys):
    mine, other = checkpoint(tmp_path / "a", 10, 0), checkpoint(tmp_path / "b", 10, 1, num_experts=3)
    assert soup.main([str(tmp_path / "soup"), "--run", str(mine), "--run", str(other)]) == 2
    error = capsys.readouterr().err
    assert f"error: {other}: its teacher's architecture differs from {mine}'s" in error
    assert not (tmp_path / "soup").exists()
    assert soup.main([str(tmp_path / "a"), "--run", str(mine)]) == 2  # into a run's folder: its checkpoints stay
    assert f"{tmp_path / 'a'} already holds checkpoints (checkpoint-00000010.pt, ...)" in capsys.readouterr().err
    assert mine.exists()
    assert soup.main([str(tmp_path / "soup"), "--run", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
