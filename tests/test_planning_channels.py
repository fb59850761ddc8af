"""Stages split by output channels (plan.py ``split``, planning/hybrid.py, engine/channels.py).

A channel stage gives each device every row of a slice of a convolution's filters, from the whole
input map; the exactness of such plans is checked against the plain model in-process
(``simulate``), for forced channel tails, uneven slices, a device holding no channels, both
modes, global-average-pool and flatten-Linear heads (reductions over channel slices), and with
every installed backend; ``auto`` never predicts worse than the rows-only plan.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _runtime_helpers import edges
from torch import nn

from edgeweave.engine import available_backends, prepare, simulate
from edgeweave.engine.channels import SlicedConv, channel_local, splits_by_channels
from edgeweave.models import build_model
from edgeweave.planning.graph import capture
from edgeweave.planning.hybrid import UNIT, channel_ranges
from edgeweave.planning.plan import Plan
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster, DeviceProfile
from edgeweave.runtime.executor import check_plan

torch.set_num_threads(1)


def hetero(k: int, bw: float = 1e8) -> Cluster:
    return Cluster([DeviceProfile(f"d{i}", a=1e-10 * (1 + 0.7 * i), b=1e-4, bandwidth_bps=bw, latency_s=1e-4)
                    for i in range(k)])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


class GapHead(nn.Module):
    """Conv layers, then a global average pool and a Linear: the pool is a reduction over a map
    that a channel tail leaves split by channels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 40, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(40, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


@functools.lru_cache(maxsize=None)
def _setup(name: str, shape: tuple[int, ...]):
    torch.manual_seed(0)
    model = GapHead().eval() if name == "gap" else build_model(name, num_classes=10, in_channels=shape[1]).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
    assert ref.abs().max() > 1e-3 and ref.std() > 1e-4, "degenerate reference"
    return model, capture(model, shape), x, ref


def _channel_stages(plan: Plan) -> list:
    return [s for s in plan.stages if s.split == "channels"]


MODELS = [("vgg11", (1, 3, 64, 64)), ("vgg16", (2, 3, 32, 32)), ("small_cnn", (2, 1, 28, 28)), ("gap", (2, 3, 32, 32))]


@pytest.mark.parametrize("name,shape", MODELS)
@pytest.mark.parametrize("mode", ["exchange", "gather"])
def test_forced_channel_tails_are_exact(name: str, shape: tuple[int, ...], mode: str) -> None:
    _, gm, x, ref = _setup(name, shape)
    for k, part in ((2, "optimal"), (4, edges), (5, "equal")):
        plan = make_plan(gm, hetero(k), partition=part, mode=mode, split="channels")
        plan = Plan.from_json(plan.to_json())  # what a follower gets: the split survives
        chans = _channel_stages(plan)
        assert chans, (name, k, mode)
        check_plan(plan)
        for s in chans:  # slices of whole units, laid in device order, covering every channel
            got = sorted(a.out_rows for a in s.assignments if a.out_rows[1] > a.out_rows[0])
            assert got[0][0] == 0 and got[-1][1] == s.output_shape[1]
            assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
            assert all(lo % UNIT == 0 for lo, _ in got)
        if part is edges:
            sizes = [a.out_rows[1] - a.out_rows[0] for s in chans for a in s.assignments]
            assert 0 in sizes, sizes  # a device holding no channels
        assert rel_err(simulate(gm, plan, x), ref) <= 1e-5, (name, k, part, mode)


@pytest.mark.parametrize("backend", [b for b in available_backends() if b not in ("torch", "openvino-bf16")])
def test_channel_slices_are_exact_on_every_backend(backend: str) -> None:
    _, gm, x, ref = _setup("gap", (2, 3, 32, 32))
    plan = make_plan(gm, hetero(3), partition=edges, split="channels")
    assert _channel_stages(plan)
    assert rel_err(simulate(gm, plan, x, backend=backend), ref) <= 1e-4


def test_auto_never_predicts_worse_than_rows_and_uses_channels_where_thin_strips_are_dear() -> None:
    _, gm, x, ref = _setup("vgg16", (2, 3, 32, 32))
    # devices that pay for every weight a call reads (thin strips of wide layers are dear)
    dear = Cluster([DeviceProfile(f"d{i}", a=1e-10, b=1e-4, bandwidth_bps=1e9, latency_s=1e-4,
                                  per_kind={"weights": [2e-9, 0.0]}) for i in range(4)])
    for cluster in (hetero(4), dear):
        rows = make_plan(gm, cluster, split="rows")
        auto = make_plan(gm, cluster, split="auto")
        assert auto.predicted_s <= rows.predicted_s * (1 + 1e-9)
        assert rel_err(simulate(gm, auto, x), ref) <= 1e-5
    assert _channel_stages(make_plan(gm, dear, split="auto"))
    assert not _channel_stages(make_plan(gm, dear, partition="equal"))  # the published partitioners: rows


def test_a_tail_is_cut_by_channels_only_where_every_op_acts_on_channels_alone() -> None:
    gm, x, ref = _resnet()
    plan = make_plan(gm, hetero(3), split="channels")
    assert not _channel_stages(plan)  # residual adds read two maps: no channel tail
    by = {n.name: n for n in gm.graph.nodes}
    assert splits_by_channels(gm, by["conv1"]) and not channel_local(gm, by["layer1_0_conv1"])
    assert not channel_local(gm, next(n for n in gm.graph.nodes if n.name.startswith("add")))
    assert rel_err(simulate(gm, plan, x), ref) <= 1e-5


def _resnet():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    return capture(model, tuple(x.shape)), x, ref


def test_a_device_holds_only_its_slice_of_a_channel_stages_weights() -> None:
    _, gm, x, _ = _setup("vgg11", (1, 3, 64, 64))
    plan = make_plan(gm, hetero(4), partition="equal", split="channels")
    st = _channel_stages(plan)[-1]
    conv = gm.get_submodule(str(next(n for n in gm.graph.nodes if n.name == st.nodes[0]).target))
    for a in st.assignments:
        prog = prepare(gm, plan, a.device).stages[st.index]
        if a.out_rows[1] <= a.out_rows[0]:
            assert prog is None
            continue
        sliced = [m for m in prog.run_graph.modules() if isinstance(m, SlicedConv)]
        assert len(sliced) == 1
        share = (a.out_rows[1] - a.out_rows[0]) / conv.out_channels
        assert sliced[0].weight.numel() == pytest.approx(conv.weight.numel() * share)
        assert sliced[0].weight.data_ptr() != conv.weight.data_ptr()  # its own copy: the layer can go


def test_channel_ranges_are_units_in_device_order() -> None:
    assert channel_ranges([2, 0, 1, 1], 60) == [(0, 32), (0, 0), (32, 48), (48, 60)]
    assert channel_ranges([0, 4], 64) == [(0, 0), (0, 64)]
