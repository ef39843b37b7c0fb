"""The two objectives against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import torch

from training.losses import DINOLoss, RoutingConsistencyLoss, sinkhorn_knopp


def softmax(values, temp):
    exps = [math.exp(v / temp) for v in values]
    return [e / sum(exps) for e in exps]


def cross_entropy(target, logits, temp):
    log_z = math.log(sum(math.exp(v / temp) for v in logits))
    return -sum(t * (v / temp - log_z) for t, v in zip(target, logits))


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
    q = np.exp(logits / eps).T
    q /= q.sum()
    experts, batch = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * experts
        q /= q.sum(axis=0, keepdims=True) * batch
    return (q * batch).T


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


def test_routing_loss_matches_hand_computation():
    teacher = torch.tensor([[0.2, 0.1], [0.0, 0.3], [0.1, 0.1], [0.3, 0.0]])  # 2 global views x batch 2, E = 2
    student = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.2, 0.1], [0.1, 0.3], [0.0, 0.0], [0.3, 0.1]])  # 3 views
    targets = [numpy_sinkhorn(t.numpy().astype(np.float64), 0.05, 3) for t in teacher.chunk(2)]
    views = [v.tolist() for v in student.chunk(3)]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(
        np.mean([cross_entropy(targets[t][b], views[s][b], 0.1) for b in range(2)]) for t, s in pairs
    ) / len(pairs)
    loss = RoutingConsistencyLoss(student_temp=0.1, eps=0.05, iterations=3)(student, teacher, num_crops=3)
    assert abs(loss.item() - expected) < 1e-4


def test_routing_loss_pulls_the_student_toward_balance():
    torch.manual_seed(1)
    student = torch.randn(4 * 16, 3, requires_grad=True)
    teacher = torch.randn(2 * 16, 3)
    teacher[:, 0] += 2.0
    loss = RoutingConsistencyLoss()(student, teacher, num_crops=4)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
