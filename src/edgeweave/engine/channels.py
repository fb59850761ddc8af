"""A device's slice of a stage split by output channels (plan.py: ``split == "channels"``).

Thin row strips of small, wide maps waste CPU: every device reads all of a layer's weights to
produce two or three rows (a 5-device VGG16 plan cut in rows everywhere cost 1.31x the compute
of the model; docs/planning.md). Cut by output channels instead, a device computes every row of
``c1 - c0`` of the layer's filters from the whole input map: it reads 1/k of the weights and its
GEMM keeps the map's full width.

A channel stage is a convolution (``groups == 1``) reading the stage input, followed by ops that
act on each channel alone (``channel_local``): activations, pooling, depthwise convolutions.
Every one of them runs on the device's channels only; a convolution (the first, and any
depthwise one) holds a contiguous copy of its slice of the weights (``SlicedConv``), made once
when the plan is prepared, so a board holds 1/k of such layers.

Reductions read a channel-split map too: a device's partial sum of a mean over H and W is its
channels' sums in place (zeros elsewhere: adding them is exact), and its share of a Linear layer
on the flattened map is its channels' columns of the weight (``columns.channel_columns``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from edgeweave.engine.lower import Segment
from edgeweave.engine.stage import by_name, module, stage_io
from edgeweave.layout import MAP, dense
from edgeweave.planning.graph import node_kind, node_shape, node_window, side_inputs, tensor_inputs
from edgeweave.planning.halo import Range
from edgeweave.planning.plan import Stage


class SlicedConv(nn.Module):
    """``conv`` restricted to output channels ``[c0, c1)``: a copy of its weights' slice. A
    depthwise convolution (``groups == in_channels``) reads the same channels of its input."""

    def __init__(self, conv: nn.Conv2d, c0: int, c1: int) -> None:
        super().__init__()
        fmt = MAP if conv.weight.is_contiguous(memory_format=MAP) else torch.contiguous_format
        # a copy (a slice of the rows of a contiguous weight is a view: it would keep the whole layer)
        self.weight = nn.Parameter(conv.weight.detach()[c0:c1].clone(memory_format=fmt), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach()[c0:c1].clone(), requires_grad=False)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = c1 - c0 if depthwise(conv) else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def depthwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups > 1 and conv.groups == conv.in_channels
            and conv.out_channels == conv.in_channels)


def _conv(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Conv2d | None:
    if node.op != "call_module":
        return None
    m = module(gm, node)
    return m if type(m) is nn.Conv2d and isinstance(m.padding, tuple) else None


def splits_by_channels(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node`` can open a channel stage: a plain convolution (``groups == 1``) on a map."""
    conv = _conv(gm, node)
    return conv is not None and conv.groups == 1 and node_kind(node) == "window"


def channel_local(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node`` computes each channel from the same channel of its one input alone (so it
    runs on a channel slice unchanged): a unary pointwise op, a pooling window op, or a
    depthwise convolution. Binary ops (residual adds, concatenations) and reductions are not."""
    ins = tensor_inputs(node)
    if len(ins) != 1 or side_inputs(node) or node.meta.get("ew_reduce") or node.meta.get("ew_small"):
        return False
    shape, src = node_shape(node), node_shape(ins[0])
    if shape is None or src is None or len(shape) != 4 or shape[1] != src[1]:
        return False
    kind = node_kind(node)
    if kind == "window":
        conv = _conv(gm, node)
        return depthwise(conv) if conv is not None else node_window(gm, node).op in ("max", "avg", "identity")
    if kind != "pointwise":
        return False
    if node.op == "call_module":  # per-channel parameters (PReLU, an unfolded BatchNorm) would need slicing
        return not any(True for _ in module(gm, node).parameters())
    return True


def lower_channels(gm: torch.fx.GraphModule, stage: Stage, c0: int, c1: int) -> Segment:
    """Channels ``[c0, c1)`` of the stage's output, every row, from the whole input map."""
    in_node, (out_node,) = stage_io(gm, stage)
    by = by_name(gm)
    nodes = [by[n] for n in stage.nodes]
    if not nodes or not splits_by_channels(gm, nodes[0]) or tensor_inputs(nodes[0]) != [in_node]:
        raise ValueError(f"stage {stage.index}: a channel split starts with a convolution on the stage input")
    g = torch.fx.Graph()
    attrs: dict[str, Any] = {}
    x = g.placeholder("x")
    env = {in_node.name: x}
    for i, node in enumerate(nodes):
        if i and not channel_local(gm, node):
            raise ValueError(f"stage {stage.index}: {node.name} does not act on each channel alone")
        target = "".join(ch if ch.isalnum() else "_" for ch in node.name)
        (inp,) = tensor_inputs(node)
        conv = _conv(gm, node)
        if conv is not None:
            attrs[target] = SlicedConv(conv, c0, c1)
            env[node.name] = g.call_module(target, (env[inp.name],))
        else:
            env[node.name] = g.node_copy(node, lambda n: env[n.name])
            if node.op == "call_module":
                attrs[str(node.target)] = module(gm, node)
    g.output((g.call_function(dense, (env[out_node.name],)),))
    shape = tuple(int(v) for v in node_shape(in_node) or [])
    return Segment(torch.fx.GraphModule(attrs, g, class_name="ChannelSlice"), (in_node.name,), ("__out__",),
                   (shape,), (True,), True)
