"""A plan executed in-process (``simulate``) equals the plain model, for many models and plans.

``simulate`` visits every device in turn and moves exactly the rows the plan's transfers say,
asserting that each sender holds what it sends; so these tests prove the plans exact and
executable without processes.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from edgeweave.models import build_model
from edgeweave.engine import simulate
from edgeweave.planning.graph import capture
from edgeweave.planning.plan import Plan
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster, DeviceProfile

torch.set_num_threads(1)

PARTITIONS = ("equal", "bodp", "ocbp", "optimal")
FUSIONS = ("none", "pools", "auto")
MODES = ("gather", "exchange")


def hetero(k: int, bw: float = 1e8) -> Cluster:
    """Devices of different speed (device k-1 is slowest) on ``bw`` links."""
    return Cluster([DeviceProfile(f"d{i}", a=1e-10 * (1 + 0.7 * i), b=1e-4, bandwidth_bps=bw, latency_s=1e-4)
                    for i in range(k)])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@functools.lru_cache(maxsize=None)
def _setup(name: str, shape: tuple[int, ...], num_classes: int = 10):
    """Model, graph, input and reference output; cached because building VGGs is slow."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, in_channels=shape[1]).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
    return model, capture(model, shape), x, ref


MODELS = [
    pytest.param("vgg11", (1, 3, 32, 32), id="vgg11"),
    pytest.param("vgg13", (1, 3, 32, 32), id="vgg13", marks=pytest.mark.slow),
    pytest.param("vgg16", (2, 3, 32, 32), id="vgg16-batch2", marks=pytest.mark.slow),
    pytest.param("resnet18", (1, 3, 64, 64), id="resnet18"),
    pytest.param("resnet50", (1, 3, 64, 64), id="resnet50", marks=pytest.mark.slow),
    pytest.param("cifar_resnet18", (1, 3, 32, 32), id="cifar_resnet18"),
    pytest.param("small_cnn", (2, 1, 28, 28), id="small_cnn-batch2"),
    pytest.param("small_resnet8", (1, 1, 28, 28), id="small_resnet8"),
]


@pytest.mark.parametrize("name,shape", MODELS)
def test_every_partitioner_fusion_and_mode_is_exact(name: str, shape: tuple[int, ...]) -> None:
    """All 24 (partition, fusion, mode) combinations; the device count cycles through 1-4."""
    _, gm, x, ref = _setup(name, shape)
    for i, (part, fus, mode) in enumerate(itertools.product(PARTITIONS, FUSIONS, MODES)):
        k = 1 + i % 4
        plan = make_plan(gm, hetero(k), partition=part, fusion=fus, mode=mode, model_name=name)
        y = simulate(gm, plan, x)
        assert y.shape == ref.shape
        assert rel_err(y, ref) <= 1e-5, (name, k, part, fus, mode)
        assert plan.predicted_s > 0 and all(s.predicted_s >= 0 for s in plan.stages)
        if k > 1 and part in ("equal", "bodp") and fus != "auto":  # these spread the rows
            assert any(sum(a.out_rows[1] > a.out_rows[0] for a in s.assignments) > 1 for s in plan.stages)


def uneven(costs, total, capabilities=None):
    """Forced awkward splits: one-row strips at both ends, a zero-row device, the rest between."""
    k = len(costs)
    counts = [0] * k
    if k == 1:
        return [total]
    order = [0, k - 1] + list(range(2, k - 1))  # device 1 stays at zero when k >= 3
    if k == 2:
        order = [0, 1]
    left = total
    for d in order[:2]:
        if left:
            counts[d] += 1
            left -= 1
    counts[order[-1] if k > 3 else (k - 1)] += left
    return counts


@pytest.mark.parametrize("name,shape", [("vgg11", (2, 3, 32, 32)), ("resnet18", (2, 3, 64, 64)),
                                        ("cifar_resnet18", (1, 3, 32, 32))])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_one_row_strips_and_zero_row_devices(name: str, shape: tuple[int, ...], k: int) -> None:
    _, gm, x, ref = _setup(name, shape)
    for fus, mode in itertools.product(FUSIONS, MODES):
        plan = make_plan(gm, hetero(k), partition=uneven, fusion=fus, mode=mode)
        spatial = [s for s in plan.stages if s.kind == "spatial"]
        sizes = [a.out_rows[1] - a.out_rows[0] for s in spatial for a in s.assignments]
        # gather mode splits every stage itself; exchange mode scales one run-wide split to
        # every height, where a one-row strip at the largest height may round to zero rows
        if mode == "gather" or fus == "none":
            assert 1 in sizes, (fus, mode, sizes)
        if k >= 3:
            assert 0 in sizes
        assert rel_err(simulate(gm, plan, x), ref) <= 1e-5, (name, k, fus, mode)


def test_plan_survives_json_round_trip_and_transfers_follow_the_mode() -> None:
    _, gm, x, ref = _setup("vgg13", (1, 3, 32, 32))
    moved: dict[str, int] = {}
    for mode, cluster in itertools.product(MODES, (hetero(3), Cluster.uniform(3, a=1e-9, bandwidth_bps=1e9))):
        plan = make_plan(gm, cluster, partition="optimal", fusion="none", mode=mode, split="rows")  # row strips: halos
        again = Plan.from_json(plan.to_json())
        assert again == plan
        assert rel_err(simulate(gm, again, x), ref) <= 1e-5
        for prev, s in zip(plan.stages, plan.stages[1:]):
            if s.kind != "spatial":
                continue
            if mode == "gather":  # EdgeLD: everything goes to the leader, then out again
                to_leader = [t for t in s.transfers if t.dst == 0]
                from_leader = [t for t in s.transfers if t.src == 0]
                assert len(to_leader) + len(from_leader) == len(s.transfers)
                assert s.transfers[: len(to_leader)] == to_leader
            else:  # exchange: a device only receives rows it does not hold already
                for t in s.transfers:
                    own = prev.assignment(t.dst).out_rows
                    assert t.rows[1] <= own[0] or t.rows[0] >= own[1], (t, own)
            if cluster.devices[0].name == "leader":
                moved[mode] = moved.get(mode, 0) + sum(t.rows[1] - t.rows[0] for t in s.transfers)
    assert moved["exchange"] < moved["gather"] / 4  # on equal devices only halos travel
    g = make_plan(gm, Cluster.uniform(3), partition="optimal", fusion="none", mode="gather", split="rows")
    e = make_plan(gm, Cluster.uniform(3), partition="optimal", fusion="none", mode="exchange", split="rows")
    assert e.predicted_s < g.predicted_s


def test_single_device_plan_has_no_transfers() -> None:
    _, gm, x, ref = _setup("small_cnn", (1, 1, 28, 28))
    plan = make_plan(gm, hetero(1))
    assert all(not s.transfers for s in plan.stages) and not plan.final_transfers
    assert rel_err(simulate(gm, plan, x), ref) <= 1e-6


@pytest.mark.slow
def test_vgg16_at_224_three_devices() -> None:
    _, gm, x, ref = _setup("vgg16", (1, 3, 224, 224), num_classes=1000)
    plan = make_plan(gm, hetero(3, bw=1e9), partition="optimal", fusion="pools", mode="exchange")
    kinds = [s.kind for s in plan.stages]
    assert "linear" in kinds  # the 120M-parameter classifier is split by output features
    assert rel_err(simulate(gm, plan, x), ref) <= 1e-5
    assert plan.meta["predicted_speedup"] > 1.5


def test_simulate_rejects_plans_that_send_rows_a_device_does_not_hold() -> None:
    """The exactness tests mean something only if simulate would notice a wrong plan."""
    import dataclasses

    _, gm, x, ref = _setup("small_cnn", (2, 1, 28, 28))
    plan = make_plan(gm, Cluster.uniform(3, a=1e-8), partition="equal", fusion="none", mode="exchange")
    stage = next(s for s in plan.stages[1:] if s.kind == "spatial" and s.transfers)
    bad = Plan.from_dict(plan.to_dict())
    t = stage.transfers[0]
    other = next(d for d in range(3) if d not in (t.src, t.dst))
    bad.stages[stage.index].transfers[0] = dataclasses.replace(t, src=other)
    with pytest.raises(AssertionError, match="does not hold"):
        simulate(gm, bad, x)
    # a missing halo transfer is noticed too: the receiver cannot assemble its input rows
    bad = Plan.from_dict(plan.to_dict())
    del bad.stages[stage.index].transfers[0]
    with pytest.raises(AssertionError, match="does not hold"):
        simulate(gm, bad, x)


def test_a_stage_copies_its_input_only_when_it_may_write_into_it() -> None:
    """``writes_input``: an in-place op on the stage input (or a view of it) needs a private copy.

    The runtime may still be sending that tensor to a neighbour, so a stage that would write into
    it must copy it first; a stage that writes only into what it computed must not pay the copy.
    """
    from edgeweave.engine import run_stage
    from edgeweave.engine.stage import writes_input
    from edgeweave.planning.plan import Assignment, Stage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(inplace=True), torch.nn.Dropout(),
                                torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 4, 3, padding=1)).eval()
    gm = capture(model, (1, 1, 8, 8))
    conv0, relu1, drop2, relu3, conv4 = (n.name for n in gm.graph.nodes if n.op == "call_module")

    def stage(*nodes: str) -> Stage:
        return Stage(0, "leader", list(nodes), [1, 4, 8, 8], [1, 4, 8, 8], [Assignment(0, (0, 8), (0, 8))])

    assert not writes_input(gm, stage(conv0, relu1))  # the ReLU writes into the conv's own output
    assert writes_input(gm, stage(relu1))  # ... into the stage input
    assert writes_input(gm, stage(drop2, relu3))  # ... into a view of it (Dropout in eval returns it)
    assert not writes_input(gm, stage(conv4))

    x = torch.randn(1, 4, 8, 8)
    keep = x.clone()
    y = run_stage(gm, stage(relu1), 0, x)
    assert torch.equal(x, keep) and torch.equal(y, keep.relu())
    y = run_stage(gm, stage(drop2, relu3, conv4), 0, x)
    assert torch.equal(x, keep) and torch.allclose(y, model[4](keep.relu()))


@pytest.mark.parametrize("name,shape", [("resnet18", (1, 3, 64, 64)), ("compact_resnet18", (1, 3, 64, 64)),
                                        ("small_cnn", (2, 1, 28, 28))])
def test_a_device_computing_a_whole_stage_alone_runs_the_models_own_ops(name: str, shape: tuple[int, ...]) -> None:
    """``whole_on``: on one device every spatial and leader stage runs the model's own ops (a
    generated module), so its output equals the model's value there bit for bit, attention
    squeezes included; strips of a split stage and reduce stages keep the strip interpreter."""
    from edgeweave.engine import run_stage
    from edgeweave.engine.stage import stage_io, whole_on

    _, gm, x, ref = _setup(name, shape)
    values: dict[str, torch.Tensor] = {}

    class Keep(torch.fx.Interpreter):
        def run_node(self, n):
            values[n.name] = out = super().run_node(n)
            return out

    with torch.no_grad():
        Keep(gm).run(x)
    one = make_plan(gm, hetero(1), partition="optimal", fusion="auto", mode="exchange")
    whole = 0
    for stage in one.stages:
        assert whole_on(stage, 0) == (stage.kind in ("spatial", "leader"))
        if not whole_on(stage, 0):
            continue
        whole += 1
        (in_node, (out_node,)) = stage_io(gm, stage)
        y = run_stage(gm, stage, 0, values[in_node.name] if in_node.op != "placeholder" else x)
        assert torch.equal(y, values[out_node.name]), (name, stage.index)
    # 1e-5, not bit for bit: the graph's BatchNorms are folded into the convolutions (planning/fold.py)
    assert whole and rel_err(simulate(gm, one, x), ref) <= 1e-5
    four = make_plan(gm, hetero(4), partition="equal", fusion="none", mode="exchange")
    split = [s for s in four.stages if sum(not a.out_rows[1] <= a.out_rows[0] for a in s.assignments) > 1]
    assert split and not any(whole_on(s, a.device) for s in split for a in s.assignments)
