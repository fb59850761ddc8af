"""Throughput plans (planning/throughput.py): groups of devices serving frames concurrently,
chosen for predicted fps under a per-frame latency SLO. Pure planning on a small graph."""

from __future__ import annotations

import collections
import functools
import math

import pytest
import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.models import build_model
from edgeweave.planning import throughput
from edgeweave.planning.cost import transfer_s
from edgeweave.planning.graph import capture
from edgeweave.planning.planner import make_plan
from edgeweave.planning.throughput import (
    GroupPlan,
    contiguous_partitions,
    one_group,
    plan_groups,
    set_partitions,
)
from edgeweave.profiling.profile import Cluster, DeviceProfile

torch.set_num_threads(1)

SHAPE = (1, 1, 32, 32)


@functools.lru_cache(maxsize=None)
def graph():
    return capture(build_model("small_cnn", num_classes=10, in_channels=1).eval(), SHAPE)


def cluster(n: int, slow: dict[int, float] | None = None) -> Cluster:
    """``n`` devices at 1 GFLOP/s on 1 Gbit/s links; ``slow`` maps an index to its slow-down."""
    slow = slow or {}
    return Cluster([DeviceProfile(f"d{i}", a=1e-9 * slow.get(i, 1.0), b=1e-4, bandwidth_bps=1e9, latency_s=2e-4)
                    for i in range(n)])


def check_shape(gp: GroupPlan, cl: Cluster) -> None:
    """Every device in exactly one group; each plan names its group's devices in order, head
    first; the leader heads its group."""
    names = [d.name for d in cl.devices]
    assert sorted(n for g in gp.groups for n in g.devices) == sorted(names)
    for g in gp.groups:
        assert g.plan.devices == g.devices
    lead = gp.groups[gp.group_of(names[0])]
    assert lead.devices[0] == names[0]
    assert gp.group_of("nobody") is None


def singletons(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]


def test_set_partitions_are_every_partition_once() -> None:
    for n, bell in zip(range(1, 7), (1, 2, 5, 15, 52, 203)):
        parts = list(set_partitions(list(range(n))))
        assert len(parts) == bell
        canon = {tuple(sorted(tuple(sorted(g)) for g in p)) for p in parts}
        assert len(canon) == bell
        assert all(sorted(i for g in p for i in g) == list(range(n)) for p in parts)
        assert parts[0] == [list(range(n))]
    runs = list(contiguous_partitions([3, 1, 2]))
    assert sorted(runs) == sorted([[[3, 1, 2]], [[3], [1, 2]], [[3, 1], [2]], [[3], [1], [2]]])


def test_no_slo_beats_one_group_and_singletons() -> None:
    gm, cl = graph(), cluster(4)
    best = plan_groups(gm, cl)
    check_shape(best, cl)
    assert best.feasible and best.slo_s is None
    one = one_group(gm, cl)
    alone = plan_groups(gm, cl, groupings=[singletons(4)])
    assert best.fps >= one.fps - 1e-9 and best.fps >= alone.fps - 1e-9
    assert best.meta["candidates"] == 15
    # one_group is today's plan: make_plan over every device, nothing added
    ref = make_plan(gm, cl)
    assert len(one.groups) == 1 and one.groups[0].devices == ref.devices
    assert one.latency_s == pytest.approx(ref.predicted_s) and one.fps == pytest.approx(1 / ref.predicted_s)


def test_latencies_are_the_plans_predictions_plus_the_trips() -> None:
    gm, cl = graph(), cluster(4, slow={1: 4.0})
    gp = plan_groups(gm, cl, groupings=[[[0, 3], [1, 2]]])
    lead = cl.devices[0]
    by_name = {d.name: d for d in cl.devices}
    out_bytes = 10 * 4  # small_cnn: [1, 10] logits
    assert throughput.output_bytes(gm) == out_bytes
    for g in gp.groups:
        profiles = [by_name[n] for n in g.devices]
        want = make_plan(gm, Cluster(profiles)).predicted_s
        head = profiles[0]
        if head is not lead:
            want += transfer_s(math.prod(SHAPE) * 4, lead, head) + transfer_s(out_bytes, head, lead)
        assert g.latency_s == pytest.approx(want)
    assert gp.fps == pytest.approx(sum(1 / g.latency_s for g in gp.groups))
    assert gp.latency_s == max(g.latency_s for g in gp.groups)


def test_slo_between_one_group_and_single_device_is_kept() -> None:
    gm, cl = graph(), cluster(4)
    one = one_group(gm, cl)
    single = plan_groups(gm, cl, groupings=[[[0], [1, 2, 3]]]).groups[0].latency_s  # the leader alone
    assert one.latency_s < single
    slo = (one.latency_s + single) / 2
    gp = plan_groups(gm, cl, slo_s=slo)
    check_shape(gp, cl)
    assert gp.feasible and gp.slo_s == slo
    assert all(g.latency_s <= slo for g in gp.groups)
    assert len(gp.groups) > 1 and gp.fps >= one.fps  # frames in flight pay even under the bound
    unbounded = plan_groups(gm, cl)
    assert unbounded.latency_s > slo and unbounded.fps >= gp.fps  # the bound cost some fps


def test_unmeetable_slo_gives_the_lowest_latency() -> None:
    gm, cl = graph(), cluster(4)
    one = one_group(gm, cl)
    gp = plan_groups(gm, cl, slo_s=one.latency_s / 10)
    check_shape(gp, cl)
    assert not gp.feasible and "slo_unmet" in gp.meta
    assert gp.latency_s == pytest.approx(one.latency_s)
    assert [g.devices for g in gp.groups] == [g.devices for g in one.groups]
    assert not one_group(gm, cl, slo_s=one.latency_s / 10).feasible
    assert one_group(gm, cl, slo_s=one.latency_s * 2).feasible


def test_slow_device_heads_no_group_and_is_not_left_alone_under_a_tight_slo() -> None:
    gm, cl = graph(), cluster(4, slow={1: 4.0})
    # forced: the slow d1 with the fast d2, d3; the head is the fastest (first of equals)
    gp = plan_groups(gm, cl, groupings=[[[0], [1, 2, 3]]])
    assert gp.groups[1].devices == ["d2", "d1", "d3"]
    # every candidate: the slow device heads no group it shares with a faster one
    for grouping in set_partitions(list(range(4))):
        for g in plan_groups(gm, cl, groupings=[grouping]).groups:
            assert g.devices[0] != "d1" or len(g.devices) == 1
    # d1 alone would miss an SLO the fast devices alone keep: it must share a group
    fast_alone = plan_groups(gm, cl, groupings=[singletons(4)])
    lat = {g.devices[0]: g.latency_s for g in fast_alone.groups}
    assert lat["d1"] > 3 * lat["d2"]
    slo = (lat["d1"] + lat["d2"]) / 2
    gp = plan_groups(gm, cl, slo_s=slo)
    check_shape(gp, cl)
    assert gp.feasible and all(g.latency_s <= slo for g in gp.groups)
    assert len(gp.groups[gp.group_of("d1")].devices) > 1
    assert gp.fps >= one_group(gm, cl).fps
    # with no bound, fps can only be higher than under it
    assert plan_groups(gm, cl).fps >= gp.fps


def test_forced_groupings_are_respected() -> None:
    gm, cl = graph(), cluster(4)
    gp = plan_groups(gm, cl, groupings=[[[2, 0], [3, 1]]])
    check_shape(gp, cl)
    assert [g.devices for g in gp.groups] == [["d0", "d2"], ["d3", "d1"]]  # leader first; else order kept
    two = plan_groups(gm, cl, groupings=[[[0, 1, 2, 3]], singletons(4)])
    assert two.meta["candidates"] == 2 and len(two.groups) == 4  # singletons predict more fps here
    with pytest.raises(EdgeweaveError, match="division"):
        plan_groups(gm, cl, groupings=[[[0, 1], [1, 2, 3]]])
    with pytest.raises(EdgeweaveError, match="division"):
        plan_groups(gm, cl, groupings=[[[0, 1], [2]]])


def test_json_round_trip() -> None:
    gm, cl = graph(), cluster(4, slow={2: 3.0})
    gp = plan_groups(gm, cl, slo_s=0.05, groupings=[[[0, 1], [2, 3]], [[0], [1, 2, 3]]])
    back = GroupPlan.from_json(gp.to_json(indent=2))
    assert back == gp
    assert back.to_dict() == gp.to_dict()
    assert back.fps == gp.fps and back.latency_s == gp.latency_s


def test_identical_devices_plan_once_per_group_size(monkeypatch) -> None:
    calls: list[int] = []

    def counting(gm, cl, **kw):
        calls.append(len(cl.devices))
        return make_plan(gm, cl, **kw)

    monkeypatch.setattr(throughput, "make_plan", counting)
    gm, cl = graph(), Cluster.uniform(5)
    gp = plan_groups(gm, cl)
    check_shape(gp, cl)
    assert gp.meta["candidates"] == 52
    assert max(collections.Counter(calls).values()) == 1 and len(calls) <= 5
    assert gp.meta["make_plan_calls"] == len(calls)


def test_many_devices_try_runs_of_the_speed_order() -> None:
    gm = graph()
    speeds = {0: 1.0, 1: 3.0, 2: 1.0, 3: 2.0, 4: 1.0, 5: 3.0, 6: 2.0}
    cl = cluster(7, slow=speeds)
    gp = plan_groups(gm, cl)
    check_shape(gp, cl)
    assert gp.meta["candidates"] == 2 ** 6
    order = sorted(range(7), key=lambda i: (speeds[i], i))  # fastest first
    for g in gp.meta["grouping"]:
        pos = sorted(order.index(i) for i in g)
        assert pos == list(range(pos[0], pos[0] + len(pos)))
    assert gp.fps >= one_group(gm, cl).fps


def test_busy_times_are_the_work_inside_the_predicted_latency() -> None:
    gm, cl = graph(), cluster(3)
    plan = make_plan(gm, cl)
    busy = plan.busy_s()
    assert len(busy) == 3 and all(b > 0 for b in busy)
    # a device works at most as long as the frame takes; alone, it works the whole frame
    assert max(busy) <= plan.predicted_s * (1 + 1e-9)
    alone = make_plan(gm, cluster(1))
    assert alone.busy_s()[0] == pytest.approx(alone.predicted_s, rel=0.05)
    # JSON keeps them
    from edgeweave.planning.plan import Plan

    assert Plan.from_json(plan.to_json()).busy_s() == busy


def test_frames_in_flight_raise_a_split_groups_rate_within_its_busiest_device() -> None:
    gm, cl = graph(), cluster(4)
    one = plan_groups(gm, cl, groupings=[[[0, 1, 2, 3]]], slots=1)
    two = plan_groups(gm, cl, groupings=[[[0, 1, 2, 3]]], slots=2)
    assert two.slots == 2 and one.slots == 1
    busy = max(two.groups[0].plan.busy_s())
    assert two.fps == pytest.approx(min(2 * one.fps, 1 / busy))
    assert two.fps >= one.fps and two.latency_s >= one.latency_s
    assert two.latency_s == pytest.approx(max(one.latency_s, 2 * busy))
    # a second frame gains nothing where a device works the whole frame: the leader alone
    lead = plan_groups(gm, cl, groupings=[[[0], [1, 2, 3]]], slots=1).groups[0]
    assert throughput.in_flight(lead.plan, lead.latency_s, 2)[0] == pytest.approx(1 / lead.latency_s, rel=0.05)
    chosen = plan_groups(gm, cl, slots=None)
    assert chosen.fps >= plan_groups(gm, cl, slots=1).fps - 1e-9
    assert GroupPlan.from_json(two.to_json()).slots == 2
    with pytest.raises(EdgeweaveError, match="slots"):
        plan_groups(gm, cl, slots=0)
