"""Links priced by the bytes the runtime's codec sends (runtime/codec.py, planning/cost.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.models import build_model
from edgeweave.planning.cost import row_bytes, wire_row_bytes
from edgeweave.engine import simulate
from edgeweave.planning.graph import capture, measure_density, node_shape
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster, DeviceProfile
from edgeweave.runtime import codec

torch.set_num_threads(1)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), zeros=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_the_priced_ratio_bounds_what_the_codec_sends(n, zeros, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.rand(n, generator=g) < zeros] = 0.0
    density = float(torch.count_nonzero(x)) / n
    sent = codec.encode(x).numel() - codec.HEADER
    # the price is the codec's size up to the mask's padding to whole 8-byte words
    assert sent <= 4 * n * codec.wire_ratio(density) + 8
    assert codec.wire_ratio(density) <= 1.0 and codec.wire_ratio(None) == 1.0


def _vgg():
    torch.manual_seed(0)
    model = build_model("vgg11", num_classes=10, in_channels=3).eval()
    return model, capture(model, (1, 3, 64, 64))


def test_density_is_measured_once_per_graph_on_a_seeded_input():
    _model, gm = _vgg()
    measure_density(gm)
    def of(kind):
        return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)]

    relus, convs = of(torch.nn.ReLU), of(torch.nn.Conv2d)
    assert relus and all(0.3 < n.meta["ew_density"] < 0.7 for n in relus)  # about half are zero
    assert convs and all(n.meta["ew_density"] > 0.99 for n in convs)
    relu = relus[0]
    assert wire_row_bytes(relu) < 0.85 * row_bytes(node_shape(relu))
    relu.meta["ew_density"] = 0.123
    measure_density(gm)  # the same seed: not measured again
    assert relu.meta["ew_density"] == 0.123


@pytest.mark.parametrize("mode", ["gather", "exchange"])
def test_a_slow_link_is_priced_by_the_coded_bytes_and_the_plan_stays_exact(mode):
    model, gm = _vgg()
    _m2, raw = _vgg()
    raw.meta["ew_density_seed"] = 0  # never measured: every link priced raw
    cl = Cluster([DeviceProfile(f"d{i}", a=2e-10, b=1e-4, bandwidth_bps=20e6, latency_s=1e-4) for i in range(3)])
    coded = make_plan(gm, cl, partition="optimal", fusion="pools", mode=mode)
    priced_raw = make_plan(raw, cl, partition="optimal", fusion="pools", mode=mode)
    assert coded.predicted_s < priced_raw.predicted_s
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(simulate(gm, coded, x), ref, rtol=1e-4, atol=1e-5)
