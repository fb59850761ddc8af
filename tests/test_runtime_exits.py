"""Early exits over the cluster (runtime/exits.py) with real follower processes: every exit's
output equals the single-device multi-exit model's, a frame that exits early never starts the
later segments' plans, and operating points get latencies for this cluster."""

from __future__ import annotations

import pytest
import torch

from edgeweave.exits.calibrate import OperatingPoint
from edgeweave.exits.inference import early_exit, forced_exit_thresholds
from edgeweave.runtime.exits import ClusterExits
from edgeweave.runtime.leader import LocalCluster
from edgeweave.runtime.run import compare, load_for_run

pytestmark = pytest.mark.timeout(300)

SIZE = 32


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, spec = load_for_run("multi_exit_resnet18", SIZE)
    with LocalCluster(3, timeout_s=60) as cl:
        cl.load_model(model, spec)
        ce = ClusterExits(cl, model, (1, 3, SIZE, SIZE), model_name="multi_exit_resnet18")
        yield cl, model, ce


def _x(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_every_exit_equals_the_single_device_model(setup):
    cl, model, ce = setup
    assert ce.num_exits >= 2 and len(ce.pids) == ce.num_exits
    assert all(p.devices == cl.names for p in ce.plans)  # every segment spread over every device
    assert any(s.kind == "spatial" for s in ce.plans[0].stages)
    x = _x(1)
    with torch.no_grad():
        refs = model.forward_all(x)
    for k in range(ce.num_exits):
        ans = ce.infer(x, forced_exit_thresholds(ce.num_exits, k))
        assert ans.exit_index == k and len(ans.segment_s) == k + 1  # later segments never ran
        for j, z in enumerate(ans.logits):
            assert float(refs[j].std()) > 1e-4, "degenerate reference proves nothing"
            assert compare(z, refs[j])["rel_err"] <= 1e-5, (k, j)


def test_thresholds_answer_as_early_exit_on_one_device(setup):
    _cl, model, ce = setup
    g = torch.Generator().manual_seed(7)
    for i in range(6):
        x = _x(10 + i)
        thr = [float(v) for v in torch.rand(ce.num_exits, generator=g)]
        ans = ce.infer(x, thr)
        ref = early_exit(model, x, thr)
        assert ans.exit_index == int(ref.exit_index[0]) and ans.voted == bool(ref.voted[0])
        assert torch.allclose(ans.probs, ref.probs, atol=1e-5)


def test_operating_points_are_priced_on_the_cluster(setup):
    _cl, _model, ce = setup
    secs = ce.segment_seconds()
    assert len(secs) == ce.num_exits and all(s > 0 for s in secs)
    k = ce.num_exits
    early = OperatingPoint("early", [0.0] * k, 0.5, 1.0, 1.0, [1.0] + [0.0] * (k - 1), 0.0, 0)
    late = OperatingPoint("late", [2.0] * k, 0.9, 1.0, 1.0, [0.0] * (k - 1) + [1.0], 1.0, 0)
    pe, pl = ce.cluster_points([early, late])
    assert pe.mean_ms == pytest.approx(1e3 * secs[0]) and pl.mean_ms == pytest.approx(1e3 * sum(secs))
    assert pe.accuracy == 0.5 and pe.p95_ms < pl.p95_ms
    # 95 % leave by the second to last exit: the p95 is still priced at the last (one point of
    # margin), from each segment's own p95 over its recent frames
    edge = OperatingPoint("edge", [0.5] * k, 0.8, 1.0, 1.0, [0.91] + [0.04 / (k - 2)] * (k - 2) + [0.05], 0.0, 0)
    (pb,) = ce.cluster_points([edge])
    p95s = ce.segment_p95_seconds()
    assert pb.p95_ms == pytest.approx(1e3 * sum(p95s))
    assert pb.mean_ms < pb.p95_ms
    assert ce.skipped_fraction([0]) == pytest.approx(1.0) and ce.skipped_fraction([k - 1]) == 0.0


def test_on_demand_over_the_cluster_survives_a_follower_dying(setup):
    """(Last in this module: it kills a follower.) The policy picks a cluster-priced point; a
    request during which a follower is dead runs again on the devices left, exactly."""
    import os
    import signal

    from edgeweave.runtime.exits import ClusterOnDemand

    cl, model, ce = setup
    k = ce.num_exits
    points = [OperatingPoint("fast", [0.0] * k, 0.5, 1.0, 1.0, [1.0] + [0.0] * (k - 1), 0.0, 0),
              OperatingPoint("full", [2.0] * (k - 1) + [0.0], 0.9, 1.0, 1.0, [0.0] * (k - 1) + [1.0], 0.0, 0)]
    od = ClusterOnDemand(ce, points)
    od.warm_up()
    assert od.devices == cl.names
    fast, full = (p for p in od.points)
    assert fast.p95_ms < full.p95_ms  # priced on this cluster's measured segment times
    x = _x(3)
    pred = od.predict(x, latency_budget_ms=fast.p95_ms * 1.01)
    assert pred.choice.point.name == "fast" and int(pred.exits[0]) == 0
    os.kill(cl.followers[0].process.pid, signal.SIGKILL)
    pred = od.predict(x)  # the default (most accurate) point: every segment
    assert int(pred.exits[0]) == k - 1 and od.lost == ["worker1"]
    assert all(p.devices == ["leader", "worker2", "worker3"] for p in ce.plans)
    with torch.no_grad():
        ref = torch.softmax(model(x), -1)
    assert torch.allclose(pred.probs, ref, atol=1e-5)
    assert 0.0 < od.skipped_fraction() < 1.0
