"""The devices' memory layout (layout.py): channels-last inside edgeweave, never in what the user holds."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from edgeweave.errors import EdgeweaveError
from edgeweave.layout import MAP, dense, device_copy, is_map_layout, ordinary
from edgeweave.planning.graph import capture


class Viewing(nn.Module):
    """A classifier that flattens with ``view``, as much user code does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.view(x.shape[0], -1))


def _model() -> Viewing:
    torch.manual_seed(0)
    m = Viewing().eval()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    return m


def test_device_copy_converts_only_its_own_conv_weights():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = device_copy(model)
    assert twin.conv.weight.is_contiguous(memory_format=MAP) and not twin.conv.weight.is_contiguous()
    # the user's model is untouched: same layout, same values
    assert model.conv.weight.is_contiguous()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # everything that is not a 4-D weight is shared, not copied (a board's memory)
    assert twin.fc.weight is model.fc.weight and twin.bn.running_mean is model.bn.running_mean
    assert twin.conv.bias is model.conv.bias
    assert twin.conv.weight is not model.conv.weight


def test_the_captured_graph_reshapes_where_the_model_views():
    model = _model()
    x = torch.randn(2, 3, 6, 6)
    nhwc = dense(x)
    with pytest.raises(RuntimeError):  # what a channels-last map does to ``view``
        model(nhwc.contiguous(memory_format=MAP))
    gm = capture(device_copy(model), [2, 3, 6, 6])
    assert not any(n.op == "call_method" and n.target == "view" for n in gm.graph.nodes)
    assert torch.allclose(gm(nhwc), model(x), rtol=1e-5, atol=1e-6)
    assert model(x).shape == (2, 5)  # the user's model still runs on ordinary maps


def test_a_view_to_another_dtype_is_left_alone():
    class Bits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(torch.int32)

    gm = capture(Bits(), [1, 4])
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["view"]


def test_dense_and_ordinary_layouts():
    x = torch.randn(1, 3, 4, 5)
    assert is_map_layout(dense(x)) and not is_map_layout(x)
    assert not is_map_layout(dense(torch.randn(1, 1, 4, 5)))  # one channel: both layouts at once
    pair = namedtuple("pair", "a b")
    out = ordinary(pair(dense(x), [dense(x), torch.ones(3)]))
    assert isinstance(out, pair) and out.a.is_contiguous() and out.b[0].is_contiguous()
    assert torch.equal(out.a, x) and torch.equal(out.b[1], torch.ones(3))


def test_a_model_that_cannot_be_copied_is_a_clear_error():
    model = _model()
    model.handle = open(__file__)  # noqa: SIM115 - an attribute deepcopy refuses
    try:
        with pytest.raises(EdgeweaveError, match="cannot copy the model"):
            device_copy(model)
    finally:
        model.handle.close()
