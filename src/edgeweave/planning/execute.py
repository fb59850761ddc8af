"""Executing a stage of a Plan on one device, and a whole Plan in one process.

``run_stage`` is what the runtime calls on every device; ``simulate`` runs a whole plan
in-process (every device in turn, moving exactly the rows the plan's transfers say) so tests can
prove a plan exact without processes or sockets.

A spatial stage is run by a row-range-aware interpreter: ``planning.halo.required_rows`` says
which rows of every node the device's output strip needs; each window op slices those rows of
its input, pads explicitly at the true top/bottom of the map only (zeros, or -inf for max
pooling), and runs with H-padding 0 and its original W padding; pointwise ops run on the slices.
Where equal padding at both ends gives the same rows (the whole map), the op pads itself and no
padded copy is made (``fewer_copies``); values are dropped after their last use in the stage.

Stages with global reductions (plan.py) are generators (``stage_program``) that yield each
device's partial sum at every reducing node and resume with the total: ``run_stage`` answers
through a ``reduce_fn`` (the runtime's messages), ``simulate`` runs all devices in lockstep and
adds the partials in the plan's order, so both produce bit-identical sums.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Generator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from edgeweave.kernels import max_pool2d, pair
from edgeweave.layout import dense
from edgeweave.planning.graph import (
    Reduce,
    Window,
    is_folded,
    is_small,
    node_kind,
    node_reduce,
    node_shape,
    node_window,
    nodes_by_name,
    pool_matrix,
    reduce_partial_shape,
    reduce_pool,
    reduce_source,
    side_inputs,
    tensor_inputs,
)
from edgeweave.planning.halo import EMPTY, Range, is_empty, required_rows, window_in_rows
from edgeweave.planning.plan import Plan, Reduction, Stage

# A device's side of a reduction: (index in stage.reductions, its partial sum or None) in,
# the total over all devices out (None on followers of a ``reduce`` stage, which need no total).
ReduceFn = Callable[[int, "torch.Tensor | None"], "torch.Tensor | None"]
Program = Generator[tuple[int, "torch.Tensor | None"], "torch.Tensor | None", Any]


def split_axis(shape: list[int] | tuple[int, ...] | torch.Size) -> int:
    """The axis a value is split along: rows (dim 2) of 4-D maps, features (dim 1) of 2-D."""
    n = len(shape)
    if n == 4:
        return 2
    return 1 if n >= 2 else 0


_MEMO_KEPT = 4096  # entries per table and graph


def _memo(gm: torch.fx.GraphModule, table: str, key: Any, make: Callable[[], Any]) -> Any:
    """A per-graph cache for what a stage's execution derives from the graph alone.

    Stages run every frame, on boards where Python is slow too: walking the graph again for each
    frame cost ~30 % of a compact model's time on one device. Captured graphs are not changed
    after ``capture``, so these derivations never go stale.
    """
    cache = gm.meta.setdefault(table, {})
    if key not in cache:
        if len(cache) >= _MEMO_KEPT:  # a long adaptive stream sees many plans: stay bounded
            cache.clear()
        cache[key] = make()
    return cache[key]


def _by_name(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    return _memo(gm, "ew_exec_by_name", None, lambda: nodes_by_name(gm))


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.nn.Module:
    return _memo(gm, "ew_exec_modules", node.target, lambda: gm.get_submodule(str(node.target)))


def stage_io(gm: torch.fx.GraphModule, stage: Stage) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """The stage's input node (read from outside the stage) and its output node(s).

    Derived from the graph so the Plan needs only node names. A stage has exactly one input
    value; it has one output value except possibly the last stage (a model returning a tuple).
    """
    return _memo(gm, "ew_exec_stage_io", tuple(stage.nodes), lambda: _stage_io(gm, stage))


def _stage_io(gm: torch.fx.GraphModule, stage: Stage) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    by = _by_name(gm)
    names = set(stage.nodes)
    nodes = [by[n] for n in stage.nodes]
    ins: dict[torch.fx.Node, None] = {}
    for n in nodes:
        for i in tensor_inputs(n):
            if i.name not in names and i.op != "get_attr":
                ins.setdefault(i, None)
    if len(ins) != 1:
        raise ValueError(f"stage {stage.index} reads {len(ins)} values from outside ({[i.name for i in ins]}); expected 1")
    outs = [n for n in nodes if any(u.name not in names for u in n.users)]
    if not outs:
        raise ValueError(f"stage {stage.index} produces nothing used later")
    return next(iter(ins)), outs


def _call(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_module":
        return _module(gm, node)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, str(node.target))(*rest, **kwargs)
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    raise ValueError(f"cannot run node {node.name} ({node.op})")


def whole_on(stage: Stage, device: int) -> bool:
    """Whether ``device`` computes the whole stage alone: the leader's stages, and spatial stages
    where its strip is the whole map, nobody else computes, and every row a reduction sums is its
    own (one device, or a block the planner left on one device).

    ``reduce`` stages keep their partial-sum path even then: with a pool folded into the Linear
    after it (``graph.reduce_pool``) that reads a smaller weight than the model's own layers.
    """
    if stage.kind == "leader":
        return device == 0
    a = stage.assignment(device)
    if stage.kind != "spatial" or a is None or len(stage.input_shape) != 4:
        return False
    if a.in_rows != (0, int(stage.input_shape[2])) or a.out_rows != (0, int(stage.output_shape[2])):
        return False
    if any(b.device != device and not is_empty(b.out_rows) for b in stage.assignments):
        return False
    return all(d == device or is_empty(r) for red in stage.reductions for d, r in red.rows)


def stage_module(gm: torch.fx.GraphModule, stage: Stage) -> torch.fx.GraphModule:
    """The stage's nodes as one generated module, input to output(s), sharing ``gm``'s weights.

    A device that computes a whole stage alone (``whole_on``) needs no rows, halos or partial
    sums: it runs the model's own ops through torch.fx's generated code, as plain torch does,
    instead of the strip interpreter's per-node Python (on a capped board that overhead made a
    compact ResNet18 on one device ~20 % slower than the model itself).
    """
    return _memo(gm, "ew_exec_stage_module", tuple(stage.nodes), lambda: _stage_module(gm, stage))


def _stage_module(gm: torch.fx.GraphModule, stage: Stage) -> torch.fx.GraphModule:
    in_node, outs = stage_io(gm, stage)
    by = _by_name(gm)
    g = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {in_node.name: g.placeholder(in_node.name)}

    def arg(n: torch.fx.Node) -> torch.fx.Node:
        if n.name not in env:  # a parameter read by a function call, outside the stage's list
            if n.op != "get_attr":
                raise ValueError(f"stage {stage.index}: node {n.name} is neither in the stage nor a parameter")
            env[n.name] = g.node_copy(n)
        return env[n.name]

    for name in stage.nodes:
        node = by[name]
        mod = _module(gm, node) if node.op == "call_module" else None
        if isinstance(mod, torch.nn.MaxPool2d) and not mod.return_indices:  # the faster exact pool
            args = (arg(node.args[0]), mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
            env[name] = g.call_function(max_pool2d, args)
        else:
            env[name] = g.node_copy(node, arg)
    if len(outs) == 1:
        g.output(env[outs[0].name])
    else:  # a model returning a structure (multi-exit): the leader's last stage
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        g.output(torch.fx.node.map_arg(out_node.args[0], lambda n: env[n.name]))
    return torch.fx.GraphModule(gm, g)


def _run_linear(gm: torch.fx.GraphModule, stage: Stage, out: Range, x: torch.Tensor) -> torch.Tensor:
    by = _by_name(gm)
    first = by[stage.nodes[0]]
    lin = _module(gm, first)
    a, b = out
    y = F.linear(x, lin.weight[a:b], None if lin.bias is None else lin.bias[a:b])
    prev = first
    for name in stage.nodes[1:]:  # unary pointwise ops after the Linear act on the slice
        node = by[name]
        args = torch.fx.node.map_arg(node.args, lambda n: y if n is prev else _bad(n))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: y if n is prev else _bad(n))
        y = _call(gm, node, args, kwargs)
        prev = node
    return y


def _bad(n: torch.fx.Node) -> Any:
    raise ValueError(f"linear stage reads {n.name}, which is not the previous node")


def partial_sum(gm: torch.fx.GraphModule, node: torch.fx.Node, t: torch.Tensor, rows: Range) -> torch.Tensor:
    """A strip's share of reducing node ``node``: ``t`` holds rows ``rows`` of the reduced map.

    Sums and means: ``[N, C, 1, 1]``; a linear reduction: the strip's rows times the matching
    weight columns, ``[N, out]`` without the bias (``graph.reduce_partial_shape``).
    """
    red = node_reduce(node) or _no_reduce(node)
    if red.op != "linear":
        return t.sum(dim=(2, 3), keepdim=True)
    by_row, per_row = _row_weight(gm, node, rows)
    if by_row is None:  # the whole map: the layer itself
        return F.linear(t.reshape(t.shape[0], -1), _module(gm, node).weight)
    return F.linear(t.permute(0, 2, 3, 1).reshape(t.shape[0], -1), by_row[:, rows[0] * per_row:rows[1] * per_row])


def _row_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, rows: Range) -> tuple[torch.Tensor | None, int]:
    """The linear reduction's weight by rows of its map (``_rows_first``) and its columns per row;
    None where ``rows`` is the whole unpooled map, which the layer itself multiplies."""
    _, c, h, w = (int(v) for v in node_shape(reduce_source(node)) or [])
    pool = reduce_pool(node)
    if rows == (0, h) and pool is None:
        return None, w * c
    return _rows_first(_module(gm, node).weight, c, h, w, pool), w * c


_ROWS_FIRST: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = {}
# reordered layers kept: a model has one such layer, served at one or a few input sizes (each
# size whose map is pooled into the layer has its own copy); a new model replaces the old one's
_ROWS_FIRST_KEPT = 3
_UNPOOL_CHUNK = 256  # output features per step when folding a pool into a weight (bounds memory)


def _rows_first(weight: torch.Tensor, c: int, h: int, w: int, pool: tuple[int, int] | None = None) -> torch.Tensor:
    """``weight`` with its columns reordered (h, w, c): the columns of any row range are contiguous,
    in the order of a channels-last strip (layout.py), which is then read without a copy.

    With ``pool`` (the layer reads ``flatten(adaptive_avg_pool2d(map, pool))``, see
    ``graph._pooled_map``) the weight is first carried back through the pooling, so that it
    applies to the ``h x w`` map itself: ``W_map[o, c] = P_h^T W[o, c] P_w``.

    Made once per layer and device and kept, so any plan's rows are a view (no copy per frame or
    per plan). Cutting the columns for each plan instead was ~20 % faster per frame, but a device
    serving many plans (a benchmark interleaving 16) cut them again every frame once they no
    longer fitted a bounded cache (+0.35 s at 0.25 core); this costs one copy of the layer.
    """
    key = (id(weight), c, h, w, pool)
    hit = _ROWS_FIRST.get(key)
    if hit is not None and hit[0] is weight and hit[1] == weight._version:
        return hit[2]
    out = weight.shape[0]
    if pool is None:
        by_row = weight.view(out, c, h, w).permute(0, 2, 3, 1).reshape(out, -1).contiguous()
    else:
        # The pooling's adjoint as two small matrices: torch.func.vjp of adaptive_avg_pool2d gives
        # the same weight but took 4.5 s for VGG16's fc1 at 200 px against 1.2 s (one core).
        ph = pool_matrix(pool[0], h).to(weight.dtype)
        pw = pool_matrix(pool[1], w).to(weight.dtype)
        w4 = weight.view(out, c, pool[0], pool[1])
        by_row = weight.new_empty(out, h, w, c)
        for a in range(0, out, _UNPOOL_CHUNK):
            by_row[a:a + _UNPOOL_CHUNK] = torch.einsum("ocij,ir,jq->orqc", w4[a:a + _UNPOOL_CHUNK], ph, pw)
        by_row = by_row.view(out, -1)
    _ROWS_FIRST.pop(key, None)
    while len(_ROWS_FIRST) >= _ROWS_FIRST_KEPT:
        del _ROWS_FIRST[next(iter(_ROWS_FIRST))]
    _ROWS_FIRST[key] = (weight, weight._version, by_row)
    return by_row


def prepare(gm: torch.fx.GraphModule, plan: Plan, device: int) -> None:
    """Make now what ``device``'s first frame under ``plan`` would otherwise make: the reordered
    weights of the linear reductions it takes part in (``_rows_first``).

    Why: VGG's fc1 is 100-400 MB, and its reorder made a device's first frame ~10x slower
    (vgg11 at 96 px on loopback: 0.45-0.52 s of compute per device against 0.03 s after). Done
    when the plan is accepted, that time falls in loading the plan, which a stream does between
    frames, and never in a frame, so a device that joins late starts at its real speed."""
    by = _by_name(gm)
    for stage in plan.stages:
        for red in stage.reductions:
            own, node = red.owned(device), by[red.node]
            if not is_empty(own) and (node_reduce(node) or _no_reduce(node)).op == "linear":
                _row_weight(gm, node, own)  # what partial_sum will read


def finish_reduce(gm: torch.fx.GraphModule, node: torch.fx.Node, total: torch.Tensor) -> torch.Tensor:
    """The reducing node's value from the total of the partial sums."""
    red = node_reduce(node) or _no_reduce(node)
    if red.op == "linear":
        bias = _module(gm, node).bias
        return total if bias is None else total + bias
    v = total / red.count if red.op == "mean" else total
    return v if red.keepdim else v[:, :, 0, 0]


def partial_shape(gm: torch.fx.GraphModule, r: Reduction) -> list[int]:
    return reduce_partial_shape(_by_name(gm)[r.node])


def _small_value(gm: torch.fx.GraphModule, node: torch.fx.Node, small: dict[str, Any]) -> Any:
    def arg(n: torch.fx.Node) -> Any:
        if n.name in small:
            return small[n.name]
        if n.op == "get_attr":
            return _call(gm, n, (), {})
        raise ValueError(f"small node {node.name} reads {n.name}, which is not a small value")

    args = torch.fx.node.map_arg(node.args, arg)
    kwargs = torch.fx.node.map_arg(node.kwargs, arg)
    return _call(gm, node, args, kwargs)


def _spatial_program(gm: torch.fx.GraphModule, stage: Stage, device: int, in_rows: Range, out: Range,
                     x: torch.Tensor) -> Program:
    in_node, outs = stage_io(gm, stage)
    (out_node,) = outs
    by = _by_name(gm)
    key = tuple(stage.nodes)
    nodes = _memo(gm, "ew_exec_nodes", key, lambda: [by[n] for n in stage.nodes])
    reds = {r.node: (i, r) for i, r in enumerate(stage.reductions)}
    extra = {r.source: r.owned(device) for r in stage.reductions}
    need = _memo(gm, "ew_exec_need", (key, tuple(out), tuple(sorted(extra.items()))),
                 lambda: required_rows(gm, nodes, out_node, out, extra))
    want = need.get(in_node.name, EMPTY)
    if not is_empty(want) and not (in_rows[0] <= want[0] and want[1] <= in_rows[1]):
        raise ValueError(f"stage {stage.index}: input rows {in_rows} do not cover the needed {want}")
    if x.shape[2] != in_rows[1] - in_rows[0]:
        raise ValueError(f"stage {stage.index}: got {x.shape[2]} input rows, the assignment says {in_rows}")
    env: dict[str, tuple[torch.Tensor, int]] = {in_node.name: (x, in_rows[0])}
    small: dict[str, Any] = {}

    def take(node: torch.fx.Node, lo: int, hi: int) -> torch.Tensor:
        if hi <= lo:  # windows that see padding only: an empty slice of the right shape
            shape = list(node_shape(node) or [])
            shape[2] = 0
            return x.new_zeros(shape)
        t, off = env[node.name]
        if lo < off or hi > off + t.shape[2]:
            raise ValueError(f"node {node.name}: rows [{lo},{hi}) needed, [{off},{off + t.shape[2]}) computed")
        return t.narrow(2, lo - off, hi - lo)

    dead = _dead_after(gm, stage, nodes, out_node)
    for step, node in enumerate(nodes):
        for name in dead.get(step - 1, ()):
            env.pop(name, None)
        if node.name in reds:
            i, red = reds[node.name]
            own = red.owned(device)
            part = None if is_empty(own) else partial_sum(gm, node, take(by[red.source], own[0], own[1]), own)
            total = yield (i, part)
            if total is None:
                raise ValueError(f"stage {stage.index}: no total for reduction {node.name}")
            small[node.name] = finish_reduce(gm, node, total)
            continue
        if is_small(node) and any(i.name in small for i in tensor_inputs(node)):
            small[node.name] = _small_value(gm, node, small)
            continue
        r = need.get(node.name, EMPTY)
        if is_empty(r):
            continue
        kind = node_kind(node)
        side = side_inputs(node)
        if kind == "window":
            (inp,) = tensor_inputs(node)
            w = node_window(gm, node)
            mod = _module(gm, node)
            lo, hi, pt, pb = window_in_rows(w, r[0], r[1], (node_shape(inp) or [0, 0, 0])[2])
            if inp.name in env:
                held, off = env[inp.name]
                lo, hi, pt, pb = fewer_copies(w, lo, hi, pt, pb, off + held.shape[2], r[1] - r[0])
            y = apply_window(mod, w, take(inp, lo, hi), pt, pb)
            if y.shape[2] != r[1] - r[0]:
                raise AssertionError(f"node {node.name}: computed {y.shape[2]} rows for {r}")
        elif kind == "pointwise" or side:
            def arg(n: torch.fx.Node, r: Range = r, side: tuple[str, ...] = side) -> Any:
                if n.name in side:
                    if n.name not in small:
                        raise ValueError(f"node {node.name}: side input {n.name} is not computed in this stage")
                    return small[n.name]
                return take(n, r[0], r[1])

            args = torch.fx.node.map_arg(node.args, arg)
            kwargs = torch.fx.node.map_arg(node.kwargs, arg)
            y = _call(gm, node, args, kwargs)
        else:
            raise ValueError(f"node {node.name} of kind {kind} cannot run on a strip")
        env[node.name] = (y, r[0])
    return dense(take(out_node, out[0], out[1]))


def _dead_after(gm: torch.fx.GraphModule, stage: Stage, nodes: list[torch.fx.Node],
                out_node: torch.fx.Node) -> dict[int, list[str]]:
    """Per step of the stage, the values no later step reads (as ``torch.fx.Interpreter`` does).

    Dropping them at once lets the allocator hand their memory, still in cache, to the next op;
    keeping every value of a long stage alive to its end made each op write into fresh memory
    (up to 3x slower convolutions on the same shapes).
    """
    def make() -> dict[int, list[str]]:
        sources = {r.node: r.source for r in stage.reductions}
        last: dict[str, int] = {}
        for step, node in enumerate(nodes):
            for i in tensor_inputs(node):
                last[i.name] = step
            if node.name in sources:
                last[sources[node.name]] = step
        dead: dict[int, list[str]] = {}
        for name, step in last.items():
            if name != out_node.name:
                dead.setdefault(step, []).append(name)
        return dead

    return _memo(gm, "ew_exec_dead_after", tuple(stage.nodes), make)


def _no_reduce(node: torch.fx.Node) -> Reduce:
    raise ValueError(f"node {node.name} is listed as a reduction but is not a sum/mean over H and W")


def _reduce_program(gm: torch.fx.GraphModule, stage: Stage, device: int, x: torch.Tensor | None) -> Program:
    """A ``reduce`` stage: partial sums of the held rows; the leader finishes the small nodes."""
    in_node, outs = stage_io(gm, stage)
    by = _by_name(gm)
    reds = {r.node: (i, r) for i, r in enumerate(stage.reductions)}
    small: dict[str, Any] = {}
    for name in stage.nodes:
        node = by[name]
        if name in reds:
            i, red = reds[name]
            if red.source != in_node.name:
                raise ValueError(f"stage {stage.index}: reduction {name} must read the stage input")
            own = red.owned(device)
            if not is_empty(own) and (x is None or x.shape[2] != own[1] - own[0]):
                raise ValueError(f"stage {stage.index}: device {device} holds no rows {own} to reduce")
            total = yield (i, None if is_empty(own) or x is None else partial_sum(gm, node, x, own))
            if total is None:  # a follower: its part is done
                return None
            small[name] = finish_reduce(gm, node, total)
        elif is_folded(node):
            continue  # the flatten of a linear reduction: computed as part of it
        else:
            small[name] = _small_value(gm, node, small)
    if len(outs) == 1:
        return small[outs[0].name]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    return torch.fx.node.map_arg(out_node.args[0], lambda n: small[n.name])


# Ops whose result may share memory with their (first) input: views, and calls that may return
# the input itself. Anything else allocates its result.
_ALIAS_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "narrow", "permute", "transpose", "t",
    "contiguous", "expand", "expand_as", "squeeze", "unsqueeze", "__getitem__", "detach", "to", "float", "type",
    "type_as", "chunk", "split", "unbind", "select", "as_strided",
})
_ALIAS_FUNCTIONS: frozenset[Any] = frozenset({
    torch.flatten, torch.reshape, torch.narrow, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
    torch.chunk, torch.split, torch.unbind, torch.select, torch.detach, operator.getitem,
})
_ALIAS_MODULES = (torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Dropout, torch.nn.Dropout2d)
_IN_PLACE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.ipow,
    operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
})


def _in_place(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node`` may write into its first input (erring towards yes)."""
    if node.op == "call_module":
        return bool(getattr(_module(gm, node), "inplace", False))
    if node.kwargs.get("inplace") is True or any(a is True for a in node.args[1:]):
        return True  # F.relu(x, inplace=True), F.relu(x, True), F.dropout(x, p, training, True), ...
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _IN_PLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))
    if node.op == "call_method":
        name = str(node.target)
        return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")
    return False


def _aliases(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        mod = _module(gm, node)
        return isinstance(mod, _ALIAS_MODULES) or (node_kind(node) == "window" and node_window(gm, node).op == "identity")
    if node.op == "call_method":
        return str(node.target) in _ALIAS_METHODS
    return node.op == "call_function" and node.target in _ALIAS_FUNCTIONS


def writes_input(gm: torch.fx.GraphModule, stage: Stage) -> bool:
    """Whether running ``stage`` may write into the tensor it is given (or into views of it).

    Then the stage needs its own copy: the caller's tensor may still be on its way to another
    device (a halo, rows the leader forwards). Most stages write only into tensors they made
    (``ReLU(inplace=True)`` after a convolution), so the copy is the exception, not a cost every
    stage pays on every frame (a memory-bound copy is slow on a board with a capped CPU).
    """
    def make() -> bool:
        in_node, _ = stage_io(gm, stage)
        by = _by_name(gm)
        shared = {in_node.name}  # values that may share memory with the stage input
        for name in stage.nodes:
            node = by[name]
            ins = tensor_inputs(node)
            first_shared = bool(ins) and ins[0].name in shared
            if first_shared and _in_place(gm, node):
                return True
            if first_shared and _aliases(gm, node):
                shared.add(name)
        return False

    return _memo(gm, "ew_exec_writes_input", tuple(stage.nodes), make)


def stage_program(gm: torch.fx.GraphModule, stage: Stage, device: int, x: torch.Tensor | None) -> Program:
    """``run_stage`` as a generator that yields at every reduction (see ``run_stage``)."""
    a = stage.assignment(device)
    if x is not None and writes_input(gm, stage):
        x = x.clone()
    if x is not None and whole_on(stage, device):
        return _whole(stage_module(gm, stage), x)
    if stage.kind == "reduce":
        return _reduce_program(gm, stage, device, x)
    if a is None or is_empty(a.out_rows):
        raise ValueError(f"device {device} has no work in stage {stage.index}")
    assert x is not None
    if stage.kind == "spatial":
        return _spatial_program(gm, stage, device, a.in_rows, a.out_rows, x)
    if stage.reductions:
        raise ValueError(f"stage {stage.index}: only spatial and reduce stages have reductions")

    def plain() -> Program:
        if stage.kind == "linear":
            return _run_linear(gm, stage, a.out_rows, x)
        raise ValueError(f"unknown stage kind {stage.kind!r}")
        yield  # a generator that never yields

    return plain()


def _whole(module: torch.fx.GraphModule, x: torch.Tensor) -> Program:
    return module(x)
    yield  # a generator that never yields: the device owns every reduction's rows


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


def fewer_copies(w: Window, lo: int, hi: int, pad_top: int, pad_bottom: int, held_stop: int,
                 want: int) -> tuple[int, int, int, int]:
    """``window_in_rows``'s answer changed, where that gives the same ``want`` output rows, so
    that running the op copies less.

    Rows below ``hi`` that the device holds anyway are included when no window reaches them (a
    stride-2 1x1 convolution needs every row but the last): a slice that ends where the held
    tensor ends is contiguous, and convolutions on non-contiguous slices are slow. Bottom padding
    smaller than the top is made equal when that adds no output row (a stride-2 convolution of
    the whole map): then the op pads itself (``apply_window``) instead of a padded copy.
    """
    if w.ceil_mode or w.op not in ("conv", "max", "avg") or hi <= lo:  # hi <= lo: padding only
        return lo, hi, pad_top, pad_bottom

    def rows(n: int) -> int:  # output rows of the op on n rows (padding included)
        return (n - w.d * (w.k - 1) - 1) // w.s + 1

    if pad_bottom == 0 and hi < held_stop and rows(pad_top + held_stop - lo) == want:
        hi = held_stop
    if w.op != "avg" and pad_bottom < pad_top and rows(2 * pad_top + hi - lo) == want:
        pad_bottom = pad_top
    return lo, hi, pad_top, pad_bottom


def apply_window(mod: torch.nn.Module, w: Window, t: torch.Tensor, pad_top: int, pad_bottom: int) -> torch.Tensor:
    """Run window op ``mod`` on real rows ``t`` with explicit H padding and H-padding 0.

    Padding is zeros for conv / avg pool and -inf for max pool (max pooling's own padding);
    W keeps the module's padding, and every other argument is the module's own.
    """
    if pad_top == pad_bottom and t.shape[2] and (w.op == "conv" or (w.op == "max" and not w.ceil_mode)):
        # the whole map (or no border): the op's own padding is the same, without a padded copy
        pad = (pad_top, w.pad_w)
        if w.op == "conv":
            return F.conv2d(t, mod.weight, mod.bias, (w.s, mod.stride[1]), pad, (w.d, mod.dilation[1]), mod.groups)
        return max_pool2d(t, pair(mod.kernel_size), pair(mod.stride or mod.kernel_size), pad, pair(mod.dilation))
    if pad_top or pad_bottom:
        t = F.pad(t, (0, 0, pad_top, pad_bottom), value=float("-inf") if w.op == "max" else 0.0)
    if w.op == "identity":
        return t
    if w.op == "conv":
        return F.conv2d(t, mod.weight, mod.bias, (w.s, mod.stride[1]), (0, w.pad_w), (w.d, mod.dilation[1]), mod.groups)
    if w.op == "max":
        k, s, d = pair(mod.kernel_size), pair(mod.stride or mod.kernel_size), pair(mod.dilation)
        return max_pool2d(t, k, s, (0, w.pad_w), d, ceil_mode=w.ceil_mode)
    k, s = pair(mod.kernel_size), pair(mod.stride or mod.kernel_size)
    return F.avg_pool2d(t, k, s, (0, w.pad_w), w.ceil_mode, mod.count_include_pad, mod.divisor_override)


@torch.no_grad()
def run_stage(gm: torch.fx.GraphModule, stage: Stage, device: int, x: torch.Tensor | None,
              reduce_fn: ReduceFn | None = None) -> Any:
    """Compute rows ``out_rows`` of the stage output on ``device`` from rows ``in_rows`` of its input.

    ``x`` holds exactly rows ``stage.assignment(device).in_rows`` of the stage input along the
    split axis (the whole vector for linear stages, the whole tensor for leader stages). It is
    copied first when the stage may write into it (``writes_input``: an in-place op such as
    ``ReLU(inplace=True)`` or ``+=`` on the input): the caller may still be sending it.

    Stages with ``reductions`` (plan.py) need ``reduce_fn(i, partial) -> total``: at reduction
    ``i`` the device hands over its partial sum (None when it owns no rows) and gets the total
    over all devices (the runtime sends it through the leader; ``simulate`` adds it in-process).
    In a ``reduce`` stage ``x`` is the device's held rows (None on a leader holding none) and
    followers return None.
    """
    return drive(stage_program(gm, stage, device, x), reduce_fn, stage)


Pieces = list[tuple[int, int, Any]]


def extract(pieces: Pieces, rows: Range, axis: int, who: str = "device") -> torch.Tensor:
    """Assemble ``rows`` along ``axis`` from held pieces ``(lo, hi, tensor)``; fail if not held."""
    lo, hi = rows
    parts: list[torch.Tensor] = []
    cur = lo
    while cur < hi:
        for plo, phi, t in sorted(pieces, key=lambda p: (p[0], -p[1])):
            if plo <= cur < phi:
                stop = min(hi, phi)
                parts.append(t.narrow(axis, cur - plo, stop - cur))
                cur = stop
                break
        else:
            held = sorted((p[0], p[1]) for p in pieces)
            raise AssertionError(f"{who} does not hold rows [{cur},{hi}) of [{lo},{hi}); it holds {held}")
    if not parts:
        raise AssertionError(f"{who}: empty range {rows} requested")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


@torch.no_grad()
def simulate(gm: torch.fx.GraphModule, plan: Plan, x: torch.Tensor) -> Any:
    """Execute ``plan`` in-process and return the model output as the leader assembles it.

    Devices are visited in turn; before each stage its transfers run in list order, each
    asserting that the sender holds the rows it sends (its own output strip, or rows it received
    earlier in the list), exactly as the plan.py docstring defines execution. A value a device
    holds is dropped after the stage that consumes it, so nothing is silently reused.
    """
    holdings: dict[int, Pieces] = {0: [(0, int(x.shape[split_axis(x.shape)]), x)]}
    for stage in plan.stages:
        axis = split_axis(stage.input_shape)
        hold: dict[int, Pieces] = {d: list(p) for d, p in holdings.items()}
        for t in stage.transfers:
            piece = extract(hold.get(t.src, []), t.rows, axis, f"stage {stage.index}: device {t.src}")
            hold.setdefault(t.dst, []).append((t.rows[0], t.rows[1], piece.clone()))
        new: dict[int, Pieces] = {}
        programs: dict[int, Program] = {}
        if stage.kind == "reduce":
            for a in stage.assignments:
                if a.device == 0 or not is_empty(a.in_rows):
                    xin = None if is_empty(a.in_rows) else extract(hold.get(a.device, []), a.in_rows, axis,
                                                                   f"stage {stage.index}: device {a.device}")
                    programs[a.device] = stage_program(gm, stage, a.device, xin)
        else:
            for a in stage.assignments:
                if is_empty(a.out_rows):
                    continue
                xin = extract(hold.get(a.device, []), a.in_rows, axis, f"stage {stage.index}: device {a.device}")
                programs[a.device] = stage_program(gm, stage, a.device, xin)
        for d, y in _lockstep(stage, programs).items():
            if y is None:
                continue
            a = stage.assignment(d)
            assert a is not None
            if isinstance(y, torch.Tensor):
                out_axis = split_axis(stage.output_shape)
                if y.shape[out_axis] != a.out_rows[1] - a.out_rows[0]:
                    raise AssertionError(f"stage {stage.index}: device {a.device} returned {y.shape[out_axis]} rows for {a.out_rows}")
            new[a.device] = [(a.out_rows[0], a.out_rows[1], y)]
        holdings = new
    last = plan.stages[-1]
    if len(holdings.get(0, [])) == 1 and not isinstance(holdings[0][0][2], torch.Tensor):
        return holdings[0][0][2]
    axis = split_axis(last.output_shape)
    for t in plan.final_transfers:
        piece = extract(holdings.get(t.src, []), t.rows, axis, f"final: device {t.src}")
        holdings.setdefault(t.dst, []).append((t.rows[0], t.rows[1], piece.clone()))
    return extract(holdings.get(0, []), (0, int(last.output_shape[axis])), axis, "final: leader")


def _lockstep(stage: Stage, programs: dict[int, Program]) -> dict[int, Any]:
    """Run every device's stage program; at each reduction add the partials in plan order.

    Every program must reach the same reduction next (they run the same nodes), so this is the
    in-process equivalent of the runtime's "partials to the leader, total back" exchange.
    """
    results: dict[int, Any] = {}
    msgs: dict[int, tuple[int, torch.Tensor | None]] = {}

    def step(d: int, value: torch.Tensor | None, first: bool) -> None:
        try:
            msgs[d] = next(programs[d]) if first else programs[d].send(value)
        except StopIteration as stop:
            results[d] = stop.value

    for d in sorted(programs):
        step(d, None, True)
    while msgs:
        idx = {i for i, _ in msgs.values()}
        if len(idx) != 1:
            raise AssertionError(f"stage {stage.index}: devices reached different reductions {sorted(idx)}")
        (i,) = idx
        red = stage.reductions[i]
        parts = {d: p for d, (_, p) in msgs.items() if p is not None}
        extra = set(parts) - {d for d, r in red.rows if not is_empty(r)}
        if extra:
            raise AssertionError(f"stage {stage.index}: devices {sorted(extra)} sent partial sums they do not own")
        total = sum_partials(red, parts)
        pending = dict(msgs)
        msgs.clear()
        for d in sorted(pending):
            answer = total.clone() if stage.kind != "reduce" or d == 0 else None
            step(d, answer, False)
    return results
