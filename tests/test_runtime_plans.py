"""Planner-made plans executed on real processes over loopback gloo, checked against one device.

One LocalCluster (4 followers + the leader) serves the whole module; plans that use fewer
workers use a prefix of its devices (the others sit those plans out), so 1 to 4 workers, every
partitioner, fusion mode and both transfer modes are covered without restarting processes.
Torchvision ResNets and VGG, whose weights take many seconds to ship, are in
test_runtime_models.py (marked slow).
"""

from __future__ import annotations

import itertools

import pytest
from _runtime_helpers import check, strip_sizes

from edgeweave.profiling.profile import Cluster, DeviceProfile
from edgeweave.runtime.leader import LocalCluster

pytestmark = pytest.mark.timeout(300)

WORKERS = 4


@pytest.fixture(scope="module")
def cl():
    with LocalCluster(WORKERS, timeout_s=60) as session:
        yield session


@pytest.mark.parametrize("partition,fusion,mode", list(itertools.product(
    ["equal", "bodp", "ocbp", "optimal"], ["none", "pools", "auto"], ["gather", "exchange"])))
def test_cifar_resnet18_every_partitioner_fusion_and_mode(cl, partition, fusion, mode):
    plan = check(cl, "cifar_resnet18", 32, 3, partition, fusion, mode)
    assert plan.mode == mode and plan.fusion == fusion and plan.partition == partition
    assert any(s.kind == "spatial" for s in plan.stages)


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["gather", "exchange"])
def test_cifar_resnet18_one_to_four_workers(cl, workers, mode):
    plan = check(cl, "cifar_resnet18", 32, workers, mode=mode)
    used = {a.device for s in plan.stages for a in s.assignments if a.out_rows[1] > a.out_rows[0]}
    assert max(used) <= workers


def test_uneven_devices_and_one_row_strips(cl):
    """Heterogeneous profiles give uneven strips, down to one row for the slowest device (a
    32-row map over devices of speed 1, 1, 1, 1/3, 1/10). Exact in both modes."""
    speeds = [1e-10, 1e-10, 1e-10, 3e-10, 1e-9]
    profiles = Cluster([DeviceProfile(n, a=a) for n, a in zip(cl.names, speeds)])
    for partition, fusion, mode in [("bodp", "none", "gather"), ("ocbp", "auto", "exchange"),
                                    ("optimal", "none", "exchange"), ("optimal", "auto", "gather")]:
        plan = check(cl, "cifar_resnet18", 32, WORKERS, partition, fusion, mode, profiles=profiles)
        sizes = strip_sizes(plan)
        assert len(set(sizes)) > 2 and 1 in sizes, (partition, fusion, mode, sizes)


def test_strips_in_any_order(cl):
    """Strips laid in another order than the devices' (the leader's in the middle or last, as
    the optimal planner lays them around slow links) run exact; so does the order it finds."""
    speeds = [1e-10, 2e-10, 1e-10, 3e-10, 1e-10]
    profiles = Cluster([DeviceProfile(n, a=a, bandwidth_bps=bw, latency_s=1e-4)
                        for n, a, bw in zip(cl.names, speeds, [1e9, 1e9, 1e7, 1e9, 1e9])])
    for order, partition, fusion, mode in [((2, 0, 4, 1, 3), "bodp", "none", "exchange"),
                                           ((4, 3, 2, 1, 0), "ocbp", "auto", "exchange"),
                                           ((1, 0, 2, 3, 4), "equal", "pools", "gather")]:
        plan = check(cl, "cifar_resnet18", 32, WORKERS, partition, fusion, mode, profiles=profiles, order=order)
        assert plan.meta["strip_order"] == list(order)
    plan = check(cl, "cifar_resnet18", 32, WORKERS, "optimal", "auto", "exchange", profiles=profiles)
    order = plan.meta["strip_order"]
    assert order != list(range(WORKERS + 1))
    assert 2 in (order[0], order[-1]) and 0 in (order[0], order[-1]), order  # slow link and leader at the ends


@pytest.mark.parametrize("split", ["rows", "auto"])
def test_a_follower_too_small_for_any_share_sits_out_and_the_rest_stays_exact(cl, split):
    """A follower whose memory holds its process and the model's layout copy but no share of any
    stage is left out by the planner (planner._fitting_plan): it computes nothing, the others all."""
    from dataclasses import replace

    from edgeweave.models import build_model
    from edgeweave.planning.memory import RUNTIME_BYTES

    layout = sum(t.numel() * t.element_size() for t in build_model("cifar_resnet18").parameters() if t.dim() == 4)
    devs = list(cl.cluster.devices)
    own = int(devs[2].meta.get("runtime_bytes", RUNTIME_BYTES))  # what the worker measured at join
    devs[2] = replace(devs[2], memory_bytes=own + layout + (2 << 20))
    plan = check(cl, "cifar_resnet18", 32, WORKERS, profiles=Cluster(devs), split=split)
    assert plan.meta["left_out"] == [devs[2].name]
    assert not any(a.device == 2 and a.out_rows[1] > a.out_rows[0] for s in plan.stages for a in s.assignments)
    assert len({a.device for s in plan.stages for a in s.assignments if a.out_rows[1] > a.out_rows[0]}) == WORKERS


def test_equal_split_of_a_small_map_has_one_row_strips(cl):
    # layer4 of a CIFAR ResNet18 at 32x32 has 4 rows: with 4 workers, every device gets one
    plan = check(cl, "cifar_resnet18", 32, 3, "equal", "none", "exchange")
    assert 1 in strip_sizes(plan)


@pytest.mark.parametrize("mode", ["gather", "exchange"])
def test_batch_of_two(cl, mode):
    check(cl, "cifar_resnet18", 32, 2, "ocbp", "auto", mode, batch=2)
