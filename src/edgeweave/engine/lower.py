"""Lowering: one device's share of a stage as static graphs, made once per plan.

A device computes rows ``out_rows`` of a spatial stage's output from rows ``in_rows`` of its
input. Which rows every node must compute (``planning.halo.required_rows``), which input rows
each window op reads and how much explicit padding it adds at the true borders
(``halo.window_in_rows``, ``windows.fewer_copies``) depend only on the plan, never on the frame.
So the strip interpreter runs once, when a plan is prepared, and instead of computing it writes
what it would compute into torch.fx graphs: every slice of rows, every padded window op
(``windows.StripWindow``), every pointwise op with its arguments. A frame then runs generated
code (no per-node Python bookkeeping), and a backend can compile the same graphs to its own
kernels (ONNX Runtime, OpenVINO: engine/backends.py).

A stage with exact global reductions (plan.py) cannot run as one graph: at each reducing node
the device hands its partial sum over and waits for the total. Its lowered form is therefore a
list of steps:

* ``Segment``: a graph from named values (the stage input, values still alive from the last
  segment, small values the graph broadcasts over the map) to named values;
* ``ReduceStep``: the partial sum of the rows the device owns of the reduced value (an output of
  the segment before), then the reducing node's value from the total;
* ``SmallStep``: a small node computed from reduced values (a channel-attention MLP), on torch.

The graphs hold views of the model's weights, never copies; values die after their last use
(``stage.last_use``), inside a graph as well as across segments.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from edgeweave.engine.stage import by_name, last_use, module, stage_io
from edgeweave.engine.windows import StripWindow, fewer_copies
from edgeweave.layout import dense
from edgeweave.planning.graph import (
    is_small,
    node_kind,
    node_shape,
    node_window,
    side_inputs,
    tensor_inputs,
)
from edgeweave.planning.halo import EMPTY, Range, is_empty, required_rows, window_in_rows
from edgeweave.planning.plan import Stage


@dataclass
class Segment:
    """A static graph: ``module(*values[inputs])`` returns the tuple ``values[outputs]``."""

    module: torch.fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    # per input: a 4-D map in the runtime's layout (channels-last rows); False: a small value, or
    # the model's input as the user gave it (a backend's interface takes it as it comes)
    maps: tuple[bool, ...]
    computes: bool  # it runs at least one window op (else there is nothing for a backend to speed up)


@dataclass(frozen=True)
class ReduceStep:
    index: int  # in stage.reductions
    node: str  # the reducing node
    source: str | None  # the value holding the owned rows of its source (None: owns none)
    own: Range


@dataclass(frozen=True)
class SmallStep:
    node: str


Step = Segment | ReduceStep | SmallStep


@dataclass
class Lowered:
    steps: list[Step]
    input: str
    output: str


@dataclass
class _Value:
    node: torch.fx.Node  # in the graph being built
    lo: int  # rows [lo, hi) of the map it holds
    hi: int


@dataclass
class _Builder:
    """The segment being written: its graph, the modules it calls, its inputs and values."""

    gm: torch.fx.GraphModule
    graph: torch.fx.Graph = field(default_factory=torch.fx.Graph)
    attrs: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    maps: list[bool] = field(default_factory=list)
    env: dict[str, _Value] = field(default_factory=dict)
    small: dict[str, torch.fx.Node] = field(default_factory=dict)
    computes: bool = False

    def placeholder(self, name: str, shape: list[int], is_map: bool) -> torch.fx.Node:
        self.inputs.append(name)
        self.shapes.append(tuple(int(v) for v in shape))
        self.maps.append(is_map)
        return self.graph.placeholder(_ident(name))

    def map_input(self, name: str, node: torch.fx.Node, lo: int, hi: int) -> None:
        shape = list(node_shape(node) or [])
        shape[2] = hi - lo
        self.env[name] = _Value(self.placeholder(name, shape, True), lo, hi)

    def side(self, node: torch.fx.Node) -> torch.fx.Node:
        """A small value (known whole) the graph reads: an input of the segment."""
        if node.name not in self.small:
            self.small[node.name] = self.placeholder(node.name, list(node_shape(node) or []), False)
        return self.small[node.name]

    def take(self, node: torch.fx.Node, lo: int, hi: int) -> torch.fx.Node:
        """Rows ``[lo, hi)`` of ``node``'s value (a view), which the segment must hold."""
        if hi <= lo:  # windows that see padding only: an empty slice of the right shape
            shape = list(node_shape(node) or [])
            shape[2] = 0
            return self.graph.call_function(torch.zeros, (tuple(shape),))
        v = self.env[node.name]
        if lo < v.lo or hi > v.hi:
            raise ValueError(f"node {node.name}: rows [{lo},{hi}) needed, [{v.lo},{v.hi}) computed")
        if (lo, hi) == (v.lo, v.hi):
            return v.node
        return self.graph.call_function(torch.narrow, (v.node, 2, lo - v.lo, hi - lo))

    def attr(self, name: str, obj: Any) -> str:
        target = _ident(name)
        self.attrs[target] = obj
        return target

    def finish(self, outputs: list[tuple[str, torch.fx.Node]]) -> Segment:
        self.graph.output(tuple(n for _, n in outputs))
        gm = torch.fx.GraphModule(self.attrs, self.graph, class_name="Strip")
        return Segment(gm, tuple(self.inputs), tuple(k for k, _ in outputs), tuple(self.shapes), tuple(self.maps),
                       self.computes)


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def lower_strip(gm: torch.fx.GraphModule, stage: Stage, device: int, in_rows: Range, out: Range) -> Lowered:
    """Rows ``out`` of a spatial stage's output from rows ``in_rows`` of its input, as steps."""
    in_node, outs = stage_io(gm, stage)
    (out_node,) = outs
    by = by_name(gm)
    nodes = [by[n] for n in stage.nodes]
    reds = {r.node: (i, r) for i, r in enumerate(stage.reductions)}
    extra = {r.source: r.owned(device) for r in stage.reductions}
    need = required_rows(gm, nodes, out_node, out, extra)
    want = need.get(in_node.name, EMPTY)
    if not is_empty(want) and not (in_rows[0] <= want[0] and want[1] <= in_rows[1]):
        raise ValueError(f"stage {stage.index}: input rows {in_rows} do not cover the needed {want}")
    last = last_use(gm, stage)
    steps: list[Step] = []
    b = _Builder(gm)
    b.map_input(in_node.name, in_node, in_rows[0], in_rows[1])
    smalls: set[str] = set()
    for step, node in enumerate(nodes):
        for name in [k for k in b.env if last.get(k, -1) < step]:
            del b.env[name]  # released: nothing later reads it
        if node.name in reds:
            i, red = reds[node.name]
            own = red.owned(device)
            src = None
            outputs = [(k, v.node) for k, v in b.env.items() if last.get(k, -1) > step]
            if not is_empty(own):
                src = f"{node.name}__own"
                outputs.append((src, b.take(by[red.source], own[0], own[1])))
            steps.append(b.finish(outputs))
            steps.append(ReduceStep(i, node.name, src, own))
            smalls.add(node.name)
            alive = {k: v for k, v in b.env.items() if last.get(k, -1) > step}
            b = _Builder(gm)
            for k, v in alive.items():
                b.map_input(k, by[k], v.lo, v.hi)
            continue
        if is_small(node) and any(i.name in smalls for i in tensor_inputs(node)):
            steps.append(SmallStep(node.name))  # runs before the segment being written
            smalls.add(node.name)
            continue
        r = need.get(node.name, EMPTY)
        if is_empty(r):
            continue
        b.env[node.name] = _Value(_lower_node(b, node, r, smalls), r[0], r[1])
    steps.append(b.finish([("__out__", b.graph.call_function(dense, (b.take(out_node, out[0], out[1]),)))]))
    return Lowered(steps, in_node.name, "__out__")


def _lower_node(b: _Builder, node: torch.fx.Node, r: Range, smalls: set[str]) -> torch.fx.Node:
    """``node``'s rows ``r`` written into the segment's graph."""
    gm = b.gm
    kind = node_kind(node)
    side = side_inputs(node)
    if kind == "window":
        (inp,) = tensor_inputs(node)
        w = node_window(gm, node)
        lo, hi, pt, pb = window_in_rows(w, r[0], r[1], (node_shape(inp) or [0, 0, 0])[2])
        if inp.name in b.env:
            lo, hi, pt, pb = fewer_copies(w, lo, hi, pt, pb, b.env[inp.name].hi, r[1] - r[0])
        op = module(gm, node) if node.op == "call_module" else None  # functional pooling: ``w`` says it all
        target = b.attr(node.name, StripWindow(op, w, pt, pb))
        b.computes = b.computes or w.op != "identity"
        return b.graph.call_module(target, (b.take(inp, lo, hi),))
    if kind == "pointwise" or side:
        def arg(n: torch.fx.Node) -> Any:
            if n.name in side:
                if n.name not in smalls:
                    raise ValueError(f"node {node.name}: side input {n.name} is not computed in this stage")
                return b.side(n)
            if n.op == "get_attr":
                return b.graph.get_attr(b.attr(n.name, _attr_of(gm, n)))
            return b.take(n, r[0], r[1])

        args = torch.fx.node.map_arg(node.args, arg)
        kwargs = torch.fx.node.map_arg(node.kwargs, arg)
        if node.op == "call_module":
            return b.graph.call_module(b.attr(node.name, module(gm, node)), args, kwargs)
        if node.op == "call_function":
            return b.graph.call_function(node.target, args, kwargs)  # type: ignore[arg-type]
        return b.graph.call_method(str(node.target), args, kwargs)
    raise ValueError(f"node {node.name} of kind {kind} cannot run on a strip")


def _attr_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    return operator.attrgetter(str(node.target))(gm)
