"""Row arithmetic: which input rows an output row range needs (the halo), exactly.

All ranges are half-open ``(lo, hi)`` in global row coordinates of one feature map (dim 2 of
an NCHW tensor); ``(0, 0)`` (or any ``hi <= lo``) means "nothing".

A window op (conv or pool) with H kernel k, stride s, padding p, dilation d computes output row
r from padded rows ``r*s .. r*s + d*(k-1)``, i.e. from unpadded rows ``r*s - p .. r*s - p +
d*(k-1)``. For an output range ``[a, b)`` we therefore need unpadded rows
``[a*s - p, (b-1)*s - p + d*(k-1) + 1)``. The part of that range that lies outside the real map
``[0, H)`` is padding, and padding exists only at the true top and bottom of the map: a strip
that starts at a cut gets real rows from its neighbour instead. The executor then runs the op
with H-padding 0 on the explicitly padded strip (zeros for conv / avg pool, -inf for max pool,
which is what max pooling's implicit padding means), so the strip's output rows are exactly the
full map's.

Two pooling details:
* ``ceil_mode`` can add a last window that runs past ``H + p``. For max pool, rows past the map
  are ignored, i.e. -inf padding of any depth is exact. For avg pool (count_include_pad=True)
  PyTorch's divisor counts the explicit padding ``p`` but not the overflow, so we pad at most
  ``p`` rows and let the local op (same ``ceil_mode``, H-padding 0) shorten the last window just
  as the full op does.
* avg pool with ``count_include_pad=False`` and H-padding > 0 is classified global by
  ``planning.graph`` (its divisor would need to know which rows are padding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.fx

from edgeweave.planning.graph import Window, node_kind, node_shape, node_window, side_inputs, tensor_inputs

Range = tuple[int, int]
EMPTY: Range = (0, 0)


def is_empty(r: Range) -> bool:
    return r[1] <= r[0]


def hull(a: Range, b: Range) -> Range:
    """Smallest range holding both (empty ranges are ignored)."""
    if is_empty(a):
        return (b[0], b[1]) if not is_empty(b) else EMPTY
    if is_empty(b):
        return (a[0], a[1])
    return (min(a[0], b[0]), max(a[1], b[1]))


def intersect(a: Range, b: Range) -> Range:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if hi > lo else EMPTY


def size(r: Range) -> int:
    return max(0, r[1] - r[0])


def window_output_size(w: Window, h_in: int) -> int:
    """PyTorch's output height for window op ``w`` (conv and pooling, incl. ceil_mode)."""
    eff = w.d * (w.k - 1) + 1
    num = h_in + 2 * w.p - eff
    if w.ceil_mode:
        out = -(-num // w.s) + 1
        if (out - 1) * w.s >= h_in + w.p:  # last window must start inside the input/left pad
            out -= 1
    else:
        out = num // w.s + 1
    return out


def window_in_rows(w: Window, a: int, b: int, h_in: int) -> tuple[int, int, int, int]:
    """Input rows ``[lo, hi)`` and explicit ``(pad_top, pad_bottom)`` for output rows ``[a, b)``.

    Running the op with H-padding 0 on ``pad_top`` rows of padding + rows ``[lo, hi)`` +
    ``pad_bottom`` rows of padding yields exactly output rows ``[a, b)``.
    """
    if b <= a:
        return (0, 0, 0, 0)
    start = a * w.s - w.p
    stop = (b - 1) * w.s - w.p + w.d * (w.k - 1) + 1
    pad_top = max(0, min(stop, 0) - start)
    pad_bottom = max(0, stop - max(start, h_in))
    lo, hi = max(start, 0), min(stop, h_in)
    if hi <= lo:  # the windows see padding only (e.g. a 1x1 conv with padding 1)
        lo = hi = 0
    if w.op == "avg":
        pad_bottom = min(pad_bottom, w.p)  # ceil-mode overflow is not counted by the divisor
    return (lo, hi, pad_top, pad_bottom)


def node_input_rows(gm: torch.fx.GraphModule, node: torch.fx.Node, out: Range) -> dict[torch.fx.Node, Range]:
    """Rows of each tensor input that ``node`` needs to produce rows ``out`` of its output."""
    if is_empty(out):
        return {}
    kind = node_kind(node)
    if kind == "window":
        (inp,) = tensor_inputs(node)
        shape = node_shape(inp)
        assert shape is not None
        lo, hi, _, _ = window_in_rows(node_window(gm, node), out[0], out[1], shape[2])
        return {inp: (lo, hi)}
    # small values broadcast over the map are known whole: no rows needed. Checked for pointwise
    # nodes too: on a 1x1 map, `map * scale` has the scale's shape and is classed pointwise.
    side = side_inputs(node)
    if kind in ("pointwise", "linear") or side:
        return {i: out for i in tensor_inputs(node) if i.name not in side}
    raise ValueError(f"node {node.name} ({kind}) has no row arithmetic; it must run whole")


def required_rows(
    gm: torch.fx.GraphModule,
    nodes: Sequence[torch.fx.Node],
    out_node: torch.fx.Node,
    out: Range,
    extra: Mapping[str, Range] | None = None,
) -> dict[str, Range]:
    """Backward propagation through a fused block: the rows each node must compute.

    ``nodes`` are the block's nodes in topological order and ``out_node`` its output; the result
    maps every node name (block nodes and the block's input) to the hull of the rows its
    consumers inside the block need (the union over consumers, which is contiguous here because
    each consumer's request is an interval around the same strip). Nodes that nobody needs map
    to an empty range and are skipped by the executor. ``extra`` adds rows a node must compute
    beyond what its consumers need (a device's owned rows of a value it reduces by partial sums).
    """
    need: dict[str, Range] = {k: (int(v[0]), int(v[1])) for k, v in (extra or {}).items() if not is_empty(v)}
    need[out_node.name] = hull(need.get(out_node.name, EMPTY), (int(out[0]), int(out[1])))
    for node in reversed(list(nodes)):
        r = need.get(node.name, EMPTY)
        if is_empty(r):
            continue
        for inp, rr in node_input_rows(gm, node, r).items():
            need[inp.name] = hull(need.get(inp.name, EMPTY), rr)
    return need
