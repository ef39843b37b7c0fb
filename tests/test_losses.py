"""The objectives: the official M-IDoL loss reproduced from its fixture, and both loss terms
against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import DINOLoss, FeaturePreservationLoss, KoLeoLoss, MIDoLLoss, RoutingLoss, sinkhorn_knopp


def softmax(values, temp):
    exps = [math.exp(v / temp) for v in values]
    return [e / sum(exps) for e in exps]


def cross_entropy(target, logits, temp):
    log_z = math.log(sum(math.exp(v / temp) for v in logits))
    return -sum(t * (v / temp - log_z) for t, v in zip(target, logits))


@pytest.fixture(scope="module")
def official_cases(data_root) -> list[dict]:
    path = data_root.parent / "fixtures" / "official_loss_cases.pt"
    if not path.is_file():
        pytest.fail(f"the official loss fixture is missing at {path}")
    return torch.load(path, weights_only=True)


def test_midol_loss_reproduces_every_official_case(official_cases):
    assert len(official_cases) == 6
    for case in official_cases:
        loss = MIDoLLoss(case["center"].shape[1], case["ncrops"], case["teacher_temp"], case["student_temp"],
                         case["route_student_temp"], case["center_momentum"], case["sinkhorn_eps"], case["sinkhorn_iters"])
        loss.center.copy_(case["center"])
        total, route, distill = loss(case["student_out"], case["teacher_out"], case["student_logits"], case["teacher_logits"])
        for ours, key in ((total, "total"), (route, "route_loss"), (distill, "distill_loss")):
            assert ours.item() == pytest.approx(float(case[key]), rel=1e-4), (case["seed"], key)
        torch.testing.assert_close(loss.center, case["center_after"], rtol=1e-4, atol=1e-6)


def test_teacher_temp_argument_overrides_the_constructor(official_cases):
    case = official_cases[0]
    args = (case["student_out"], case["teacher_out"], case["student_logits"], case["teacher_logits"])
    sharp = MIDoLLoss(case["center"].shape[1], 4, teacher_temp=0.04)
    soft = MIDoLLoss(case["center"].shape[1], 4, teacher_temp=0.07)
    overridden = MIDoLLoss(case["center"].shape[1], 4, teacher_temp=0.04)
    for module in (sharp, soft, overridden):
        module.center.copy_(case["center"])
    expected = soft(*args)
    assert [t.item() for t in overridden(*args, teacher_temp=0.07)] == [t.item() for t in expected]
    assert sharp(*args)[0].item() != pytest.approx(expected[0].item(), rel=1e-3)


def test_route_weight_zero_is_plain_dino(official_cases):
    case = official_cases[1]
    loss = MIDoLLoss(case["center"].shape[1], 4, route_weight=0.0)
    loss.center.copy_(case["center"])
    total, route, distill = loss(case["student_out"], case["teacher_out"], case["student_logits"], case["teacher_logits"])
    assert route.item() == 0.0 and total.item() == pytest.approx(float(case["distill_loss"]), rel=1e-5)


def test_dino_loss_matches_hand_computation_and_updates_the_centre():
    teacher = [[0.1, 0.0], [0.0, 0.2]]  # two global views, batch of one, K = 2
    student = [[0.0, 0.1], [0.2, 0.0], [0.1, 0.1]]  # two global + one local view
    q = [softmax(t, 0.04) for t in teacher]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # teacher view, student view; same-view pairs skipped
    expected = sum(cross_entropy(q[t], student[s], 0.1) for t, s in pairs) / len(pairs)
    loss_fn = DINOLoss(out_dim=2, student_temp=0.1, center_momentum=0.9)
    loss = loss_fn(torch.tensor(student), torch.tensor(teacher), num_crops=3, teacher_temp=0.04)
    assert abs(loss.item() - expected) < 1e-5
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.1 * 0.05, 0.1 * 0.1]]))
    # the centre is subtracted from the teacher next time: with teacher == centre, targets are uniform
    loss_fn.center.copy_(torch.tensor([[0.1, 0.0]]))
    uniform = sum(cross_entropy([0.5, 0.5], student[s], 0.1) for _, s in pairs) / len(pairs)
    loss = loss_fn(torch.tensor(student), torch.tensor([[0.1, 0.0], [0.1, 0.0]]), num_crops=3, teacher_temp=0.04)
    assert abs(loss.item() - uniform) < 1e-5


def numpy_sinkhorn(logits: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """The official procedure in float64: values are floored at 1e-12 after exp, after every
    iteration and at the end, which matters for sharp (divided by 0.04) logits."""
    q = np.maximum(np.exp((logits - logits.max(axis=1, keepdims=True)) / eps).T, 1e-12)
    q /= q.sum()
    experts, batch = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * experts
        q /= q.sum(axis=0, keepdims=True) * batch
        q = np.maximum(q, 1e-12)
    q = np.maximum((q * batch).T, 1e-12)
    return q / q.sum(axis=1, keepdims=True)


def test_sinkhorn_matches_a_plain_numpy_version():
    logits = np.array([[0.2, 0.1, -0.1], [0.3, 0.0, 0.1], [0.25, -0.2, 0.0], [0.1, 0.05, 0.02]])
    ours = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), eps=0.05, iterations=3).double().numpy()
    np.testing.assert_allclose(ours, numpy_sinkhorn(logits, 0.05, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_rows_sum_to_one_and_experts_share_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(120, 5) * 0.05
    logits[:, 0] += 0.5  # the raw router prefers expert 0 for every image
    assert torch.bincount(logits.argmax(-1), minlength=5)[0] == 120
    balanced = sinkhorn_knopp(logits, eps=0.05, iterations=3)
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(120))
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((5,), 24.0), rtol=0.02, atol=0.0)
    assert not balanced.requires_grad


def routing_case():
    teacher = torch.tensor([[0.2, 0.1], [0.0, 0.3], [0.1, 0.1], [0.3, 0.0]])  # 2 global views x batch 2, E = 2
    student = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.2, 0.1], [0.1, 0.3], [0.0, 0.0], [0.3, 0.1]])  # 3 views
    return teacher, student, [(0, 1), (0, 2), (1, 0), (1, 2)]


def test_balanced_routing_loss_matches_hand_computation():
    teacher, student, pairs = routing_case()
    targets = [numpy_sinkhorn(t.numpy().astype(np.float64), 0.05, 3) for t in teacher.chunk(2)]
    views = [v.tolist() for v in student.chunk(3)]
    expected = sum(
        np.mean([cross_entropy(targets[t][b], views[s][b], 0.1) for b in range(2)]) for t, s in pairs
    ) / len(pairs)
    loss = RoutingLoss("balanced", student_temp=0.1, eps=0.05, iterations=3)(student, teacher, 3, teacher_temp=0.04)
    assert abs(loss.item() - expected) < 1e-4


def test_official_routing_loss_weights_the_log_target_by_the_student():
    teacher, student, pairs = routing_case()
    targets = [numpy_sinkhorn(t.numpy().astype(np.float64) / 0.04, 0.05, 3) for t in teacher.chunk(2)]
    views = [v.tolist() for v in student.chunk(3)]
    expected = sum(
        np.mean([-sum(a * math.log(q) for a, q in zip(softmax(views[s][b], 0.1), targets[t][b]))
                 for b in range(2)])
        for t, s in pairs
    ) / len(pairs)
    loss = RoutingLoss("official", student_temp=0.1, eps=0.05, iterations=3)(student, teacher, 3, teacher_temp=0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("form", ["official", "balanced"])
def test_routing_gradient_moves_the_student_toward_the_target_argmax(form):
    torch.manual_seed(1)
    teacher = torch.randn(2 * 16, 3)
    student = torch.zeros(4 * 16, 3, requires_grad=True)
    RoutingLoss(form)(student, teacher, num_crops=4, teacher_temp=0.04).backward()
    targets = torch.cat(RoutingLoss(form).targets(teacher, 0.04))
    # a step against the gradient raises the student's logit of the target's argmax expert for view 3
    view = student.grad[2 * 16: 3 * 16]
    picked = -view.gather(1, targets[:16].argmax(-1, keepdim=True))
    assert (picked > 0).float().mean() > 0.9


def test_unknown_routing_form_is_named():
    with pytest.raises(ValueError, match="official, balanced"):
        RoutingLoss("soft")


def test_koleo_is_minus_the_mean_log_nearest_distance_on_the_sphere():
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3  # norm does not matter
    assert KoLeoLoss()(square).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    pair_close = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]])  # nearest distances 0.0998, 0.0998, 1.9950
    near = 2 * math.sin(math.atan(0.1) / 2)
    expected = -(2 * math.log(near) + math.log(2 * math.cos(math.atan(0.1) / 2))) / 3
    assert KoLeoLoss()(pair_close).item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match=r"batch >= 2, dim\) tensor, got shape \(1, 8\)"):
        KoLeoLoss()(torch.ones(1, 8))


def test_koleo_gradient_spreads_a_narrowed_batch():
    torch.manual_seed(0)
    features = (torch.tensor([1.0] + [0.0] * 15) + 0.05 * torch.randn(32, 16)).requires_grad_()
    optimiser = torch.optim.SGD([features], lr=0.05)

    def nearest_distance() -> float:
        unit = torch.nn.functional.normalize(features.detach(), dim=-1)
        return torch.cdist(unit, unit).fill_diagonal_(9.0).min(dim=1).values.mean().item()

    before = nearest_distance()
    for _ in range(100):
        optimiser.zero_grad()
        KoLeoLoss()(features).backward()
        optimiser.step()
    assert nearest_distance() > 3 * before


def test_feature_preservation_is_two_minus_twice_the_cosine_after_the_linear_map():
    loss = FeaturePreservationLoss(2)  # the map starts as the identity
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    start = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])  # cosines 0, 1/sqrt 2, 1
    assert loss(student, start).item() == pytest.approx((2 + (2 - math.sqrt(2)) + 0) / 3, abs=1e-6)
    with pytest.raises(ValueError, match=r"two \(batch, 2\) tensors, got \(3, 2\) and \(3, 4\)"):
        loss(student, torch.ones(3, 4))


def test_feature_preservation_learns_the_map_and_passes_no_gradient_to_the_start():
    torch.manual_seed(0)
    student = torch.randn(64, 8)
    rotation = torch.linalg.qr(torch.randn(8, 8))[0]
    start = (student @ rotation).requires_grad_()  # the same information, in other coordinates
    loss = FeaturePreservationLoss(8)
    optimiser = torch.optim.Adam(loss.parameters(), lr=0.02)
    before = loss(student, start).item()
    for _ in range(300):
        optimiser.zero_grad()
        value = loss(student, start)
        value.backward()
        optimiser.step()
    assert before > 0.5 and loss(student, start).item() < 0.01
    assert start.grad is None
