"""Eval-mode BatchNorm folded into the convolution before it (planning/fold.py)."""

from __future__ import annotations

import torch
from torch import nn

from edgeweave.layout import device_copy
from edgeweave.planning.graph import capture

torch.set_num_threads(1)


class TwoReaders(nn.Module):
    """A conv whose output a BatchNorm and a residual read: not foldable (the residual needs the
    unnormalised map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def _trained_bn(m: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.randn(mod.num_features, generator=g))
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=g))
    return m


def test_conv_batchnorm_pairs_fold_and_the_graph_computes_the_same() -> None:
    torch.manual_seed(0)
    net = _trained_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = net(x)
    weight = net[0].weight.clone()
    gm = capture(net, tuple(x.shape))
    assert not any(isinstance(gm.get_submodule(str(n.target)), nn.BatchNorm2d)
                   for n in gm.graph.nodes if n.op == "call_module")
    with torch.no_grad():
        y = gm(x)
    assert float((y - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert ref.abs().max() > 0.1  # not a degenerate reference
    # the model itself is untouched: its conv and BatchNorm are still there, with their weights
    assert torch.equal(net[0].weight, weight) and isinstance(net[1], nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(net(x), ref)


def test_only_certain_pairs_fold() -> None:
    torch.manual_seed(0)
    two = _trained_bn(TwoReaders()).eval()
    gm = capture(two, (1, 3, 8, 8))
    assert any(n.target == "bn" for n in gm.graph.nodes)  # the conv has a second reader
    train = _trained_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    gm = capture(train, (1, 3, 8, 8))
    assert any(n.target == "1" for n in gm.graph.nodes)  # training mode: batch statistics


def test_a_channels_last_model_keeps_its_layout_when_folded() -> None:
    net = device_copy(_trained_bn(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16))).eval())
    gm = capture(net, (1, 3, 8, 8))
    conv = gm.get_submodule("0")
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
