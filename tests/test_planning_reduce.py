"""Exact partitioning of blocks with global context (issue 5 part 3), without processes.

A channel-attention squeeze (``x.mean((2, 3))`` -> Linear -> sigmoid -> ``x * w[..., None,
None]``) and a final global average pool are computed from per-strip partial sums over owned
rows: ``simulate`` must equal the model, and no device may receive a whole feature map that only
a reduction reads.
"""

from __future__ import annotations

import functools
import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn as nn
import torch.nn.functional as F

from edgeweave.models import build_model
from edgeweave.engine import simulate
from edgeweave.planning.graph import capture, is_small, reduction_of, side_inputs
from edgeweave.planning.halo import is_empty
from edgeweave.planning.plan import Plan
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster, DeviceProfile

torch.set_num_threads(1)

PARTITIONS = ("equal", "bodp", "ocbp", "optimal")
FUSIONS = ("none", "pools", "auto")
MODES = ("gather", "exchange")


def hetero(k: int, bw: float = 1e9) -> Cluster:
    return Cluster([DeviceProfile(f"d{i}", a=1e-10 * (1 + 0.7 * i), b=1e-5, bandwidth_bps=bw, latency_s=1e-5)
                    for i in range(k)])


def uniform(k: int) -> Cluster:
    return Cluster([DeviceProfile(f"d{i}", a=1e-9, b=1e-4, bandwidth_bps=1e9, latency_s=1e-4) for i in range(k)])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@functools.lru_cache(maxsize=None)
def _setup(name: str, shape: tuple[int, ...]):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=shape[1]).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
    return model, capture(model, shape), x, ref


MODELS = [
    ("compact_small_cnn", (2, 3, 32, 32)),
    pytest.param("compact_vgg11", (2, 3, 32, 32), marks=pytest.mark.slow),
    ("compact_cifar_resnet18", (2, 3, 32, 32)),
    ("compact_resnet18", (2, 3, 64, 64)),
]
IDS = ["compact_small_cnn", "compact_vgg11", "compact_cifar_resnet18", "compact_resnet18"]


def uneven(costs, total, capabilities=None):
    """One-row strips at both ends, a zero-row device (k >= 3), the rest on the last device."""
    k = len(costs)
    if k == 1:
        return [total]
    counts = [0] * k
    counts[0] = 1
    counts[k - 1] = total - 1
    if k >= 3 and total >= 3:
        counts[k - 2] = 1
        counts[k - 1] -= 1
    return counts


def leader_idle(costs, total, capabilities=None):
    """The leader computes no strip: it must still coordinate the partial sums."""
    k = len(costs)
    if k == 1:
        return [total]
    counts = [0] + [total // (k - 1)] * (k - 1)
    counts[-1] += total - sum(counts)
    return counts


def _check_reductions(plan: Plan) -> None:
    """Structural rules of plan.py: owned rows tile the source, reduce stages move nothing."""
    for s in plan.stages:
        for r in s.reductions:
            owned = sorted(rows for _, rows in r.rows if not is_empty(rows))
            assert owned[0][0] == 0 and all(a[1] == b[0] for a, b in zip(owned, owned[1:])), (s.index, owned)
            devices = [d for d, _ in r.rows]
            assert devices == sorted(devices), "summation order is device order"
        if s.kind == "reduce":
            assert not s.transfers
            assert [a.device for a in s.assignments if not is_empty(a.out_rows)] == [0]


@pytest.mark.parametrize("name,shape", MODELS, ids=IDS)
def test_compact_models_are_exact_for_every_partitioner_fusion_and_mode(name: str, shape: tuple[int, ...]) -> None:
    """All 24 (partition, fusion, mode) combinations, batch 2; the device count cycles 1-4."""
    _, gm, x, ref = _setup(name, shape)
    reductions = 0
    for i, (part, fus, mode) in enumerate(itertools.product(PARTITIONS, FUSIONS, MODES)):
        k = 1 + i % 4
        plan = make_plan(gm, hetero(k), partition=part, fusion=fus, mode=mode, model_name=name)
        plan = Plan.from_json(plan.to_json())  # what a follower gets
        _check_reductions(plan)
        y = simulate(gm, plan, x)
        assert rel_err(y, ref) <= 1e-5, (name, k, part, fus, mode)
        if k > 1 and not plan.meta["leader_only"]:
            # every squeeze is a reduction, not a global op that stops the strips: a leader stage
            # holds one only as part of a run of blocks the leader computes alone (merged into
            # one stage), convolutions and all
            convs = {n.name for n in gm.graph.nodes
                     if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), torch.nn.Conv2d)}
            for s in plan.stages:
                for n in (n for n in s.nodes if n.startswith("mean")):
                    if s.kind == "leader":
                        assert convs & set(s.nodes), (s.index, s.nodes)
                    else:
                        assert n in {r.node for r in s.reductions}, (s.index, n)
            reductions += sum(len(s.reductions) for s in plan.stages)
    assert reductions > 0  # attention blocks are split somewhere, not always left to the leader


@pytest.mark.parametrize("name,shape", MODELS, ids=IDS)
@pytest.mark.parametrize("split", [uneven, leader_idle], ids=["uneven", "leader_idle"])
def test_uneven_splits_and_an_idle_leader(name: str, shape: tuple[int, ...], split) -> None:
    _, gm, x, ref = _setup(name, shape)
    for k, (fus, mode) in zip(itertools.cycle([2, 3, 4]), itertools.product(FUSIONS, MODES)):
        plan = make_plan(gm, hetero(k), partition=split, fusion=fus, mode=mode)
        _check_reductions(plan)
        spatial = [s for s in plan.stages if s.kind == "spatial"]
        if split is leader_idle:
            assert any(s.reductions and is_empty(s.assignment(0).out_rows) for s in spatial)
        assert rel_err(simulate(gm, plan, x), ref) <= 1e-5, (name, k, fus, mode, split.__name__)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("compact_small_cnn", (2, 3, 32, 32)), ("compact_vgg11", (2, 3, 32, 32)),
                                        ("compact_cifar_resnet18", (2, 3, 32, 32))])
def test_full_grid_of_devices_partitioners_fusions_modes(name: str, shape: tuple[int, ...]) -> None:
    _, gm, x, ref = _setup(name, shape)
    for k, part, fus, mode in itertools.product([2, 3, 4], PARTITIONS, FUSIONS, MODES):
        plan = make_plan(gm, hetero(k), partition=part, fusion=fus, mode=mode)
        assert rel_err(simulate(gm, plan, x), ref) <= 1e-5, (name, k, part, fus, mode)


@pytest.mark.parametrize("mode", MODES)
def test_no_device_receives_the_whole_map_of_an_attention_block(mode: str) -> None:
    """The squeeze reads a whole map, yet every device receives only a strip (+halo) of it."""
    _, gm, x, ref = _setup("compact_vgg11", (1, 3, 32, 32))
    plan = make_plan(gm, uniform(3), partition="equal", fusion="none", mode=mode)
    attn = [s for s in plan.stages if s.reductions and s.kind == "spatial"]
    assert len(attn) == 8  # one squeeze per compacted 3x3 conv of VGG11
    for s in attn:
        h = s.input_shape[2]
        for d in range(3):
            a = s.assignment(d)
            received = sum(t.rows[1] - t.rows[0] for t in s.transfers if t.dst == d)
            held = a.in_rows[1] - a.in_rows[0]
            assert held < h and received < h, (s.index, d, a.in_rows, received)
        # the reduced map is the stage input here: its owned rows are exactly the strips
        (red,) = s.reductions
        assert [rows for _, rows in red.rows] == [a.out_rows for a in s.assignments if not is_empty(a.out_rows)]
    # the final global pool (if any) is reduced where the strips are; nothing gathers a map
    # for it, and in exchange mode no stage before the classifier sends a whole map anywhere
    for s in plan.stages:
        if s.kind == "leader":
            assert len(s.input_shape) != 4 or s.input_shape[2] * s.input_shape[3] <= 1, s.nodes
    assert rel_err(simulate(gm, plan, x), ref) <= 1e-5


def test_final_global_pool_is_a_reduce_stage_that_moves_no_rows() -> None:
    _, gm, x, ref = _setup("compact_cifar_resnet18", (2, 3, 32, 32))
    plan = make_plan(gm, uniform(3), partition="equal", fusion="pools", mode="exchange")
    (red,) = [s for s in plan.stages if s.kind == "reduce"]
    assert red.nodes == ["avgpool"] and not red.transfers
    before = plan.stages[red.index - 1]
    assert [(a.device, a.out_rows) for a in before.assignments if not is_empty(a.out_rows)] == \
        [(d, rows) for d, rows in red.reductions[0].rows]
    assert rel_err(simulate(gm, plan, x), ref) <= 1e-5


def test_results_are_reproducible_and_json_round_trip_keeps_reductions() -> None:
    _, gm, x, ref = _setup("compact_small_cnn", (2, 3, 32, 32))
    plan = make_plan(gm, uniform(4), partition="bodp", fusion="auto", mode="exchange")
    again = Plan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert any(s.reductions for s in again.stages)
    y1, y2 = simulate(gm, plan, x), simulate(gm, again, x)
    assert torch.equal(y1, y2)  # fixed summation order: bit-identical
    # an old plan (no "reductions" key; a model without global context) still loads and runs
    _, gm, x, ref = _setup("small_cnn", (2, 1, 28, 28))
    d = Plan.from_json(make_plan(gm, uniform(3), fusion="none").to_json()).to_dict()
    popped = 0
    for s in d["stages"]:
        if not s["reductions"]:
            s.pop("reductions")
            popped += 1
    assert popped >= 3
    old = Plan.from_dict(d)
    assert old.to_dict() == Plan.from_dict(Plan.from_json(json.dumps(d)).to_dict()).to_dict()
    assert rel_err(simulate(gm, old, x), ref) <= 1e-5


class _GenericSE(nn.Module):
    """Squeezes written four ways, a 1x1 conv on the squeezed vector, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.se = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        s = torch.sum(x, dim=(-2, -1), keepdim=True)
        x = x * torch.sigmoid(self.se(s / 100.0)) + x
        y = self.c2(x)
        y = y + F.adaptive_avg_pool2d(y, 1)
        y = y * y.mean((2, 3))[:, :, None, None]
        return self.fc(torch.flatten(self.pool(y), 1))


def test_generic_squeezes_are_recognised_and_exact() -> None:
    torch.manual_seed(1)
    model = _GenericSE().eval()
    x = torch.randn(2, 3, 19, 13)
    gm = capture(model, x.shape)
    reds = [n.name for n in gm.graph.nodes if reduction_of(gm, n) is not None]
    assert len(reds) == 4, reds
    assert sum(bool(side_inputs(n)) for n in gm.graph.nodes) == 3
    assert not any(is_small(n) for n in gm.graph.nodes if n.name in ("c1", "c2", "relu"))
    with torch.no_grad():
        ref = model(x)
    for k, part, fus, mode in itertools.product([1, 2, 3], ["equal", uneven, leader_idle], FUSIONS, MODES):
        plan = make_plan(gm, hetero(k), partition=part, fusion=fus, mode=mode)
        if k > 1:
            assert sum(len(s.reductions) for s in plan.stages) == 4, (k, fus, mode)
        assert rel_err(simulate(gm, plan, x), ref) <= 1e-5, (k, part, fus, mode)


def test_not_reductions() -> None:
    class M(nn.Module):
        def forward(self, x):
            return x.mean(1) + x.sum(dim=(1, 2)).sum() + F.adaptive_avg_pool2d(x, 2).sum()

    gm = capture(M().eval(), (1, 3, 8, 8))
    assert not any(reduction_of(gm, n) for n in gm.graph.nodes)


def test_compact_vgg16_at_200_predicts_a_speedup_on_four_uniform_devices() -> None:
    _, gm, x, ref = _setup("compact_vgg16", (1, 3, 200, 200))
    plans = {k: make_plan(gm, uniform(k), partition="optimal", fusion="auto", mode="exchange") for k in (1, 4)}
    p4 = plans[4]
    assert not p4.meta["leader_only"]
    # 13 attention squeezes, and fc1 on the flattened pool of the 6x6 map (the pool is folded)
    assert sum(len(s.reductions) for s in p4.stages) == 14
    assert p4.meta["predicted_speedup"] > 2.0, p4.meta
    assert rel_err(simulate(gm, p4, x), ref) <= 1e-5


def test_runtime_check_plan_rejects_an_owner_without_work() -> None:
    """An owner that computes nothing would never send its partial sum: refuse the plan up front."""
    from dataclasses import replace

    from edgeweave.errors import EdgeweaveError
    from edgeweave.runtime.executor import check_plan

    _, gm, x, ref = _setup("compact_small_cnn", (2, 3, 32, 32))
    plan = make_plan(gm, uniform(2), partition="equal", fusion="none", mode="exchange")
    check_plan(plan)
    s = next(s for s in plan.stages if s.kind == "spatial" and s.reductions)
    r = s.reductions[0]
    s.assignments = [a if a.device == 0 else replace(a, out_rows=(0, 0)) for a in s.assignments]
    s.reductions = [r] + s.reductions[1:]
    with pytest.raises(EdgeweaveError, match="owns rows"):
        check_plan(plan)


@pytest.mark.parametrize("mode", ["gather", "exchange"])
def test_attention_on_a_one_by_one_map_is_exact(mode):
    """torchvision ResNet18 at 32x32 ends at 1x1: there `map * scale` has the scale's shape and is
    classed pointwise; the scale must still be treated as a whole side input, not asked for rows."""
    model = build_model("compact_resnet18", num_classes=6, in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32)
    gm = capture(model, tuple(x.shape))
    with torch.no_grad():
        ref = model(x)
        for fusion in ("none", "auto"):
            y = simulate(gm, make_plan(gm, Cluster.uniform(3), mode=mode, fusion=fusion), x)
            assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5


class _FlatHead(nn.Module):
    """conv -> pool -> flatten (three spellings) -> Linear -> ReLU -> Linear, like VGG's classifier."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.same = nn.AdaptiveAvgPool2d((5, 5))  # the identity on a 5x5 map (VGG's avgpool)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(6 * 5 * 5, 12)
        self.fc2 = nn.Linear(12, 4)
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.same(self.pool(F.relu(self.conv(x))))
        if self.flatten == "module":
            x = self.flat(x)
        elif self.flatten == "method":
            x = x.flatten(1)
        else:
            x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def _reduce_stages_of_every_plan(gm, x: torch.Tensor, ref: torch.Tensor):
    """Every device count, partitioner, fusion and mode is exact; yields (plan, its reduce stage)
    for the plans that spread the work."""
    for k, part, fus, mode in itertools.product((1, 2, 3, 4), PARTITIONS, FUSIONS, MODES):
        plan = make_plan(gm, hetero(k), partition=part, fusion=fus, mode=mode)
        _check_reductions(plan)
        assert rel_err(simulate(gm, plan, x), ref) <= 1e-5, (k, part, fus, mode)
        if any(not is_empty(a.out_rows) for s in plan.stages for a in s.assignments if a.device != 0):
            (red,) = [s for s in plan.stages if s.kind == "reduce"]
            yield plan, red


@pytest.mark.parametrize("flatten", ["module", "method", "function"])
def test_first_linear_on_a_flattened_map_is_reduced_from_the_strips(flatten: str) -> None:
    """``fc(flatten(x))`` is a sum over rows: partial products of the held rows, no gather."""
    torch.manual_seed(0)
    model = _FlatHead(flatten).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    gm = capture(model, tuple(x.shape))
    for plan, red in _reduce_stages_of_every_plan(gm, x, ref):
        assert red.nodes[:2] == ["flat" if flatten == "module" else "flatten", "fc1"], red.nodes
        assert red.reductions[0].source == "same"  # the map, not the flattened vector
        assert not any(s.kind == "leader" and len(s.input_shape) == 4 for s in plan.stages)
    for split in (uneven, leader_idle):
        plan = make_plan(gm, hetero(3), partition=split, fusion="none", mode="exchange")
        assert rel_err(simulate(gm, plan, x), ref) <= 1e-5, split.__name__


class _PooledHead(nn.Module):
    """VGG's head at inputs other than 224 px: an adaptive average pool that grows the map."""

    def __init__(self, size: tuple[int, int], functional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AdaptiveAvgPool2d(size)
        self.fc1 = nn.Linear(6 * size[0] * size[1], 12)
        self.fc2 = nn.Linear(12, 4)
        self.size, self.functional = size, functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv(x)))
        x = F.adaptive_avg_pool2d(x, self.size) if self.functional else self.avg(x)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


@pytest.mark.parametrize("size,functional", [((7, 7), False), ((7, 5), True), ((6, 9), False)])
def test_a_pool_that_grows_the_map_is_folded_into_the_first_linear(size: tuple[int, int], functional: bool) -> None:
    """``fc1(flatten(adaptive_avg_pool2d(x, size)))`` is linear in the 5x5 map ``x``: partial
    products of the held rows with the pooled-back weight, no gather to the leader."""
    from edgeweave.planning.graph import is_folded, reduce_pool

    torch.manual_seed(0)
    model = _PooledHead(size, functional).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    gm = capture(model, tuple(x.shape))
    by = {n.name: n for n in gm.graph.nodes}
    pool = next(n for n in gm.graph.nodes if n.op != "placeholder" and n.args and n.args[0] is by["pool"])
    assert is_folded(pool) and reduce_pool(by["fc1"]) == size
    for plan, red in _reduce_stages_of_every_plan(gm, x, ref):
        assert red.reductions[0].source == "pool"  # the 5x5 map the strips hold
        assert not any(s.kind == "leader" and len(s.input_shape) == 4 for s in plan.stages)


def test_a_pool_that_shrinks_the_map_is_not_folded() -> None:
    """Folding a shrinking pool would make the layer larger than the model's; it stays global."""
    from edgeweave.planning.graph import is_folded, reduce_pool, reduce_source

    model = _PooledHead((2, 2), functional=False).eval()
    gm = capture(model, (1, 3, 10, 10))
    by = {n.name: n for n in gm.graph.nodes}
    assert not is_folded(by["avg"]) and reduce_pool(by["fc1"]) is None
    assert reduce_source(by["fc1"]) is by["avg"]  # fc1 still reduces over the pooled map's rows


@given(n_in=st.integers(1, 16), n_out=st.integers(1, 16))
@settings(max_examples=80, deadline=None)
def test_pool_matrix_is_adaptive_average_pooling(n_in: int, n_out: int) -> None:
    from edgeweave.planning.graph import pool_matrix

    x = torch.randn(3, n_in, dtype=torch.float64)
    want = F.adaptive_avg_pool1d(x[:, None, :], n_out)[:, 0, :]
    assert torch.allclose(x @ pool_matrix(n_out, n_in).T, want, atol=1e-12)


@given(h=st.integers(1, 7), w=st.integers(1, 7), oh=st.integers(1, 9), ow=st.integers(1, 9), data=st.data())
@settings(max_examples=80, deadline=None)
def test_a_weight_carried_back_through_the_pool_applies_to_the_map(h: int, w: int, oh: int, ow: int, data) -> None:
    """``fc(flatten(adaptive_avg_pool2d(x)))`` equals the columns carried back through the pool
    applied to ``x``: by rows (a strip, channels last) and by channels."""
    from edgeweave.engine import columns

    weight = torch.randn(5, 2 * oh * ow, dtype=torch.float64)
    x = torch.randn(3, 2, h, w, dtype=torch.float64)
    want = F.linear(F.adaptive_avg_pool2d(x, (oh, ow)).flatten(1), weight)
    cut = data.draw(st.integers(0, h))
    got = sum(F.linear(x[:, :, a:b].permute(0, 2, 3, 1).reshape(3, -1), columns.row_columns(weight, 2, h, w, (oh, ow), (a, b)))
              for a, b in ((0, cut), (cut, h)) if b > a)
    assert torch.allclose(got, want, atol=1e-10)
    by_channel = sum(F.linear(x[:, k:k + 1].reshape(3, -1), columns.channel_columns(weight, 2, h, w, (oh, ow), (k, k + 1)))
                     for k in range(2))
    assert torch.allclose(by_channel, want, atol=1e-10)


def test_a_flatten_read_by_anything_else_is_not_folded() -> None:
    class TwoUses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = torch.flatten(self.conv(x), 1)
            return self.fc(f) + f.sum(1, keepdim=True)

    torch.manual_seed(0)
    model = TwoUses().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = capture(model, tuple(x.shape))
    assert not any(n.meta.get("ew_folded") or n.meta.get("ew_reduce") for n in gm.graph.nodes)
    plan = make_plan(gm, hetero(3), partition="optimal", fusion="auto", mode="exchange")
    with torch.no_grad():
        assert rel_err(simulate(gm, plan, x), model(x)) <= 1e-6


def test_a_device_copies_only_its_rows_columns_until_they_would_outweigh_the_layer() -> None:
    from edgeweave.engine import columns

    torch.manual_seed(0)
    columns._KEPT.clear()
    w = torch.randn(7, 2 * 4 * 3)
    x = torch.randn(2, 2, 4, 3)
    full = F.linear(x.reshape(2, -1), w)
    parts = []
    for lo, hi in [(0, 1), (1, 3), (3, 4)]:
        got = columns.row_columns(w, 2, 4, 3, None, (lo, hi))
        assert got.shape == (7, (hi - lo) * 6) and columns.row_columns(w, 2, 4, 3, None, (lo, hi)) is got  # made once, kept
        cols = w.view(7, 2, 4, 3)[:, :, lo:hi, :].reshape(7, -1)
        want = F.linear(x[:, :, lo:hi, :].reshape(2, -1), cols)
        part = F.linear(x[:, :, lo:hi, :].permute(0, 2, 3, 1).reshape(2, -1), got)
        assert torch.allclose(part, want, atol=1e-5)
        parts.append(part)
    assert torch.allclose(sum(parts), full, atol=1e-5)
    # the three shares hold the layer's size once; a fourth would outweigh it: the whole layer,
    # reordered once, and every row range a view of it
    assert columns.kept_bytes() == w.numel() * 4
    other = columns.row_columns(w, 2, 4, 3, None, (1, 2))
    assert columns.kept_bytes() == w.numel() * 4 and other.untyped_storage().nbytes() == w.numel() * 4
    assert columns.row_columns(w, 2, 4, 3, None, (0, 4)).data_ptr() == other.data_ptr() - 6 * 4
    with torch.no_grad():
        w.mul_(2)  # a changed weight is cut again
    again = columns.row_columns(w, 2, 4, 3, None, (1, 2))
    assert torch.equal(again, 2 * other)
    for _ in range(columns._KEPT_MAX + 3):
        columns.row_columns(torch.randn(3, 24), 2, 4, 3, None, (0, 1))
    assert len(columns._KEPT) <= columns._KEPT_MAX


@pytest.mark.slow
def test_vgg_classifier_at_224_reduces_its_first_layer_where_the_strips_are() -> None:
    """VGG's avgpool is the identity at 224 px and stays in the strips; fc1 is a reduce stage."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg11().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    gm = capture(model, tuple(x.shape))
    for mode in MODES:
        plan = make_plan(gm, uniform(3), partition="optimal", fusion="pools", mode=mode)
        kinds = [s.kind for s in plan.stages]
        red = plan.stages[kinds.index("reduce")]
        assert red.nodes[:2] == ["flatten", "classifier_0"] and "avgpool" in plan.stages[red.index - 1].nodes
        assert len([d for d, r in red.reductions[0].rows if not is_empty(r)]) == 3
        assert rel_err(simulate(gm, plan, x), ref) <= 1e-5, mode


def test_adapt_charges_each_holder_its_share_of_a_linear_reduction() -> None:
    """The stream's per-device speed estimate compares measured compute with this work: the
    holders of the map's rows multiply them by the weight, not the leader alone."""
    from edgeweave.planning.adapt import stage_works
    from edgeweave.planning.cost import node_flops
    from edgeweave.planning.graph import nodes_by_name

    model = _FlatHead("function").eval()
    gm = capture(model, (1, 3, 10, 10))
    plan = make_plan(gm, uniform(3), partition="equal", fusion="none", mode="exchange")
    (red,) = [s for s in plan.stages if s.kind == "reduce"]
    works = stage_works(gm, plan)[red.index]
    fc1 = node_flops(gm, nodes_by_name(gm)["fc1"])
    rows = dict(red.reductions[0].rows)
    assert all(rows[d][1] > rows[d][0] for d in range(3))
    for d in range(3):
        assert works[d]["linear"][0] == pytest.approx(fc1 * (rows[d][1] - rows[d][0]) / 5)
    assert sum(w["linear"][0] for w in works) == pytest.approx(fc1)


# What bench edgeld measured inside the testbed (run O): per CPU cap, the per-kind compute lines
# (seconds per FLOP, per call) and the per-message latency.
_MEASURED = {
    0.125: ({"conv": [1.15e-10, 3.95e-4], "conv_strided": [1.57e-10, 3.76e-4], "conv1x1": [1.77e-10, 1.43e-4],
             "linear": [1.31e-09, 5.06e-05], "pool": [5.58e-09, 2.75e-4], "other": [1.84e-09, 1.8e-4]}, 2.99e-3),
    0.25: ({"conv": [5.49e-11, 2.6e-4], "conv_strided": [7.75e-11, 1.78e-4], "conv1x1": [8.81e-11, 6.39e-05],
            "linear": [6.23e-10, 2.6e-05], "pool": [2.22e-09, 1.22e-4], "other": [6.87e-10, 6.39e-05]}, 1.25e-3),
    0.5: ({"conv": [2.6e-11, 1.06e-4], "conv_strided": [3.49e-11, 8.27e-05], "conv1x1": [3.98e-11, 2.78e-05],
           "linear": [2.82e-10, 1.32e-05], "pool": [1.05e-09, 5.49e-05], "other": [3.18e-10, 3.66e-05]}, 5.8e-4),
}


def _board(name: str, cpu: float, bw: float) -> DeviceProfile:
    kinds, lat = _MEASURED[cpu]
    return DeviceProfile(name, a=kinds["conv"][0], b=kinds["conv"][1], bandwidth_bps=bw, latency_s=lat, per_kind=kinds)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_the_block_before_a_reduce_stage_is_split_knowing_the_reduce(mode: str) -> None:
    """The rows a device ends the convolutions with are the rows of fc1 it multiplies. Priced as
    a gather of the map (gather mode), the last pooling block went whole to the leader, which
    then did all of fc1 alone (bench edgeld, heterogeneous cluster: 81 ms where the spread
    reduce took 31)."""
    import torchvision

    from edgeweave.planning.cost import compute_s, node_flops
    from edgeweave.planning.graph import nodes_by_name

    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    x = torch.randn(1, 3, 224, 224)
    gm = capture(model, tuple(x.shape))
    cl = Cluster([_board("leader", 0.25, 9.4e8), _board("w1", 0.5, 9.4e8), _board("w2", 0.25, 9.4e7),
                  _board("w3", 0.25, 9.4e7), _board("w4", 0.125, 4.8e7)])
    plan = make_plan(gm, cl, partition="optimal", fusion="pools", mode=mode)
    (red,) = [s for s in plan.stages if s.kind == "reduce"]
    holders = [d for d, r in red.reductions[0].rows if not is_empty(r)]
    assert len(holders) >= 3, red.reductions[0].rows
    fc1_alone = compute_s(cl.devices[0], [("linear", node_flops(gm, nodes_by_name(gm)["classifier_0"]))])
    # (with the map priced as gathered, gather mode left all 7 rows of it, and fc1, to the leader)
    assert red.predicted_s < 0.6 * fc1_alone
    with torch.no_grad():
        assert rel_err(simulate(gm, plan, x), model(x)) <= 1e-5


def test_a_squeeze_is_priced_as_one_message_delay_not_a_round_trip() -> None:
    """Partials go straight from every owner to every device with work (runtime/executor.py);
    a final pool's partials go to the leader only. Both cost one small message's delay."""
    from edgeweave.planning.cost import transfer_s
    from edgeweave.planning.plan import Reduction
    from edgeweave.planning.planner import _Planner

    _, gm, _, _ = _setup("compact_small_cnn", (1, 3, 32, 32))
    devs = uniform(4).devices
    pl = _Planner(gm, devs, partition="equal", mode="exchange")
    red = Reduction("m", "x", ((0, (0, 2)), (1, (2, 4)), (2, (4, 6)), (3, (6, 8))))
    nb = 256
    one = transfer_s(nb, devs[0], devs[1])
    squeeze = pl.reduction_s([red], [0, 1, 2, 3], [nb])
    to_leader = pl.reduction_s([red], [0], [nb])
    assert one <= squeeze < 1.1 * one
    assert one <= to_leader < 1.1 * one
    assert pl.reduction_s([red, red], [0, 1, 2, 3], [nb, nb]) == pytest.approx(2 * squeeze)


def by_name_target(gm, name: str) -> str:
    return str(next(n.target for n in gm.graph.nodes if n.name == name))


def test_prepare_cuts_a_device_s_columns_before_the_first_frame_and_only_where_rows_are_owned() -> None:
    from edgeweave.engine import reduce as execute

    torch.manual_seed(0)
    model = build_model("vgg11", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = capture(model, tuple(x.shape))
    plan = make_plan(gm, hetero(3), partition="equal", fusion="pools", mode="exchange")
    linear = [r for s in plan.stages for r in s.reductions if "linear" in r.node or "classifier" in r.node]
    assert linear, "the plan should split the classifier's first layer by rows"
    owners = {d for r in linear for d, rows in r.rows if not is_empty(rows)}
    idle = set(range(3)) - owners
    from edgeweave.engine import columns

    columns._KEPT.clear()
    for d in idle:
        execute.prepare_reductions(gm, plan, d)
    assert not columns._KEPT  # nothing to make for a device that owns no rows
    device = min(owners)
    execute.prepare_reductions(gm, plan, device)
    assert len(columns._KEPT) == 1
    made = next(iter(columns._KEPT.values()))[2]
    red = next(r for r in linear if not is_empty(r.owned(device)))
    assert made.numel() < gm.get_submodule(by_name_target(gm, red.node)).weight.numel()  # its rows' columns only
    with torch.no_grad():
        got = simulate(gm, plan, x)
        assert rel_err(got, model(x)) <= 1e-5
    # the frame used the prepared copy (simulate runs every device in this process: the others' too)
    assert any(v[2] is made for v in columns._KEPT.values())
