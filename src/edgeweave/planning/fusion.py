"""Fusion: where the graph may be cut into stages, and which cuts to keep.

A *candidate cut* is a position in topological order where exactly one tensor value is live
(between VGG layers, between ResNet blocks; never inside a residual block, where the block input
is still needed by the skip branch). Because only one value crosses a cut, every stage has one
input and one output value, which is what the Plan schema and the halo arithmetic need.
Pointwise ops stay with their producer: no cut right before a pointwise op that reads the value
just produced (a strip boundary between a conv and its ReLU would only add a transfer).

The atomic pieces between consecutive candidate cuts are ``Segment`` s, classified as

* ``spatial``: only window and pointwise ops on 4-D maps: its rows can be split into strips;
* ``linear``: an ``nn.Linear`` on a 2-D input followed by unary pointwise ops: split by output
  features;
* ``leader``: anything else, run whole on the leader. A leader segment made only of reductions
  over H and W of its input (``graph.reduction_of``, e.g. a final global average pool) and
  small ops on their results is *reducible* (``is_reduce_segment``): the planner computes it
  from partial sums of the strips where they are, without gathering the map. A Linear layer on
  the flattened map (VGG's first classifier layer) is such a reduction too; no cut separates it
  from its flatten.

A spatial segment may also contain reductions (a channel-attention squeeze): its small nodes
(``graph.is_small``) are computed whole from exact partial sums, and elementwise ops broadcast
them over the map (``graph.side_inputs``).

Fusion modes choose which cuts between consecutive spatial segments to keep:
``none`` (all: layer-wise), ``pools`` (EdgeLD: a block ends after a pooling op) and ``auto``
(dynamic programming over the cut points minimising the sum of predicted block times, the
planner supplying the block cost, which trades halo recomputation against communication).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.fx

from edgeweave.planning.graph import (
    is_folded,
    is_small,
    node_kind,
    node_reduce,
    node_shape,
    node_window,
    reduce_source,
    side_inputs,
    tensor_inputs,
)

FUSION_MODES = ("none", "pools", "auto")


@dataclass
class Segment:
    nodes: list[torch.fx.Node]
    input: torch.fx.Node
    output: torch.fx.Node | None  # None: the model's output is not a single node (a tuple)
    kind: str  # spatial | linear | leader

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]


def _classify(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], inp: torch.fx.Node, out: torch.fx.Node | None) -> str:
    if out is None:
        return "leader"
    in_shape, out_shape = node_shape(inp), node_shape(out)
    if in_shape is None or out_shape is None:
        return "leader"
    if (
        len(in_shape) == 4
        and all(node_kind(n) in ("window", "pointwise") for n in nodes)
        and all(len(node_shape(n) or []) == 4 for n in nodes)
    ):
        return "spatial"
    if len(in_shape) == 4 and not is_small(inp) and not is_small(out) and _reducible(nodes, inp, out):
        return "spatial"
    return _classify_rest(nodes, inp, out, in_shape)


def _reducible(nodes: list[torch.fx.Node], inp: torch.fx.Node, out: torch.fx.Node) -> bool:
    """Spatial-with-reductions (out is a map) or reduce (out is small); see the module docstring."""
    names = {n.name for n in nodes} | {inp.name}
    if not any(node_reduce(n) is not None for n in nodes):
        return False
    for n in nodes:
        if n.op == "get_attr" or (is_folded(n) and all(i is inp or is_folded(i) for i in tensor_inputs(n))):
            continue
        ins = tensor_inputs(n)
        if any(i.name not in names and i.op != "get_attr" for i in ins):
            return False
        red = node_reduce(n)
        if red is not None and red.op == "linear" and not is_small(out):
            return False  # a linear reduction only ends a reduce segment
        if is_small(n):
            if node_reduce(n) is None and not all(is_small(i) or i.op == "get_attr" for i in ins):
                return False
            if is_small(out) and node_reduce(n) is not None and reduce_source(n) is not inp:
                return False  # a reduce segment only reduces its input
            continue
        if is_small(out):
            return False  # a reduce segment computes nothing on the map
        if len(node_shape(n) or []) != 4:
            return False
        side = side_inputs(n)
        if side:
            if not all(is_small(i) for i in ins if i.name in side):
                return False
        elif node_kind(n) not in ("window", "pointwise") or any(is_small(i) for i in ins):
            return False
    return True


def is_reduce_segment(seg: Segment) -> bool:
    """True for a leader segment the planner can run as a ``reduce`` stage (module docstring)."""
    if seg.kind != "leader" or seg.output is None or not is_small(seg.output):
        return False
    shape = node_shape(seg.input)
    return shape is not None and len(shape) == 4 and not is_small(seg.input) and _reducible(seg.nodes, seg.input, seg.output)


def unfold_flatten(gm: torch.fx.GraphModule, seg: Segment) -> list[Segment]:
    """``seg`` cut after its folded flatten (if any): the flatten, then the Linear and the rest.

    For a map the leader holds whole anyway (a global op before it), a linear reduction would
    put the whole layer on the leader; the plain cut lets the Linear be split by features.
    """
    cut = max((i for i, n in enumerate(seg.nodes) if is_folded(n)), default=None)
    if cut is None or cut == len(seg.nodes) - 1:
        return [seg]
    flat = seg.nodes[cut]
    head = Segment(seg.nodes[: cut + 1], seg.input, flat, _classify(gm, seg.nodes[: cut + 1], seg.input, flat))
    tail = Segment(seg.nodes[cut + 1:], flat, seg.output, _classify(gm, seg.nodes[cut + 1:], flat, seg.output))
    return [head, tail]


def _classify_rest(nodes: list[torch.fx.Node], inp: torch.fx.Node, out: torch.fx.Node, in_shape: list[int]) -> str:
    first = nodes[0]
    if node_kind(first) == "linear" and tensor_inputs(first) == [inp] and len(in_shape) == 2 and nodes[-1] is out:
        prev = first
        for n in nodes[1:]:
            if node_kind(n) != "pointwise" or tensor_inputs(n) != [prev]:
                return "leader"
            prev = n
        return "linear"
    return "leader"


def atomic_segments(gm: torch.fx.GraphModule) -> list[Segment]:
    """Split the graph at every candidate cut (see module docstring)."""
    graph_nodes = list(gm.graph.nodes)
    placeholders = [n for n in graph_nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"expected a model with one input, found {len(placeholders)}")
    order = [n for n in graph_nodes if n.op not in ("placeholder", "output")]
    pos = {n: i for i, n in enumerate(order)}
    pos[placeholders[0]] = -1
    end = len(order)
    last_use: dict[torch.fx.Node, int] = {}
    for n in [placeholders[0], *order]:
        uses = [pos.get(u, end) for u in n.users]  # the output node counts as "after the end"
        last_use[n] = max(uses, default=pos[n])
    # Sweep: live after position i = defined at <= i and used after i.
    expire: dict[int, list[torch.fx.Node]] = {}
    for n, lu in last_use.items():
        expire.setdefault(lu, []).append(n)
    live: set[torch.fx.Node] = set()
    if last_use[placeholders[0]] > -1:
        live.add(placeholders[0])
    segments: list[Segment] = []
    seg_start = 0
    seg_input = placeholders[0]
    for i, n in enumerate(order):
        if last_use[n] > i:
            live.add(n)
        for dead in expire.get(i, []):
            live.discard(dead)
        if i == end - 1 or len(live) != 1:
            continue
        (v,) = live
        nxt = order[i + 1]
        if node_kind(nxt) == "pointwise" and v in tensor_inputs(nxt) and v is n:
            continue  # keep pointwise ops with their producer
        if is_folded(v):
            continue  # a flatten stays with the linear reduction that reads it
        if v is seg_input or node_shape(v) is None:
            continue
        nodes = order[seg_start : i + 1]
        segments.append(Segment(nodes, seg_input, v, _classify(gm, nodes, seg_input, v)))
        seg_start, seg_input = i + 1, v
    nodes = order[seg_start:]
    out_node = next(n for n in graph_nodes if n.op == "output")
    res = out_node.args[0]
    out = res if isinstance(res, torch.fx.Node) else None
    if nodes:
        segments.append(Segment(nodes, seg_input, out, _classify(gm, nodes, seg_input, out)))
    return segments


def ends_with_pool(gm: torch.fx.GraphModule, seg: Segment) -> bool:
    """True when the segment contains a pooling op (EdgeLD's block boundary)."""
    return any(node_kind(n) == "window" and node_window(gm, n).op in ("max", "avg") for n in seg.nodes)


def choose_blocks(
    n: int,
    mode: str,
    pool_ends: Sequence[bool],
    block_cost: Callable[[int, int], float] | None = None,
) -> list[tuple[int, int]]:
    """Group ``n`` consecutive spatial segments into fused blocks ``[i, j)``.

    ``pool_ends[i]`` says whether segment i contains a pooling op. ``block_cost(i, j)`` (needed
    for ``auto``) predicts the time of a block made of segments ``i..j-1``; the DP minimises the
    sum over blocks, which is exact when block costs are independent of their neighbours (gather
    mode) and a good approximation in exchange mode.
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; expected one of {FUSION_MODES}")
    if n == 0:
        return []
    if mode == "none":
        return [(i, i + 1) for i in range(n)]
    if mode == "pools":
        blocks, start = [], 0
        for i in range(n):
            if pool_ends[i]:
                blocks.append((start, i + 1))
                start = i + 1
        if start < n:
            blocks.append((start, n))
        return blocks
    assert block_cost is not None, "auto fusion needs a block cost"
    best = [0.0] + [float("inf")] * n
    arg = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + block_cost(i, j)
            if c < best[j]:
                best[j], arg[j] = c, i
    blocks = []
    j = n
    while j > 0:
        blocks.append((arg[j], j))
        j = arg[j]
    return blocks[::-1]
