"""Exact reductions over strips, and the stages that are not row strips.

A reducing node (a sum or mean over H and W, or a Linear layer on a flattened map, see
``planning.graph``) is computed from per-strip partial sums: each device sums the rows it owns
(``partial_sum``), the partials are added in the plan's order (``sum_partials``: the same bits on
every device), and ``finish_reduce`` turns the total into the node's value. ``reduce`` stages
(partial sums where the rows are, the leader finishes) and ``linear`` stages (a Linear layer
split by output features) run here on torch: they read large weights once per frame, so a
memory-bound matrix-vector product is all they are, whatever the backend.

Programs (``Program``) are generators that yield ``(reduction index, partial sum or None)`` at
every reduction and resume with the total (None on followers of a ``reduce`` stage).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from edgeweave.engine.columns import channel_columns, row_columns
from edgeweave.engine.stage import by_name, call_node, module, stage_io
from edgeweave.planning.graph import Reduce, is_folded, node_reduce, node_shape, reduce_partial_shape, reduce_pool, \
    reduce_source
from edgeweave.planning.halo import Range, is_empty
from edgeweave.planning.plan import Plan, Reduction, Stage

# A device's side of a reduction: (index in stage.reductions, its partial sum or None) in,
# the total over all devices out (None on followers of a ``reduce`` stage, which need no total).
ReduceFn = Callable[[int, "torch.Tensor | None"], "torch.Tensor | None"]
Program = Generator[tuple[int, "torch.Tensor | None"], "torch.Tensor | None", Any]


def linear_program(gm: torch.fx.GraphModule, stage: Stage, out: Range, x: torch.Tensor) -> torch.Tensor:
    by = by_name(gm)
    first = by[stage.nodes[0]]
    lin = module(gm, first)
    a, b = out
    y = F.linear(x, lin.weight[a:b], None if lin.bias is None else lin.bias[a:b])
    prev = first
    for name in stage.nodes[1:]:  # unary pointwise ops after the Linear act on the slice
        node = by[name]
        args = torch.fx.node.map_arg(node.args, lambda n: y if n is prev else _bad(n))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: y if n is prev else _bad(n))
        y = call_node(gm, node, args, kwargs)
        prev = node
    return y


def _bad(n: torch.fx.Node) -> Any:
    raise ValueError(f"linear stage reads {n.name}, which is not the previous node")


def partial_sum(gm: torch.fx.GraphModule, node: torch.fx.Node, t: torch.Tensor, rows: Range,
                axis: int = 2) -> torch.Tensor:
    """A strip's share of reducing node ``node``: ``t`` holds rows ``rows`` of the reduced map
    (``axis`` 1: channels ``rows`` of it, every row: engine/channels.py).

    Sums and means: ``[N, C, 1, 1]``; a linear reduction: the strip's rows times the matching
    weight columns, ``[N, out]`` without the bias (``graph.reduce_partial_shape``).
    """
    red = node_reduce(node) or _no_reduce(node)
    if axis == 1:
        return _channel_partial(gm, node, red, t, rows)
    if red.op != "linear":
        return t.sum(dim=(2, 3), keepdim=True)
    _, c, h, w = (int(v) for v in node_shape(reduce_source(node)) or [])
    weight, pool = module(gm, node).weight, reduce_pool(node)
    if rows == (0, h) and pool is None:  # the whole unpooled map: the layer itself
        return F.linear(t.reshape(t.shape[0], -1), weight)
    return F.linear(t.permute(0, 2, 3, 1).reshape(t.shape[0], -1), row_columns(weight, c, h, w, pool, rows))


def _channel_partial(gm: torch.fx.GraphModule, node: torch.fx.Node, red: Reduce, t: torch.Tensor,
                     own: Range) -> torch.Tensor:
    """Channels ``own`` of the reduced map: their sums in place (zeros elsewhere), or their
    columns of the Linear layer times them."""
    _, c, h, w = (int(v) for v in node_shape(reduce_source(node)) or [])
    if red.op != "linear":
        part = t.new_zeros(t.shape[0], c, 1, 1)
        part[:, own[0]:own[1]] = t.sum(dim=(2, 3), keepdim=True)
        return part
    cols = channel_columns(module(gm, node).weight, c, h, w, reduce_pool(node), own)
    return F.linear(t.reshape(t.shape[0], -1), cols)  # (c, h, w) order: a copy of the slice at most


def prepare_reductions(gm: torch.fx.GraphModule, plan: Plan, device: int) -> None:
    """Make now what ``device``'s first frame under ``plan`` would otherwise make: its columns of
    the linear reductions it takes part in (engine/columns.py).

    Why: VGG's fc1 is 100-400 MB, and cutting it made a device's first frame ~10x slower
    (vgg11 at 96 px on loopback: 0.45-0.52 s of compute per device against 0.03 s after). Done
    when the plan is accepted, that time falls in loading the plan, which a stream does between
    frames, and never in a frame, so a device that joins late starts at its real speed."""
    by = by_name(gm)
    for s, stage in enumerate(plan.stages):
        axis = plan.in_axis(s) if stage.kind == "reduce" else 2
        for red in stage.reductions:
            own, node = red.owned(device), by[red.node]
            if not is_empty(own) and (node_reduce(node) or _no_reduce(node)).op == "linear":
                _, c, h, w = (int(v) for v in node_shape(reduce_source(node)) or [])
                weight, pool = module(gm, node).weight, reduce_pool(node)
                if axis == 1:
                    channel_columns(weight, c, h, w, pool, own)
                elif own != (0, h) or pool is not None:  # what partial_sum will read
                    row_columns(weight, c, h, w, pool, own)


def finish_reduce(gm: torch.fx.GraphModule, node: torch.fx.Node, total: torch.Tensor) -> torch.Tensor:
    """The reducing node's value from the total of the partial sums."""
    red = node_reduce(node) or _no_reduce(node)
    if red.op == "linear":
        bias = module(gm, node).bias
        return total if bias is None else total + bias
    v = total / red.count if red.op == "mean" else total
    return v if red.keepdim else v[:, :, 0, 0]


def partial_shape(gm: torch.fx.GraphModule, r: Reduction) -> list[int]:
    return reduce_partial_shape(by_name(gm)[r.node])


def small_value(gm: torch.fx.GraphModule, node: torch.fx.Node, small: dict[str, Any]) -> Any:
    def arg(n: torch.fx.Node) -> Any:
        if n.name in small:
            return small[n.name]
        if n.op == "get_attr":
            return call_node(gm, n, (), {})
        raise ValueError(f"small node {node.name} reads {n.name}, which is not a small value")

    args = torch.fx.node.map_arg(node.args, arg)
    kwargs = torch.fx.node.map_arg(node.kwargs, arg)
    return call_node(gm, node, args, kwargs)


def _no_reduce(node: torch.fx.Node) -> Reduce:
    raise ValueError(f"node {node.name} is listed as a reduction but is not a sum/mean over H and W")


def reduce_program(gm: torch.fx.GraphModule, stage: Stage, device: int, x: torch.Tensor | None,
                   axis: int = 2) -> Program:
    """A ``reduce`` stage: partial sums of the held rows (``axis`` 1: held channels); the leader
    finishes the small nodes."""
    in_node, outs = stage_io(gm, stage)
    by = by_name(gm)
    reds = {r.node: (i, r) for i, r in enumerate(stage.reductions)}
    small: dict[str, Any] = {}
    for name in stage.nodes:
        node = by[name]
        if name in reds:
            i, red = reds[name]
            if red.source != in_node.name:
                raise ValueError(f"stage {stage.index}: reduction {name} must read the stage input")
            own = red.owned(device)
            if not is_empty(own) and (x is None or x.shape[axis] != own[1] - own[0]):
                raise ValueError(f"stage {stage.index}: device {device} holds no rows {own} to reduce")
            total = yield (i, None if is_empty(own) or x is None else partial_sum(gm, node, x, own, axis))
            if total is None:  # a follower: its part is done
                return None
            small[name] = finish_reduce(gm, node, total)
        elif is_folded(node):
            continue  # the flatten of a linear reduction: computed as part of it
        else:
            small[name] = small_value(gm, node, small)
    if len(outs) == 1:
        return small[outs[0].name]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    return torch.fx.node.map_arg(out_node.args[0], lambda n: small[n.name])




def drive(program: Program, reduce_fn: ReduceFn | None, stage: Stage) -> Any:
    """Run a stage program to its end, answering each reduction with ``reduce_fn``."""
    try:
        msg = next(program)
        while True:
            if reduce_fn is None:
                raise ValueError(f"stage {stage.index} has reductions; run_stage needs a reduce_fn")
            msg = program.send(reduce_fn(*msg))
    except StopIteration as stop:
        return stop.value


def sum_partials(red: Reduction, parts: dict[int, torch.Tensor]) -> torch.Tensor:
    """Add the partial sums in the plan's order (the same order everywhere: reproducible)."""
    total: torch.Tensor | None = None
    for d, rows in red.rows:
        if is_empty(rows):
            continue
        if d not in parts:
            raise AssertionError(f"reduction {red.node}: no partial sum from device {d}")
        total = parts[d].clone() if total is None else total + parts[d]
    if total is None:
        raise AssertionError(f"reduction {red.node}: nobody owns any rows")
    return total

