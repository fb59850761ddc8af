"""Blocks split by output channels: which blocks may be, and what one costs (plan.py: ``split``).

A row strip of a small, wide map makes every device read all of a layer's weights to produce a
few rows: the five devices of a VGG16 plan cut in rows everywhere spent 1.31x the compute of the
model, most of it at 28 and 14 px. A block split by output channels gives each device every row
of a slice of the filters (multiples of ``UNIT``, the kernels' blocking of output channels) from
the whole input map, which must first be assembled on every device that takes part.

The planner considers channel blocks at the tail of a run of spatial segments only (rows where
the maps are large, channels where they are small: a map split by channels never goes back to
rows, since every device would need every channel of its rows); a ``channels`` block is a
convolution with ``groups == 1`` followed by ops that act on each channel alone
(``engine.channels.channel_local``). Whether a tail is cut by channels, and from which segment
on, is decided by the predicted time of the whole run (``planner._blocks``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx

from edgeweave.engine.channels import channel_local, splits_by_channels
from edgeweave.planning.cost import WEIGHTS, Work, aggregate, flop_kind, node_flops, node_weights, wire_row_bytes
from edgeweave.planning.fusion import Segment
from edgeweave.planning.graph import node_shape, tensor_inputs
from edgeweave.planning.halo import EMPTY, Range

UNIT = 16  # output channels per slice unit (oneDNN blocks filters by 16: 1.1-1.45x slower otherwise)
SMALL_MAP = 64  # rows: a tail is considered from the first block whose output is at most this high


def channel_blocks(gm: torch.fx.GraphModule, run: Sequence[Segment]) -> list[list[Segment]] | None:
    """``run`` grouped into channel blocks (each opened by a plain convolution reading the
    segment's input, then segments acting on each channel alone), or None when it cannot be."""
    groups: list[list[Segment]] = []
    for seg in run:
        first = seg.nodes[0] if seg.nodes else None
        rest_local = all(channel_local(gm, n) for n in seg.nodes[1:])
        if first is not None and splits_by_channels(gm, first) and tensor_inputs(first) == [seg.input] and rest_local:
            groups.append([seg])
        elif groups and first is not None and channel_local(gm, first) and rest_local:
            groups[-1].append(seg)
        else:
            return None
    return groups


def tail_starts(gm: torch.fx.GraphModule, run: Sequence[Segment]) -> list[int]:
    """The positions ``p`` from which ``run[p:]`` can be cut by channels (its maps small)."""
    out = []
    for p in range(len(run)):
        shape = node_shape(run[p].output) if run[p].output is not None else None
        if shape is None or len(shape) != 4 or int(shape[2]) > SMALL_MAP:
            continue
        if channel_blocks(gm, run[p:]) is not None:
            out.append(p)
    return out


def units(channels: int) -> int:
    """How many slice units ``channels`` output channels make (the last may be short)."""
    return -(-channels // UNIT)


def channel_ranges(counts: Sequence[int], channels: int) -> list[Range]:
    """Device d's output channels for ``counts[d]`` units, slices laid in device order."""
    out, cur = [], 0
    for n in counts:
        hi = min(channels, cur + n * UNIT)
        out.append((cur, hi) if n > 0 and hi > cur else EMPTY)
        cur = hi
    return out


def slice_work(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node], share: float) -> Work:
    """The work of computing a ``share`` of every node's output channels: that share of its
    FLOPs, and of the weights it reads (``cost.node_weights``, kind ``weights``), one call each."""
    whole = aggregate([(flop_kind(gm, n), node_flops(gm, n)) for n in nodes]
                      + [(WEIGHTS, node_weights(gm, n)) for n in nodes])
    return {k: (f * share, c) for k, (f, c) in whole.items()} if share > 0 else {}


def unit_bytes(node: torch.fx.Node | None, axis: int) -> float:
    """Bytes on the wire per unit of ``node``'s value along ``axis``: a row (2) or a channel (1)."""
    shape = node_shape(node) if node is not None else None
    if axis != 1 or shape is None or len(shape) != 4:
        return wire_row_bytes(node)
    return wire_row_bytes(node) * int(shape[2]) / max(int(shape[1]), 1)
