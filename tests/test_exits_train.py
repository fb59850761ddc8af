"""Multi-exit training strategies and calibrated checkpoints (tiny models, synthetic data)."""

from __future__ import annotations

import pytest
import torch

from edgeweave.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from edgeweave.data import load_dataset
from edgeweave.exits.calibrate import calibrate
from edgeweave.exits.ondemand import OnDemandModel, calibrate_checkpoint, points_from_extra
from edgeweave.exits.train import plan_phases, train_multi_exit
from edgeweave.models import build_model

torch.set_num_threads(1)
KW = {"width": 4, "head_hidden": 8}


def _bundle():
    return load_dataset("synthetic", input_size=28, in_channels=1, num_classes=4, samples=320, noise=2.0)


def _model():
    torch.manual_seed(0)
    return build_model("multi_exit_small", num_classes=4, in_channels=1, **KW)


def test_phase_plans():
    assert [(p.exits, p.frozen_segments, p.train_segments) for p in plan_phases("sync", 3)] == [([0, 1, 2], 0, [0, 1, 2])]
    assert plan_phases("sync", 3)[0].weights == pytest.approx([0.2, 0.2, 0.6])
    assert [(p.exits, p.frozen_segments, p.train_segments) for p in plan_phases("async", 3)] == [
        ([2], 0, [0, 1, 2]), ([0, 1], 2, [])]
    assert [(p.exits, p.frozen_segments, p.train_segments) for p in plan_phases("async_back", 3)] == [
        ([0], 0, [0]), ([1], 1, [1]), ([2], 2, [2])]


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["async", "async_back"])
def test_frozen_parts_keep_weights_and_bn_statistics(strategy, monkeypatch):
    """The second phase of async must not move the trunk (weights or BN running stats); each
    async_back phase must not move the segments before it."""
    import edgeweave.training.loop as loop

    b, m = _bundle(), _model()
    snapshots = []
    real_fit = loop.fit

    def spy_fit(model, *a, **kw):
        snapshots.append([_state(s) for s in model.segments])
        r = real_fit(model, *a, **kw)
        snapshots.append([_state(s) for s in model.segments])
        return r

    monkeypatch.setattr(loop, "fit", spy_fit)
    teacher = build_model("small_cnn", num_classes=4, in_channels=1, width=2)
    train_multi_exit(m, b, strategy=strategy, epochs=1, lr=0.05, batch_size=32, progress=False, teacher=teacher,
                     distance="ws")
    phases = plan_phases(strategy, 3)
    for i, ph in enumerate(phases):
        before, after = snapshots[2 * i], snapshots[2 * i + 1]
        for j in range(3):
            if j < ph.frozen_segments:
                assert _same(before[j], after[j]), f"phase {i} moved frozen segment {j}"
        for j in ph.train_segments:
            assert not _same(before[j], after[j]), f"phase {i} did not train segment {j}"


def test_sync_training_writes_a_rebuildable_checkpoint(tmp_path):
    b, m = _bundle(), _model()
    spec = ModelSpec("multi_exit_small", 4, 1, (28, 28), dict(KW))
    r = train_multi_exit(m, b, strategy="sync", epochs=1, lr=0.05, batch_size=32, progress=False,
                         out_dir=tmp_path, spec=spec)
    assert len(r.exit_accuracies) == 3
    m2, spec2, extra = load_checkpoint(r.checkpoint)
    assert extra["exits_training"]["strategy"] == "sync"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert all(torch.allclose(a, c) for a, c in zip(m.eval().forward_all(x), m2.forward_all(x)))


def test_reloaded_checkpoint_gives_the_same_operating_points(tmp_path):
    b, m = _bundle(), _model()
    train_multi_exit(m, b, strategy="sync", epochs=1, lr=0.05, batch_size=32, progress=False)
    path = save_checkpoint(tmp_path / "s.safetensors", m, ModelSpec("multi_exit_small", 4, 1, (28, 28), dict(KW)))
    grid = [[0.5, 0.25], [0.8, 0.1]]
    points, target = calibrate_checkpoint(path, b, grid=grid, limit=30)
    assert target == path and len(points) == 3 + len(grid)
    # stored points come back exactly
    model2, _, extra = load_checkpoint(path)
    stored = points_from_extra(extra)
    assert [p.to_dict() for p in stored] == [p.to_dict() for p in points]
    assert extra["exits"]["measured_on"]["samples"] == 30
    # re-measuring the reloaded model reproduces every point (latency aside: it is a measurement)
    again = calibrate(model2, b.val, b.val, grid=grid, limit=30)
    for p, q in zip(points, again):
        assert (p.name, p.thresholds, p.accuracy, p.exit_proportions, p.voted_fraction) == \
               (q.name, q.thresholds, q.accuracy, q.exit_proportions, q.voted_fraction)
        assert p.mean_ms > 0 and p.p95_ms >= p.mean_ms * 0.5 and p.peak_memory_bytes > 0
    # the on-demand API answers from the stored points
    od = OnDemandModel.load(path)
    fastest = min(points, key=lambda p: p.p95_ms)
    res = od.predict(torch.randn(3, 1, 28, 28), latency_budget_ms=fastest.p95_ms)
    assert res.choice.satisfied and res.labels.shape == (3,)
    res = od.predict(torch.randn(1, 1, 28, 28), latency_budget_ms=fastest.p95_ms / 1000)
    assert not res.choice.satisfied and res.choice.point.name == fastest.name
