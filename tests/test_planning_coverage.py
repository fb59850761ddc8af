"""The ops torchvision's classification models are made of, split into strips exactly.

Functional pooling (Inception), eval-mode stochastic depth and dropout (EfficientNet, ConvNeXt),
channel shuffles and chunks (ShuffleNet), ConvNeXt's channels-last per-pixel layers and its
``[C, 1, 1]`` layer scale: each is captured as a row-local kind (``planning.graph``,
``planning.rewrite``) and every plan that cuts it into strips gives the model's own output
(``engine.simulate``, every device in turn). Also: FLOPs from ``torch.utils.flop_counter``,
the kinds that price them, the split report and the degenerate-reference check.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeweave.engine import simulate
from edgeweave.models.calibrate import calibrated_copy, degenerate_reason
from edgeweave.planning.cost import flop_kind, node_flops
from edgeweave.planning.coverage import ATTENTION, split_report
from edgeweave.planning.graph import capture, node_kind, node_window
from edgeweave.planning.planner import make_plan
from edgeweave.planning.rewrite import PerPixel, channel_take
from edgeweave.profiling.flops import ELEMENTWISE_OPS
from edgeweave.profiling.profile import Cluster, DeviceProfile

torch.set_num_threads(1)


def hetero(k: int) -> Cluster:
    return Cluster([DeviceProfile(f"d{i}", a=1e-10 * (1 + 0.5 * i), b=1e-4, bandwidth_bps=1e8, latency_s=1e-4)
                    for i in range(k)])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


def assert_exact_on_strips(model: nn.Module, shape: tuple[int, ...], kinds: dict[str, str] | None = None):
    """Every (partition, fusion, mode) with 2-4 devices gives the model's output; the graph's
    nodes named in ``kinds`` have those kinds; at least one plan splits every spatial block."""
    torch.manual_seed(0)
    model = model.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
    gm = capture(model, shape)
    for name, kind in (kinds or {}).items():
        node = next(n for n in gm.graph.nodes if n.name == name)
        assert node_kind(node) == kind, (name, node_kind(node))
    assert degenerate_reason(model, x, ref) is None  # the comparison below means something
    for i, (part, fus, mode) in enumerate(itertools.product(("equal", "optimal"), ("none", "auto"),
                                                            ("gather", "exchange"))):
        plan = make_plan(gm, hetero(2 + i % 3), partition=part, fusion=fus, mode=mode)
        assert rel_err(simulate(gm, plan, x), ref) <= 1e-5, (part, fus, mode)
    plan = make_plan(gm, hetero(3), partition="equal", fusion="none", mode="exchange")
    assert split_report(gm, plan)["split_flops_fraction"] >= 0.9
    return gm


class FunctionalPools(nn.Module):
    """Inception's functional pooling, and the cases the Window must describe fully."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x), inplace=True)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # Inception's stem
        a = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)  # Inception's branch_pool
        b = F.max_pool2d(x, (3, 1), (1, 1), (1, 0), ceil_mode=True)  # rectangular, ceil mode
        c = F.avg_pool2d(x, (1, 3), 1, (0, 1), True, False)  # count_include_pad False, padding along W only
        x = self.c2(a + b + c)
        return F.avg_pool2d(x, 3, 2, 1, ceil_mode=True) + F.max_pool2d(x, 2, 2, ceil_mode=True)


def test_functional_pooling_is_a_window_op_and_exact_on_strips():
    gm = assert_exact_on_strips(FunctionalPools(), (1, 3, 39, 31), {f"{op}{i}": "window" for op in ("max_pool2d", "avg_pool2d") for i in ("", "_1", "_2")})
    by = {n.name: n for n in gm.graph.nodes}
    w = node_window(gm, by["max_pool2d_1"])
    assert (w.op, w.kernel, w.stride, w.p, w.pad_w, w.ceil_mode) == ("max", (3, 1), (1, 1), 1, 0, True)
    w = node_window(gm, by["avg_pool2d_1"])
    assert (w.op, w.kernel, w.p, w.pad_w, w.count_include_pad, w.ceil_mode) == ("avg", (1, 3), 0, 1, False, True)
    assert flop_kind(gm, by["avg_pool2d"]) == "pool"


def test_avg_pool_without_padding_in_its_divisor_stays_whole():
    class M(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    gm = capture(M(), (1, 2, 8, 8))
    assert node_kind(next(n for n in gm.graph.nodes if n.name == "avg_pool2d")) == "global"


class StochasticBlock(nn.Module):
    """EfficientNet's and ConvNeXt's residual block ends: stochastic depth, then dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.sd = __import__("torchvision").ops.StochasticDepth(0.2, "row")

    def forward(self, x):
        y = F.dropout(self.sd(self.conv(x)), 0.3, training=self.training)
        return F.silu(x + y)


def test_eval_stochastic_depth_and_dropout_are_identities():
    gm = assert_exact_on_strips(StochasticBlock(), (1, 6, 20, 12))
    targets = {str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes}
    assert "stochastic_depth" not in targets and "dropout" not in targets
    # training mode: random, so kept (and global)
    gm = capture(StochasticBlock().train(), (2, 6, 8, 8))
    assert {node_kind(n) for n in gm.graph.nodes if "stochastic" in n.name} == {"global"}


class ShuffleBlock(nn.Module):
    """ShuffleNet V2's block: chunk, a branch, concatenation, channel shuffle."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.ReLU(), nn.Conv2d(c // 2, c // 2, 3, 1, 1, groups=c // 2))
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 3, stride=2, padding=1)

    @staticmethod
    def shuffle(x, groups):
        b, c, h, w = x.size()
        x = x.view(b, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(b, -1, h, w)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(2):
            x1, x2 = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)
        a, b = torch.split(x, [3, 5], dim=1)  # uneven split, then a slice of channels
        return self.head(torch.cat([b, a[:, 1:]], 1).relu()[:, 1:])


def test_channel_shuffle_chunk_and_split_are_pointwise_channel_selections():
    gm = assert_exact_on_strips(ShuffleBlock(), (1, 3, 23, 17))
    takes = [n for n in gm.graph.nodes if n.target is channel_take]
    assert len(takes) >= 5 and all(node_kind(n) == "pointwise" for n in takes)
    assert not any(n.op == "call_method" and n.target in ("view", "reshape", "transpose", "chunk") for n in gm.graph.nodes)
    # a shuffle then a chunk: the halves of the shuffled channels (0 4 1 5 2 6 3 7), found by
    # running the ops on codes
    assert {(0, 4, 1, 5), (2, 6, 3, 7)} <= {n.args[1] for n in takes}


def test_reshapes_that_move_rows_are_left_alone():
    class M(nn.Module):
        def forward(self, x):
            b, c, h, w = x.shape
            y = x.view(b, c, w, h)  # rows and columns mixed
            z = x.transpose(2, 3).contiguous().transpose(2, 3)  # back where they were: allowed
            return y.sum() + z

    gm = capture(M(), (1, 2, 4, 6))
    kinds = {n.name: node_kind(n) for n in gm.graph.nodes}
    assert kinds.get("view") == "global"
    x = torch.randn(1, 2, 4, 6)
    assert torch.equal(gm(x), M()(x))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, then LayerNorm, Linear, GELU, Linear on every pixel of
    a channels-last map, a [C, 1, 1] layer scale, stochastic depth, the residual add; and its
    LayerNorm2d (permute, F.layer_norm, permute)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        tv = __import__("torchvision")
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.norm2d = tv.models.convnext.LayerNorm2d(c)
        self.block = tv.models.convnext.CNBlock(c, layer_scale=0.5, stochastic_depth_prob=0.1)
        with torch.no_grad():
            self.block.layer_scale.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.block(self.norm2d(self.stem(x)))


def test_convnext_per_pixel_layers_and_layer_scale_are_pointwise():
    gm = assert_exact_on_strips(ConvNeXtBlock(), (1, 3, 52, 36))
    pixels = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), PerPixel)]
    assert len(pixels) == 6 and all(node_kind(n) == "pointwise" for n in pixels)  # norm, LN, fc, GELU, fc, scale
    assert not any(n.op == "get_attr" or "permute" in str(n.target) for n in gm.graph.nodes)
    kinds = sorted(flop_kind(gm, n) for n in pixels)
    assert kinds == ["matmul", "matmul", "norm", "norm", "other", "other"]


def test_efficientnet_blocks_are_exact_in_float64():
    """EfficientNet-V2's blocks as torchvision builds them (Fused-MBConv, MBConv with
    squeeze-excitation and eval-mode stochastic depth, 3x3 and 5x5 stride-2 depthwise kernels),
    on an odd input (padding at every cut), cut into rows and by channels: in float64 every plan
    gives the single-device output to 1e-12, i.e. the strips compute the same sums, not sums
    within rounding. A float32 check cannot tell this for a deep calibrated random EfficientNet
    at 64 px: EfficientNet-V2-M's output moves by 0.32 of its size when its input moves by 1e-7
    (``degenerate_reason``: too sensitive), so float32 rounding alone decided its "rel_err 0.34"
    on strips; in float64 its strips match one device to 5e-8, growing block by block like a
    1e-15 nudge of the input does (B5-B7 with the zoo test's weights likewise)."""
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    torch.manual_seed(0)
    blocks = [FusedMBConvConfig(1, 3, 1, 8, 8, 1), FusedMBConvConfig(4, 3, 2, 8, 16, 2),
              MBConvConfig(4, 3, 2, 16, 24, 2), MBConvConfig(6, 5, 2, 24, 32, 2)]
    shape = (1, 3, 33, 29)
    model, _ = calibrated_copy(EfficientNet(blocks, 0.2, 0.2, num_classes=10, last_channel=64).eval(), shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert degenerate_reason(model, x, model(x)) is None
    gm = capture(model, shape)
    assert not any("stochastic_depth" in str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes)
    plans = {(k, fus, mode, split): make_plan(gm, Cluster.uniform(k), partition="equal", fusion=fus, mode=mode,
                                              split=split)
             for k, (fus, mode, split) in zip(itertools.cycle((2, 3, 4)), itertools.product(
                 ("none", "auto"), ("gather", "exchange"), ("rows", "channels")))}
    assert any(st.split == "channels" for p in plans.values() for st in p.stages)
    gm.double()  # after planning: the plans name nodes, the values are what change
    x64 = x.double()
    with torch.no_grad():
        ref = gm(x64)
    for key, plan in plans.items():
        assert rel_err(simulate(gm, plan, x64), ref) <= 1e-12, key


def test_flops_are_counted_by_torch_flop_counter():
    """Convolutions keep EdgeLD's convention (the counter plus the bias); linear layers on tokens,
    attention, norms and activations are counted (the counter misses none of them)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.ln = nn.LayerNorm(16)
            self.fc = nn.Linear(16, 32)

        def forward(self, x):
            x = F.gelu(self.dw(self.conv(x)))
            t = x.flatten(2).transpose(1, 2)  # [1, 64, 16] tokens
            t = self.ln(t + self.attn(t, t, t, need_weights=False)[0])
            return self.fc(t)

    gm = capture(M().eval(), (1, 3, 8, 8))
    by = {n.name: n for n in gm.graph.nodes}
    assert node_flops(gm, by["conv"]) == 2 * 64 * 16 * (3 * 9 + 1)  # EdgeLD: 2*H*W*(Cin*K^2+1)*Cout
    assert flop_kind(gm, by["conv"]) == "conv" and flop_kind(gm, by["dw"]) == "conv_dw"
    assert node_flops(gm, by["fc"]) == 2 * 64 * 16 * 32 and flop_kind(gm, by["fc"]) == "matmul"
    attn = by["attn"]  # a tuple-valued node: its FLOPs still count
    e, t = 16, 64
    assert node_flops(gm, attn) == 4 * 2 * t * e * e + 2 * 2 * t * t * e and flop_kind(gm, attn) == "matmul"
    assert node_flops(gm, by["ln"]) == 5 * t * e and flop_kind(gm, by["ln"]) == "norm"
    assert node_flops(gm, by["gelu"]) == ELEMENTWISE_OPS["gelu"] * 64 * 16 and flop_kind(gm, by["gelu"]) == "other"


def test_split_report_names_what_runs_on_the_leader_and_why():
    tv = __import__("torchvision")
    vit = tv.models.vit_b_32(image_size=64, num_classes=10).eval()
    gm = capture(vit, (1, 3, 64, 64))
    plan = make_plan(gm, Cluster.uniform(3), partition="equal", fusion="none", mode="exchange")
    rep = split_report(gm, plan)
    assert rep["split_flops_fraction"] < 0.1 and rep["transformer"]
    whys = {u["node"]: u["why"] for u in rep["unsplit_nodes"]}
    assert whys["encoder_layers_encoder_layer_0_self_attention"] == ATTENTION
    assert "token sequence" in whys["encoder_layers_encoder_layer_0_mlp_0"]
    assert [u["flops"] for u in rep["unsplit_nodes"]] == sorted((u["flops"] for u in rep["unsplit_nodes"]), reverse=True)
    # a CNN: everything but the classifier split
    gm = capture(ShuffleBlock().eval(), (1, 3, 32, 32))
    rep = split_report(gm, make_plan(gm, Cluster.uniform(3), partition="equal", fusion="none", mode="exchange"))
    assert rep["split_flops_fraction"] > 0.99 and not rep["transformer"]


def test_degenerate_references_are_detected_and_calibration_fixes_them():
    tv = __import__("torchvision")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    vit = tv.models.vit_b_32(image_size=32, num_classes=10).eval()  # its head is all zeros
    with torch.no_grad():
        assert "too small" in degenerate_reason(vit, x, vit(x))
    twin, done = calibrated_copy(vit, (1, 3, 32, 32))
    with torch.no_grad():
        assert degenerate_reason(twin, x, twin(x)) is None and vit(x).abs().max() == 0
    assert any("zero" in d for d in done)

    class Bias(nn.Module):  # the maps die out: the output is the classifier's bias
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    m = Bias().eval()
    with torch.no_grad():
        assert "does not depend on the input" in degenerate_reason(m, x, m(x))
        assert "constant" in degenerate_reason(m, x, torch.full((1, 5), 3.0))
    bn = tv.models.efficientnet_b0(num_classes=10).eval()  # ~1e-13 outputs with the initial statistics
    with torch.no_grad():
        assert degenerate_reason(bn, x, bn(x)) is not None
        twin, done = calibrated_copy(bn, (1, 3, 32, 32))
        assert degenerate_reason(twin, x, twin(x)) is None and any("BatchNorm" in d for d in done)
