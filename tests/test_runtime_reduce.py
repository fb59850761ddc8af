"""Compact (channel-attention) models on real processes: exact reductions over gloo.

The squeezes are computed from per-strip partial sums that every device sends, as
``[N, C, 1, 1]`` tensors, to every other device with work in the stage, the final global pool
from partial sums sent to the leader; the result must equal one device, be bit-reproducible,
and no map may be gathered for a squeeze.
"""

from __future__ import annotations

import pytest
import torch
from _runtime_helpers import _model, check

from edgeweave.planning.graph import capture
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster
from edgeweave.runtime.run import compare

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cl():
    from edgeweave.runtime.leader import LocalCluster

    with LocalCluster(3, timeout_s=60) as session:
        yield session


def _leader_idle(costs, total, capabilities=None):
    """The leader computes no strip: the followers add the partial sums among themselves."""
    k = len(costs)
    counts = [0] + [total // (k - 1)] * (k - 1)
    counts[-1] += total - sum(counts)
    return counts


@pytest.mark.parametrize("workers,fusion,mode,batch", [
    (2, "none", "exchange", 2), (3, "auto", "exchange", 1), (3, "pools", "gather", 2), (2, "auto", "gather", 1),
])
def test_compact_small_cnn(cl, workers, fusion, mode, batch):
    plan = check(cl, "compact_small_cnn", 32, workers, partition="equal", fusion=fusion, mode=mode, batch=batch)
    assert sum(len(s.reductions) for s in plan.stages) == 5  # four squeezes and the final pool
    assert not any(s.kind == "leader" and any(n.startswith("mean") for n in s.nodes) for s in plan.stages)


def _one_follower(costs, total, capabilities=None):
    """Every row on the first follower: it computes whole maps alone, with no message per sum."""
    return [0, total] + [0] * (len(costs) - 2)


@pytest.mark.parametrize("partition,mode", [("optimal", "exchange"), ("bodp", "gather"), (_leader_idle, "exchange"),
                                            (_one_follower, "exchange")])
def test_compact_cifar_resnet18_three_workers(cl, partition, mode):
    plan = check(cl, "compact_cifar_resnet18", 32, 3, partition=partition, fusion="auto", mode=mode, batch=2)
    if partition in (_leader_idle, _one_follower):
        assert any(s.reductions and s.assignment(0).out_rows == (0, 0) for s in plan.stages)


def test_results_are_bit_reproducible_and_match_simulate(cl):
    from edgeweave.engine import simulate

    model = _model(cl, "compact_small_cnn", 40)
    gm = capture(model, (1, 3, 40, 40))
    plan = make_plan(gm, Cluster(cl.cluster.devices[:4]), partition="bodp", fusion="none", mode="exchange",
                     model_name="compact_small_cnn", model_hash=cl.model_hash)
    assert any(s.reductions for s in plan.stages)
    pid = cl.load_plan(plan)
    torch.manual_seed(3)
    x = torch.randn(1, 3, 40, 40)
    y1, _ = cl.infer(x, pid)
    y2, _ = cl.infer(x, pid)
    assert torch.equal(y1, y2)
    with torch.no_grad():
        ref = model(x)
    assert compare(y1, ref)["rel_err"] <= 1e-5
    assert compare(y1, simulate(gm, plan, x))["rel_err"] <= 1e-6
