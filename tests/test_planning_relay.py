"""The CPU a device spends moving bytes for others (``DeviceProfile.byte_s``) in the planner."""

from __future__ import annotations

import pytest
import torch

from edgeweave.models import build_model
from edgeweave.engine import simulate
from edgeweave.planning.graph import capture
from edgeweave.planning.cost import relay_bytes
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster, DeviceProfile

torch.set_num_threads(1)


def test_relay_bytes_count_sends_and_receives_a_device_does_not_compute_from() -> None:
    moves = [(1, 0, (0, 10)),  # gathered by the leader, which computes rows 8..12
             (0, 2, (5, 12)),  # forwarded to device 2, which computes from all of them
             (2, 1, (4, 4))]   # empty: nothing moves
    out = relay_bytes(moves, {0: (8, 12), 1: (0, 10), 2: (5, 12)}, rb=100)
    # device 1 sent 10 rows; the leader received 8 rows it does not use and sent 7; device 2 used all
    assert out == {1: 1000.0, 0: 800.0 + 700.0}


def _graph():
    torch.manual_seed(0)
    model = build_model("vgg11", num_classes=10, in_channels=3).eval()
    return model, capture(model, (1, 3, 96, 96))


@pytest.mark.parametrize("fusion", ["pools", "auto"])
def test_a_leader_that_pays_for_relaying_computes_less_in_gather_mode(fusion: str) -> None:
    """In gather mode every strip passes the leader twice; with that CPU priced, the leader
    takes fewer rows, every prediction includes it, and the plan stays exact."""
    model, gm = _graph()

    def cluster(byte_s: float) -> Cluster:
        return Cluster([DeviceProfile(f"d{i}", a=2e-10, b=1e-4, bandwidth_bps=1e9, latency_s=1e-4, byte_s=byte_s)
                        for i in range(4)])

    # rows only: a channel stage's assignments hold channels, not rows (the relay is priced alike)
    free = make_plan(gm, cluster(0.0), partition="optimal", fusion=fusion, mode="gather", split="rows")
    paid = make_plan(gm, cluster(2e-8), partition="optimal", fusion=fusion, mode="gather", split="rows")

    def leader_rows(plan) -> int:
        return sum(a.out_rows[1] - a.out_rows[0] for s in plan.stages if s.kind == "spatial"
                   for a in s.assignments if a.device == 0)

    assert leader_rows(paid) < leader_rows(free)
    assert paid.predicted_s > free.predicted_s
    # the same plan priced with and without the relay CPU: every stage's finish includes it
    for s in paid.stages:
        assert all(a.predicted_s <= s.predicted_s + 1e-15 for a in s.assignments)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    y = simulate(gm, paid, x)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_slowed_profiles_relay_slower_too() -> None:
    p = DeviceProfile("d", a=1e-9, latency_s=1e-3, byte_s=5e-9)
    assert p.slowed(2.5).byte_s == pytest.approx(1.25e-8)
    assert DeviceProfile.from_dict(p.to_dict()) == p


def test_a_slower_leader_relays_slower_when_a_plan_is_repriced() -> None:
    """The adaptive stream re-prices the current plan under new speed estimates: the relay CPU
    is the device's time, so it moves with the device's factor like its compute."""
    from edgeweave.planning import adapt as A

    _model, gm = _graph()
    paid = Cluster([DeviceProfile(f"d{i}", a=2e-10, b=1e-4, bandwidth_bps=1e9, latency_s=1e-4, byte_s=2e-8)
                    for i in range(4)])
    free = Cluster([DeviceProfile(f"d{i}", a=2e-10, b=1e-4, bandwidth_bps=1e9, latency_s=1e-4) for i in range(4)])
    plan = make_plan(gm, paid, partition="optimal", fusion="pools", mode="gather")
    comp = A.stage_compute(A.stage_works(gm, plan), paid)
    with_bytes, without = A.stage_scaling(plan, comp, paid), A.stage_scaling(plan, comp, free)
    extra = [a[0] - b[0] for a, b in zip(with_bytes, without)]
    assert all(e >= 0 for e in extra) and sum(e > 0 for e in extra) >= 2
    ones, slow_leader = [1.0] * 4, [2.0, 1.0, 1.0, 1.0]
    assert A.reprice(plan, with_bytes, ones, ones) == pytest.approx(plan.predicted_s)
    assert A.reprice(plan, with_bytes, ones, slow_leader) > A.reprice(plan, without, ones, slow_leader)
