"""Halo arithmetic against direct slicing of real layer outputs (hypothesis over layer params)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeweave.engine import run_stage
from edgeweave.engine.windows import apply_window, fewer_copies
from edgeweave.planning.graph import capture, node_kind, window_of
from edgeweave.planning.halo import required_rows, window_in_rows, window_output_size
from edgeweave.planning.plan import Assignment, Stage

torch.set_num_threads(1)
# EW_HYPOTHESIS_EXAMPLES=2000 for a deeper local run; CI keeps the file fast.
SETTINGS = settings(max_examples=int(os.environ.get("EW_HYPOTHESIS_EXAMPLES", "120")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def window_layer(draw):
    op = draw(st.sampled_from(["conv", "max", "avg"]))
    k = draw(st.integers(1, 5))
    s = draw(st.integers(1, 3))
    kw = draw(st.integers(1, 3))
    if op == "conv":
        d = draw(st.integers(1, 3))
        p = draw(st.integers(0, k + 1))
        groups = draw(st.sampled_from([1, 2]))
        mod = nn.Conv2d(4, 4, (k, kw), stride=(s, draw(st.integers(1, 2))), padding=(p, draw(st.integers(0, 1))),
                        dilation=(d, 1), groups=groups, bias=draw(st.booleans()))
    elif op == "max":
        d = draw(st.integers(1, 2))
        p = draw(st.integers(0, k // 2))
        mod = nn.MaxPool2d((k, kw), stride=(s, 1), padding=(p, min(kw // 2, 1)), dilation=(d, 1),
                           ceil_mode=draw(st.booleans()))
    else:
        p = draw(st.integers(0, k // 2))
        mod = nn.AvgPool2d((k, kw), stride=(s, 1), padding=(p, min(kw // 2, 1)), ceil_mode=draw(st.booleans()),
                           count_include_pad=True if p > 0 else draw(st.booleans()))
    return mod.eval()


@SETTINGS
@given(mod=window_layer(), h=st.integers(1, 24), data=st.data())
def test_window_rows_match_direct_slicing(mod: nn.Module, h: int, data) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, h, 7)
    w = window_of(mod)
    assert w is not None
    try:
        y = mod(x)
    except RuntimeError:  # the layer does not fit this input size (PyTorch refuses too)
        return
    h_out = y.shape[2]
    assert window_output_size(w, h) == h_out
    a = data.draw(st.integers(0, h_out - 1))
    b = data.draw(st.integers(a + 1, h_out))
    lo, hi, pt, pb = window_in_rows(w, a, b, h)
    assert 0 <= lo <= hi <= h
    strip = apply_window(mod, w, x[:, :, lo:hi], pt, pb)
    torch.testing.assert_close(strip, y[:, :, a:b], rtol=1e-5, atol=1e-6)
    # Tightness: [lo, hi) is the clipped extent of the windows (a contiguous hull: with
    # dilation a few rows between taps may be carried along, never more than the extent).
    eff = w.d * (w.k - 1) + 1
    starts = [r * w.s - w.p for r in range(a, b)]
    touched = {i for st0 in starts for i in range(st0, st0 + eff, w.d) if 0 <= i < h}
    if touched:
        assert lo <= min(touched) and max(touched) < hi
    if hi > lo:
        assert lo >= max(starts[0], 0) and hi <= min(starts[-1] + eff, h)
    else:  # only padding is read
        assert not touched

    # fewer_copies: more held rows and symmetric padding where they give the same rows
    stop = data.draw(st.integers(hi, h))
    lo2, hi2, pt2, pb2 = fewer_copies(w, lo, hi, pt, pb, stop, b - a)
    assert (lo2, pt2) == (lo, pt) and hi <= hi2 <= stop and pb <= pb2 <= max(pt, pb)
    strip = apply_window(mod, w, x[:, :, lo2:hi2], pt2, pb2)
    torch.testing.assert_close(strip, y[:, :, a:b], rtol=1e-5, atol=1e-6)


@st.composite
def small_net(draw):
    layers: list[nn.Module] = []
    c = 3
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "max", "avg", "bn"]))
        if kind == "conv":
            k = draw(st.integers(1, 4))
            layers.append(nn.Conv2d(c, 4, k, stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, k)),
                                    dilation=draw(st.integers(1, 2))))
            layers.append(nn.ReLU(inplace=True))
            c = 4
        elif kind == "max":
            k = draw(st.integers(1, 3))
            layers.append(nn.MaxPool2d(k, draw(st.integers(1, 2)), padding=draw(st.integers(0, k // 2)),
                                       ceil_mode=draw(st.booleans())))
        elif kind == "avg":
            k = draw(st.integers(1, 3))
            layers.append(nn.AvgPool2d(k, draw(st.integers(1, 2)), padding=draw(st.integers(0, k // 2)),
                                       ceil_mode=draw(st.booleans())))
        else:
            bn = nn.BatchNorm2d(c)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            layers.append(bn)
    return nn.Sequential(*layers).eval()


@SETTINGS
@given(net=small_net(), h=st.integers(6, 20), data=st.data())
def test_fused_block_strip_equals_slice_of_full_output(net: nn.Sequential, h: int, data) -> None:
    """Backward propagation through a fused block + the strip interpreter are exact."""
    torch.manual_seed(1)
    x = torch.randn(1, 3, h, 9)
    try:
        with torch.no_grad():
            y = net(x)
    except RuntimeError:
        return
    if y.shape[2] == 0:
        return
    gm = capture(net, x.shape)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert all(node_kind(n) in ("window", "pointwise") for n in nodes)
    inp = next(n for n in gm.graph.nodes if n.op == "placeholder")
    a = data.draw(st.integers(0, y.shape[2] - 1))
    b = data.draw(st.integers(a + 1, y.shape[2]))
    need = required_rows(gm, nodes, nodes[-1], (a, b))
    lo, hi = need.get(inp.name, (0, 0))
    if hi <= lo:
        lo, hi = 0, 1
    stage = Stage(0, "spatial", [n.name for n in nodes], list(x.shape), list(y.shape),
                  [Assignment(0, (lo, hi), (a, b))])
    strip = run_stage(gm, stage, 0, x[:, :, lo:hi])
    torch.testing.assert_close(strip, y[:, :, a:b], rtol=1e-5, atol=1e-5)


def test_avgpool_without_pad_counting_is_not_split() -> None:
    assert window_of(nn.AvgPool2d(3, 1, padding=1, count_include_pad=False)) is None
    assert window_of(nn.AvgPool2d(3, 1, padding=0, count_include_pad=False)) is not None
    assert window_of(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")) is None


def test_training_mode_batchnorm_is_global() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    gm = capture(net.train(), (1, 3, 8, 8))
    kinds = {n.name: node_kind(n) for n in gm.graph.nodes}
    assert kinds["_1"] == "global"
    before = net[1].running_mean.clone()
    gm = capture(net, (1, 3, 8, 8))  # shape propagation must not update the running stats
    assert torch.equal(before, net[1].running_mean)
    assert net.training and net[1].training
    # in eval mode it is folded into the convolution (planning/fold.py); alone it is pointwise
    assert "_1" not in {n.name for n in capture(net.eval(), (1, 3, 8, 8)).graph.nodes}
    alone = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)).eval()
    assert {n.name: node_kind(n) for n in capture(alone, (1, 3, 8, 8)).graph.nodes}["_1"] == "pointwise"
