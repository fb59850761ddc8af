"""Graph capture, node kinds, cut points and fusion choices."""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeweave.models import build_model
from edgeweave.engine import simulate
from edgeweave.planning.fusion import atomic_segments, choose_blocks
from edgeweave.planning.graph import capture, node_kind
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster, DeviceProfile

torch.set_num_threads(1)


def test_capture_is_deterministic_and_annotated() -> None:
    a = capture(build_model("resnet18").eval(), (1, 3, 64, 64))
    b = capture(build_model("resnet18").eval(), (1, 3, 64, 64))
    na = [(n.name, node_kind(n), n.meta["ew_shape"]) for n in a.graph.nodes]
    nb = [(n.name, node_kind(n), n.meta["ew_shape"]) for n in b.graph.nodes]
    assert na == nb
    kinds = {n.name: node_kind(n) for n in a.graph.nodes}
    assert kinds["maxpool"] == "window" and kinds["conv1"] == "window"
    assert kinds["layer2_0_downsample_0"] == "window" and kinds["add"] == "pointwise"
    assert kinds["avgpool"] == "global" and kinds["flatten"] == "global" and kinds["fc"] == "linear"
    shapes = {n.name: n.meta["ew_shape"] for n in a.graph.nodes}
    assert shapes["maxpool"] == [1, 64, 16, 16]


def test_resnet_cut_points_are_between_blocks() -> None:
    gm = capture(build_model("resnet18").eval(), (1, 3, 64, 64))
    segs = atomic_segments(gm)
    outs = [s.output.name for s in segs if s.output is not None]
    # stem: conv1 | bn1+relu stay with conv1 | maxpool; then one segment per BasicBlock
    assert outs[:2] == ["relu", "maxpool"]
    assert outs[2:10] == ["layer1_0_relu_1", "layer1_1_relu_1", "layer2_0_relu_1", "layer2_1_relu_1",
                          "layer3_0_relu_1", "layer3_1_relu_1", "layer4_0_relu_1", "layer4_1_relu_1"]
    assert [s.kind for s in segs] == ["spatial"] * 10 + ["leader", "leader", "linear"]


def test_choose_blocks_modes() -> None:
    pools = [False, True, False, False, True, False]
    assert choose_blocks(6, "none", pools) == [(i, i + 1) for i in range(6)]
    assert choose_blocks(6, "pools", pools) == [(0, 2), (2, 5), (5, 6)]
    # DP: fusing costs a fixed 1.0 per block plus the square of its length
    blocks = choose_blocks(6, "auto", pools, lambda i, j: 1.0 + (j - i) ** 2)
    assert sum(j - i for i, j in blocks) == 6 and all(j - i in (1, 2) for i, j in blocks)
    best = min(
        sum(1.0 + (b - a) ** 2 for a, b in zip((0, *cuts), (*cuts, 6)))
        for r in range(6) for cuts in itertools.combinations(range(1, 6), r)
    )
    assert sum(1.0 + (j - i) ** 2 for i, j in blocks) == best


class Branchy(nn.Module):
    """Concat of branches with different kernels, a residual, an unknown op and a view."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b3 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=2, dilation=2), nn.ReLU())
        self.b5 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 4, (5, 3), padding=(2, 1)))
        self.mix = nn.Conv2d(12, 8, 3, padding=1, groups=4)
        self.pool = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True)
        self.odd = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(8 * 6 * 5, 6)  # 19x17 input -> 6x5 maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = torch.cat([self.b1(x), self.b3(x), self.b5(x)], dim=1)
        x = x + self.mix(y).sigmoid()
        x = self.pool(x)
        x = torch.roll(self.odd(x), 1, dims=3)  # not understood: runs on the leader
        return self.head(x.view(x.shape[0], -1))


def test_branches_concat_and_unknown_ops_plan_exactly() -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(2, 3, 19, 17)
    with torch.no_grad():
        ref = model(x)
    gm = capture(model, x.shape)
    kinds = {n.name: node_kind(n) for n in gm.graph.nodes}
    assert kinds["cat"] == "pointwise" and kinds["odd"] == "global" and kinds["roll"] == "global"
    cluster = Cluster([DeviceProfile(f"d{i}", a=1e-9, bandwidth_bps=1e10) for i in range(3)])
    for part, fus, mode in itertools.product(("equal", "optimal"), ("none", "pools", "auto"), ("gather", "exchange")):
        plan = make_plan(gm, cluster, partition=part, fusion=fus, mode=mode)
        assert plan.stages[0].kind == "spatial"
        y = simulate(gm, plan, x)
        assert float((y - ref).abs().max() / ref.abs().max()) <= 1e-5, (part, fus, mode)


def test_small_cnn_full_product() -> None:
    """Every partitioner x fusion x mode x 1-4 devices on a small model."""
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    gm = capture(model, x.shape)
    for k, part, fus, mode in itertools.product(range(1, 5), ("equal", "bodp", "ocbp", "optimal"),
                                                ("none", "pools", "auto"), ("gather", "exchange")):
        cluster = Cluster([DeviceProfile(f"d{i}", a=1e-9 * (1 + i), bandwidth_bps=1e10) for i in range(k)])
        plan = make_plan(gm, cluster, partition=part, fusion=fus, mode=mode)
        y = simulate(gm, plan, x)
        assert float((y - ref).abs().max() / ref.abs().max()) <= 1e-5, (k, part, fus, mode)


class TwoHeads(nn.Module):
    """Returns a tuple; the second head reads a value the first head also reads."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.h1 = nn.Linear(4, 2)
        self.h2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.c2(torch.relu(self.c1(x)))
        a = self.h1(y.mean((2, 3)))
        z = torch.relu(self.c2(y))
        return a, self.h2(z.mean((2, 3)))


def test_tuple_outputs_end_in_a_leader_stage() -> None:
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    gm = capture(model, x.shape)
    for mode in ("gather", "exchange"):
        plan = make_plan(gm, Cluster.uniform(3, a=1e-8), partition="equal", mode=mode)
        assert plan.stages[0].kind == "spatial" and plan.stages[-1].kind == "leader"
        out = simulate(gm, plan, x)
        assert isinstance(out, tuple) and len(out) == 2
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
