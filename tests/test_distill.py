"""Distillation losses: values against direct computations, T^2 scaling, and gradient flow
(the original EdgeKE computed its distances in NumPy/SciPy, so no gradient reached the student)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeweave.compress.distill import (
    DISTANCES,
    distillation_loss,
    js_divergence,
    kl_divergence,
    make_distill_loss_fn,
    soft_loss,
    wasserstein_1d,
)
from edgeweave.errors import EdgeweaveError

P = [0.5, 0.3, 0.2]
Q = [0.1, 0.6, 0.3]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_kl_matches_direct_formula():
    got = kl_divergence(torch.tensor([P]), torch.tensor([Q])).item()
    assert got == pytest.approx(_kl(P, Q), rel=1e-5)
    assert kl_divergence(torch.tensor([P]), torch.tensor([P])).item() == pytest.approx(0.0, abs=1e-7)


def test_js_matches_direct_formula_and_is_symmetric():
    m = [(a + b) / 2 for a, b in zip(P, Q)]
    want = 0.5 * _kl(P, m) + 0.5 * _kl(Q, m)
    assert js_divergence(torch.tensor([P]), torch.tensor([Q])).item() == pytest.approx(want, rel=1e-5)
    assert js_divergence(torch.tensor([Q]), torch.tensor([P])).item() == pytest.approx(want, rel=1e-5)
    # disjoint supports reach the upper bound log 2
    assert js_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(math.log(2), rel=1e-5)


def test_wasserstein_matches_scipy_on_class_indices():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    p = F.softmax(torch.randn(4, 7, generator=g), -1)
    q = F.softmax(torch.randn(4, 7, generator=g), -1)
    want = sum(scipy_stats.wasserstein_distance(range(7), range(7), p[i].numpy(), q[i].numpy()) for i in range(4)) / 4
    assert wasserstein_1d(p, q).item() == pytest.approx(want, rel=1e-5)
    # moving all mass from class 0 to class 3 costs 3
    assert wasserstein_1d(torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1.0]])).item() == pytest.approx(3.0)


@pytest.mark.parametrize("distance", DISTANCES)
def test_soft_loss_is_t_squared_times_distance_of_softened_outputs(distance):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    T = 3.0
    fn = {"kl": kl_divergence, "js": js_divergence, "ws": wasserstein_1d}[distance]
    want = T * T * fn(F.softmax(t / T, -1), F.softmax(s / T, -1))
    assert soft_loss(s, t, distance, T).item() == pytest.approx(want.item(), rel=1e-5)
    total = distillation_loss(s, t, torch.zeros(5, dtype=torch.long), distance=distance, temperature=T, beta=0.5)
    assert total.item() == pytest.approx(F.cross_entropy(s, torch.zeros(5, dtype=torch.long)).item() + 0.5 * want.item(), rel=1e-5)


@pytest.mark.parametrize("distance", DISTANCES)
def test_distillation_term_changes_student_gradients(distance):
    torch.manual_seed(0)
    student = nn.Linear(6, 5)
    teacher = nn.Linear(6, 5)
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))

    def grads(beta):
        student.zero_grad()
        make_distill_loss_fn(teacher, distance=distance, temperature=2.0, beta=beta)(student, x, y).backward()
        return student.weight.grad.clone()

    g_ce, g_kd = grads(0.0), grads(1.0)
    assert not torch.allclose(g_ce, g_kd), "the distillation term did not reach the student's gradients"
    # the soft term alone has a non-zero gradient, and none reaches the teacher
    student.zero_grad()
    soft_loss(student(x), teacher(x), distance, 2.0).backward()
    assert student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None


def test_unknown_distance_and_bad_temperature_are_user_errors():
    with pytest.raises(EdgeweaveError):
        soft_loss(torch.zeros(1, 3), torch.zeros(1, 3), "l2")
    with pytest.raises(EdgeweaveError):
        soft_loss(torch.zeros(1, 3), torch.zeros(1, 3), "kl", temperature=0)


def test_distill_trains_with_the_shared_loop(tmp_path):
    from edgeweave.checkpoint import ModelSpec, load_checkpoint
    from edgeweave.compress.distill import distill
    from edgeweave.data import load_dataset
    from edgeweave.models import build_model

    torch.set_num_threads(1)
    b = load_dataset("synthetic", input_size=8, in_channels=1, num_classes=4, samples=128)
    teacher = build_model("small_cnn", num_classes=4, in_channels=1, width=4)
    student = build_model("small_cnn", num_classes=4, in_channels=1, width=2)
    before = [p.detach().clone() for p in student.parameters()]
    spec = ModelSpec("small_cnn", 4, 1, (8, 8), {"width": 2})
    r = distill(teacher, student, b, epochs=1, distance="js", lr=0.05, batch_size=32, out_dir=tmp_path, spec=spec,
                progress=False)
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
    _, _, extra = load_checkpoint(r.checkpoint)
    assert extra["distillation"]["distance"] == "js"


def test_cached_teacher_returns_the_teachers_outputs_and_computes_each_sample_once():
    from edgeweave.compress.distill import CachedTeacher

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 5))
    teacher.eval()
    cached = CachedTeacher(teacher)
    x = torch.randn(10, 6)
    first = cached(x[:6])
    mixed = cached(x[3:10])  # 3 cached rows, 4 new
    assert torch.allclose(first, teacher(x[:6]), atol=1e-6)
    assert torch.allclose(mixed, teacher(x[3:10]), atol=1e-6)
    assert (cached.hits, cached.misses) == (3, 10)
    cached.train()
    assert not cached.teacher.training
    # gradients of a student distilled through the cache equal those through the raw teacher
    student = nn.Linear(6, 5)
    y = torch.randint(0, 5, (10,))
    g = []
    for t in (teacher, cached):
        student.zero_grad()
        make_distill_loss_fn(t, distance="kl", temperature=2.0)(student, x, y).backward()
        g.append(student.weight.grad.clone())
    assert torch.allclose(g[0], g[1], atol=1e-6)
