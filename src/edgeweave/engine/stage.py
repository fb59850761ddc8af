"""What a stage is, derived from the graph alone: its input and outputs, whether one device
computes it whole, its nodes as one generated module, whether it writes into its input, and
when each of its values dies.

Everything here is a pure function of (graph, stage) and is memoised per graph (``memo``):
stages run every frame, on boards where Python is slow too (walking the graph again for each
frame cost ~30 % of a compact model's time on one device). Captured graphs are not changed after
``planning.graph.capture``, so these derivations never go stale.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from edgeweave.kernels import max_pool2d
from edgeweave.planning.graph import node_kind, node_window, nodes_by_name, tensor_inputs
from edgeweave.planning.plan import Stage, whole_on  # noqa: F401  (re-exported: the engine's question)


_MEMO_KEPT = 4096  # entries per table and graph


def memo(gm: torch.fx.GraphModule, table: str, key: Any, make: Callable[[], Any]) -> Any:
    """A per-graph cache for what executing a stage derives from the graph alone (bounded: a
    long adaptive stream sees many plans)."""
    cache = gm.meta.setdefault(table, {})
    if key not in cache:
        if len(cache) >= _MEMO_KEPT:
            cache.clear()
        cache[key] = make()
    return cache[key]


def by_name(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    return memo(gm, "ew_exec_by_name", None, lambda: nodes_by_name(gm))


def module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.nn.Module:
    return memo(gm, "ew_exec_modules", node.target, lambda: gm.get_submodule(str(node.target)))


def stage_io(gm: torch.fx.GraphModule, stage: Stage) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """The stage's input node (read from outside the stage) and its output node(s).

    Derived from the graph so the Plan needs only node names. A stage has exactly one input
    value; it has one output value except possibly the last stage (a model returning a tuple).
    """
    return memo(gm, "ew_exec_stage_io", tuple(stage.nodes), lambda: _stage_io(gm, stage))


def _stage_io(gm: torch.fx.GraphModule, stage: Stage) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    by = by_name(gm)
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


def call_node(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_module":
        return module(gm, node)(*args, **kwargs)
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


def stage_module(gm: torch.fx.GraphModule, stage: Stage) -> torch.fx.GraphModule:
    """The stage's nodes as one generated module, input to output(s), sharing ``gm``'s weights.

    A device that computes a whole stage alone (``whole_on``) needs no rows, halos or partial
    sums: it runs the model's own ops through torch.fx's generated code, as plain torch does,
    instead of the strip interpreter's per-node Python (on a capped board that overhead made a
    compact ResNet18 on one device ~20 % slower than the model itself).
    """
    return memo(gm, "ew_exec_stage_module", tuple(stage.nodes), lambda: _stage_module(gm, stage))


def _stage_module(gm: torch.fx.GraphModule, stage: Stage) -> torch.fx.GraphModule:
    in_node, outs = stage_io(gm, stage)
    by = by_name(gm)
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
        mod = module(gm, node) if node.op == "call_module" else None
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


def last_use(gm: torch.fx.GraphModule, stage: Stage) -> dict[str, int]:
    """Per value the stage reads, the index (in ``stage.nodes``) of the last node that reads it
    (a reducing node reads its source too); the stage's own outputs are never released.

    Values are released after their last use (as ``torch.fx.Interpreter`` does): the allocator
    then hands their memory, still in cache, to the next op; keeping every value of a long stage
    alive to its end made each op write into fresh memory (up to 3x slower convolutions on the
    same shapes).
    """
    def make() -> dict[str, int]:
        by = by_name(gm)
        sources = {r.node: r.source for r in stage.reductions}
        last: dict[str, int] = {}
        for step, name in enumerate(stage.nodes):
            for i in tensor_inputs(by[name]):
                last[i.name] = step
            if name in sources:
                last[sources[name]] = step
        for out in stage_io(gm, stage)[1]:
            last[out.name] = len(stage.nodes)
        return last

    return memo(gm, "ew_exec_last_use", tuple(stage.nodes), make)


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
        return bool(getattr(module(gm, node), "inplace", False))
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
        mod = module(gm, node)
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
        by = by_name(gm)
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

    return memo(gm, "ew_exec_writes_input", tuple(stage.nodes), make)

