"""The optimisation step's official details: per-parameter clipping, weight-decay groups, options."""

from __future__ import annotations

import pytest
import torch

from training.config import load_config
from training.learner import Learner, TrainingError, clip_each_parameter, param_groups
from training.losses import KoLeoLoss
from training.pretrain import build_models


def test_each_parameter_is_clipped_on_its_own():
    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    big.grad = torch.tensor([3.0, 4.0, 0.0, 12.0])  # norm 13
    small.grad = torch.tensor([1.0, 2.0, 2.0])  # norm 3 exactly: untouched (up to the 1e-6 guard)
    clip_each_parameter([big, small], 3.0)
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-6)
    torch.testing.assert_close(big.grad, torch.tensor([3.0, 4.0, 0.0, 12.0]) * 3 / 13)
    torch.testing.assert_close(small.grad, torch.tensor([1.0, 2.0, 2.0]), rtol=1e-6, atol=0)
    # a global clip to 3 would have shrunk the small gradient too
    joint = torch.nn.utils.get_total_norm([torch.tensor([3.0, 4.0, 0.0, 12.0]), torch.tensor([1.0, 2.0, 2.0])])
    assert joint.item() > 13


def micro_learner(*overrides: str) -> Learner:
    config = load_config(None, ["model.arch=midol-micro", "model.num_prototypes=64", "optim.precision=fp32", *overrides])
    torch.manual_seed(0)
    student, teacher = build_models(config, torch.device("cpu"))
    return Learner(config, student, teacher, torch.device("cpu"))


def test_official_defaults_decay_matrices_only_and_train_the_teacher_mode():
    learner = micro_learner()
    decay, no_decay = param_groups(learner.student)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    table = learner.student.backbone.layers[0].blocks[0].attn.relative_position_bias_table
    assert any(p is table for p in decay["params"])  # official DINO groups decay every matrix
    assert learner.teacher.training and learner.student.head.top_k == 4 and learner.student.head.gate_noise == 1.0
    assert learner.loss.route.form == "official" and learner.clip_mode == "per_param"


def test_one_step_with_each_clip_mode_runs_and_moves_the_teacher():
    for mode in ("per_param", "global"):
        learner = micro_learner(f"optim.clip_mode={mode}", "optim.clip_grad=0.01")
        learner.set_schedules(lr=1e-3, weight_decay=0.04)
        before = learner.teacher.head.router.weight.clone()
        crops = [torch.randn(4, 3, 64, 64) for _ in range(4)]
        result = learner.step([crops], teacher_temp=0.04, momentum=0.5, freeze_last_layer=False)
        assert result.route_loss > 0 and result.distill_loss > 0
        assert (learner.teacher.head.router.weight - before).abs().max() > 0


def test_unknown_options_are_named():
    with pytest.raises(TrainingError, match="optim.clip_mode must be one of per_param, global"):
        micro_learner("optim.clip_mode=layerwise")
    with pytest.raises(ValueError, match="official, balanced"):
        micro_learner("objective.routing=soft")


def test_koleo_weight_adds_koleo_on_the_global_crops_to_the_loss():
    plain = micro_learner()
    plain.set_schedules(lr=1e-3, weight_decay=0.04)
    crops = [torch.randn(4, 3, 64, 64) for _ in range(4)]
    assert plain.step([crops], teacher_temp=0.04, momentum=0.5, freeze_last_layer=False).koleo_loss == 0.0
    learner = micro_learner("objective.koleo_weight=0.5", "model.drop_path_rate=0")  # a deterministic student backbone
    learner.set_schedules(lr=1e-3, weight_decay=0.04)
    with torch.no_grad():  # KoLeo of each global crop's pooled batch, summed; the local crops take no part
        expected = sum(KoLeoLoss()(learner.student(crop).pooled) for crop in crops[:2]).item()
    torch.manual_seed(1)
    result = learner.step([crops], teacher_temp=0.04, momentum=0.5, freeze_last_layer=False)
    assert result.koleo_loss == pytest.approx(expected, rel=1e-4) and expected > 0
    assert result.loss == pytest.approx(result.route_loss + result.distill_loss + 0.5 * result.koleo_loss, rel=1e-5)
    with pytest.raises(TrainingError, match="objective.koleo_weight must be >= 0, got -0.1"):
        micro_learner("objective.koleo_weight=-0.1")


def test_preserve_start_weight_ties_the_student_to_a_frozen_copy_of_its_start():
    learner = micro_learner("objective.preserve_start_weight=0.5", "model.drop_path_rate=0")
    learner.set_schedules(lr=1e-3, weight_decay=0.04)
    start = {k: v.clone() for k, v in learner.student.backbone.state_dict().items()}
    crops = [torch.randn(4, 3, 64, 64) for _ in range(4)]
    first = learner.step([crops], teacher_temp=0.04, momentum=0.5, freeze_last_layer=False)
    assert first.preserve_loss < 1e-6  # the student is its start, the map the identity
    with torch.no_grad():  # on the global crops: the map of the student's pooled feature against the start's
        globals_ = torch.cat(crops[:2])
        expected = learner.preserve(learner.student(globals_).pooled,
                                    learner.start.backbone.forward_head(learner.start.backbone.forward_features(globals_),
                                                                        pre_logits=True)).item()
    second = learner.step([crops], teacher_temp=0.04, momentum=0.5, freeze_last_layer=False)
    assert second.preserve_loss == pytest.approx(expected, rel=1e-4) and expected > 1e-5
    assert second.loss == pytest.approx(second.route_loss + second.distill_loss + 0.5 * second.preserve_loss, rel=1e-5)
    assert all(torch.equal(v, start[k]) for k, v in learner.start.backbone.state_dict().items())  # the start stays as it was
    assert not torch.equal(learner.preserve.predictor.weight, torch.eye(learner.student.backbone.num_features))
    assert (learner.student.backbone.norm.weight - start["norm.weight"]).abs().max() > 1e-5  # the student moved
    with pytest.raises(TrainingError, match="objective.preserve_start_weight must be >= 0, got -1"):
        micro_learner("objective.preserve_start_weight=-1")
