"""Capture-time rewrites: the same computation, written so that more of it is row-local.

``graph.capture`` runs these on the traced graph before it decides every node's kind. Each one
replaces nodes by nodes that compute exactly the same values (bit for bit, or up to the
rounding of the same ops on another memory layout), so the model's output never changes; what
changes is that the planner can see that rows stay rows:

* ``drop_identities``: eval-mode stochastic depth (``torchvision.ops.stochastic_depth``) and
  functional dropout (``F.dropout(x, p, training=False)``) return their input: the calls go.
* ``fold_channel_layouts``: reshapes, transposes, chunks, splits and slices that only move
  channels (ShuffleNet's channel shuffle ``view -> transpose -> contiguous -> view``, then
  ``chunk(2, dim=1)``) become ``channel_take(x, index)``, one pointwise op per value used
  later. Which channels a region of such ops picks is found by running it on a tensor of
  element codes (``_probe``): a region is rewritten only when every value it hands on is
  exactly a channel selection of one 4-D map, every pixel staying where it was.
* ``wrap_per_pixel``: ops that compute every pixel from the same pixel become one ``PerPixel``
  module each, reading and writing ordinary NCHW maps: the channels-last islands of ConvNeXt
  (``permute(0, 2, 3, 1)``, LayerNorm over channels, Linear over the channel axis, GELU,
  ``permute(0, 3, 1, 2)``) and elementwise ops with a model constant that does not vary along
  H (ConvNeXt's ``layer_scale * x`` with a ``[C, 1, 1]`` scale). The permutes become views of
  the devices' channels-last maps (layout.py): free.

Every rewrite is a pure function of the graph, so every process that captures the same model
gets the same graph and the same node names (plans name nodes).
"""

from __future__ import annotations

import functools
import heapq
import operator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

# ---- identities -------------------------------------------------------------------------------

_DROPOUT_FUNCTIONS: set[Any] = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                F.feature_alpha_dropout}


def _is_stochastic_depth(target: Any) -> bool:
    return (getattr(target, "__module__", "") == "torchvision.ops.stochastic_depth"
            and getattr(target, "__name__", "") == "stochastic_depth")


def _arg(node: torch.fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def identity_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input an eval-mode stochastic depth or functional dropout call returns unchanged,
    else None (training mode, or arguments only known at run time)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    if _is_stochastic_depth(node.target):
        training, p = _arg(node, 3, "training", True), _arg(node, 1, "p", None)
    elif node.target in _DROPOUT_FUNCTIONS:
        training, p = _arg(node, 2, "training", True), _arg(node, 1, "p", 0.5)
    else:
        return None
    if training is False or (isinstance(p, (int, float)) and not isinstance(p, bool) and p == 0):
        return node.args[0]
    return None


def drop_identities(gm: torch.fx.GraphModule) -> int:
    """Remove eval-mode stochastic depth and dropout calls (module docstring); returns how many."""
    n = 0
    for node in list(gm.graph.nodes):
        src = identity_input(node)
        if src is not None:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            n += 1
    return n


# ---- channel layouts ----------------------------------------------------------------------------

def channel_take(x: torch.Tensor, index: tuple[int, ...]) -> torch.Tensor:
    """Channels ``index`` of map ``x`` (dim 1), in that order, as a new tensor (never a view of
    ``x``: a later in-place op must not write into a map that rows are still read from).

    A range of channels is one copy; so is a channel shuffle and a range of it (``_shuffled``),
    as ShuffleNet's reshapes did; any other order is a gather (``index_select``, ~10 times the
    cost of a copy per element on one CPU thread)."""
    start = index[0]
    if index == tuple(range(start, start + len(index))):
        return x[:, start:start + len(index)].clone(memory_format=torch.preserve_format)
    shuffle = _shuffle_of(int(x.shape[1]), index)
    if shuffle is not None:
        return _shuffled(x, *shuffle)
    return x.index_select(1, torch.tensor(index, dtype=torch.long, device=x.device))


@functools.lru_cache(maxsize=256)
def _shuffle_of(channels: int, index: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(groups, start, length)`` when ``index`` is channels ``[start, start + length)`` of the
    channel shuffle with ``groups`` groups (channel ``j * groups + i`` of the shuffle is channel
    ``i * channels / groups + j``), both multiples of ``groups``; else None."""
    n = len(index)
    for g in range(2, channels):
        if channels % g or n % g:
            continue
        perm = [i * (channels // g) + j for j in range(channels // g) for i in range(g)]
        for start in range(0, channels - n + 1, g):
            if tuple(perm[start:start + n]) == index:
                return g, start, n
    return None


def _shuffled(x: torch.Tensor, groups: int, start: int, length: int) -> torch.Tensor:
    """Channels ``[start, start + length)`` of the channel shuffle of ``x`` (``_shuffle_of``),
    in one copy; channels-last maps stay channels-last."""
    n, c, h, w = x.shape
    a, b = start // groups, (start + length) // groups
    if x.is_contiguous(memory_format=torch.channels_last):
        t = x.permute(0, 2, 3, 1).reshape(n, h, w, groups, c // groups).transpose(3, 4)[:, :, :, a:b]
        out = t.reshape(n, h, w, length).permute(0, 3, 1, 2)
    else:
        t = x.reshape(n, groups, c // groups, h, w).transpose(1, 2)[:, a:b]
        out = t.reshape(n, length, h, w)
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        out = out.clone(memory_format=torch.preserve_format)  # a reshape that could view: still a copy
    return out


_LAYOUT_METHODS = frozenset({
    "view", "reshape", "permute", "transpose", "contiguous", "flatten", "unflatten", "chunk", "split",
    "narrow", "size", "squeeze", "unsqueeze", "movedim", "swapaxes", "__getitem__",
})
_LAYOUT_FUNCTIONS: frozenset[Any] = frozenset({
    torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unflatten, torch.chunk, torch.split,
    torch.narrow, torch.squeeze, torch.unsqueeze, torch.movedim, torch.swapaxes, operator.getitem,
})
# integer arithmetic on sizes (``c // groups``): in a region only where no tensor flows through
_SIZE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.floordiv, operator.mul, operator.add, operator.sub, operator.mod, getattr,
})


def _is_tensor(node: torch.fx.Node) -> bool:
    tm = node.meta.get("tensor_meta")
    return tm is not None and hasattr(tm, "shape")


def _shape(node: torch.fx.Node) -> list[int] | None:
    tm = node.meta.get("tensor_meta")
    return [int(v) for v in tm.shape] if tm is not None and hasattr(tm, "shape") else None


def _inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


def _is_layout(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _LAYOUT_METHODS
    if node.op != "call_function":
        return False
    if node.target in _LAYOUT_FUNCTIONS:
        return True
    if node.target is getattr:
        return len(node.args) == 2 and node.args[1] == "shape"
    return node.target in _SIZE_FUNCTIONS and not any(_is_tensor(i) for i in _inputs(node))


def _in_place(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> bool:
    """Whether ``node`` may write into its input (erring towards yes)."""
    if node.op == "call_module":
        return gm is None or bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    return (node.kwargs.get("inplace") is True or any(a is True for a in node.args[1:])
            or (name.endswith("_") and not name.endswith("__")) or name.startswith("__i"))


def _in_place_user(node: torch.fx.Node) -> bool:
    return any(u.op != "call_module" and _in_place(u) for u in node.users)


def _region(x: torch.fx.Node, pos: dict[torch.fx.Node, int]) -> list[torch.fx.Node]:
    """The layout ops computed from ``x`` alone, in graph order (see ``fold_channel_layouts``)."""
    inside = {x}
    region: list[torch.fx.Node] = []
    heap = [(pos[u], u.name) for u in x.users if _is_layout(u)]
    by = {u.name: u for u in x.users}
    heapq.heapify(heap)
    seen: set[str] = set()
    while heap:
        _, name = heapq.heappop(heap)
        if name in seen:
            continue
        seen.add(name)
        n = by[name]
        if not _is_layout(n) or not all(i in inside for i in _inputs(n)):
            continue
        inside.add(n)
        region.append(n)
        for u in n.users:
            if u.name not in seen and _is_layout(u):
                by[u.name] = u
                heapq.heappush(heap, (pos[u], u.name))
    return region


def _run(node: torch.fx.Node, env: dict[torch.fx.Node, Any]) -> Any:
    args = torch.fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)  # type: ignore[operator]


def _is_size_value(v: Any) -> bool:
    if isinstance(v, (int, torch.Size)) and not isinstance(v, bool):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(e, int) and not isinstance(e, bool) for e in v)


def _probe(x: torch.fx.Node, region: list[torch.fx.Node]) -> dict[torch.fx.Node, tuple[int, ...]] | None:
    """For every tensor the region hands on, the channels of ``x`` it holds (None: the region
    does more than select channels, or cannot run on codes).

    Runs the region on ``codes``: element (n, c, h, w) of ``x`` replaced by its flat index. A
    value handed on is a channel selection when its element (n, c', h, w) holds the code of
    (n, index[c'], h, w) for every n, h, w.
    """
    shape = _shape(x)
    assert shape is not None
    n_, c_, h_, w_ = shape
    codes = torch.arange(n_ * c_ * h_ * w_, dtype=torch.int64).reshape(n_, c_, h_, w_)
    env: dict[torch.fx.Node, Any] = {x: codes}
    members = set(region)
    try:
        for node in region:
            env[node] = _run(node, env)
    except Exception:  # noqa: BLE001 - any op that cannot take integer codes: leave the region alone
        return None
    out: dict[torch.fx.Node, tuple[int, ...]] = {}
    for node in region:
        if all(u in members for u in node.users):
            continue
        v = env[node]
        if not isinstance(v, torch.Tensor):
            if not _is_size_value(v):
                return None  # a tuple of tensors (a chunk) used elsewhere
            continue
        if v.dim() != 4 or v.shape[0] != n_ or v.shape[2] != h_ or v.shape[3] != w_ or v.shape[1] == 0:
            return None
        if _in_place_user(node):
            return None  # it was a view the model writes into
        n = v // (c_ * h_ * w_)
        c = (v // (h_ * w_)) % c_
        h = (v // w_) % h_
        w = v % w_
        if not (torch.equal(n, torch.arange(n_).view(-1, 1, 1, 1).expand_as(v))
                and torch.equal(h, torch.arange(h_).view(1, 1, -1, 1).expand_as(v))
                and torch.equal(w, torch.arange(w_).view(1, 1, 1, -1).expand_as(v))):
            return None
        index = c[0, :, 0, 0]
        if not torch.equal(c, index.view(1, -1, 1, 1).expand_as(c)):
            return None
        out[node] = tuple(int(i) for i in index)
    return out


def fold_channel_layouts(gm: torch.fx.GraphModule) -> int:
    """Replace every region of layout ops that only selects channels of one 4-D map by
    ``channel_take`` nodes (module docstring); returns how many values were replaced.

    Needs ``tensor_meta`` on the nodes (``ShapeProp``)."""
    graph = gm.graph
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    erased: set[torch.fx.Node] = set()
    replaced = 0
    for x in nodes:
        if x in erased or x.op == "get_attr" or len(_shape(x) or []) != 4:
            continue
        if not any(_is_layout(u) for u in x.users) or _in_place_user(x):
            continue  # (a map written in place after a view of it was taken: the view must see it)
        region = _region(x, pos)
        if not any(_is_tensor(n) for n in region):
            continue
        picks = _probe(x, region)
        if not picks:
            continue
        channels = int((_shape(x) or [0, 0])[1])
        for node, index in picks.items():
            if index == tuple(range(channels)):
                node.replace_all_uses_with(x)
            else:
                with graph.inserting_before(node):
                    take = graph.call_function(channel_take, (x, index))
                node.replace_all_uses_with(take)
            replaced += 1
        for node in reversed(region):
            if not node.users:
                graph.erase_node(node)
                erased.add(node)
    return replaced


# ---- per-pixel ops ---------------------------------------------------------------------------------

class PerPixel(nn.Module):
    """One op of the model that computes each pixel of its output from the same pixel of its
    input maps (NCHW in, NCHW out): ``body`` is a small graph with the op, the model's
    constants it reads, and the permutes around it when the model ran it channels-last. It
    shares the model's weights."""

    def __init__(self, body: torch.fx.GraphModule, kind: str) -> None:
        super().__init__()
        self.body = body
        self.kind = kind  # "linear", "norm" or "elementwise": what the op is (planning.cost)

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        return self.body(*maps)


_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
)
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.elu, torch.sigmoid,
    torch.tanh, F.sigmoid, F.tanh, F.mish, operator.add, operator.mul, operator.sub, operator.truediv,
    torch.add, torch.mul, torch.sub, torch.div,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "add", "mul", "sub", "div", "contiguous"}


def _permute_dims(node: torch.fx.Node) -> tuple[torch.fx.Node, tuple[int, ...]] | None:
    """(input, dims) of a permute call, else None."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node) or node.kwargs:
        return None
    if (node.op == "call_method" and node.target == "permute") or (
            node.op == "call_function" and node.target is torch.permute):
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        if all(isinstance(d, int) for d in dims):
            return node.args[0], tuple(int(d) % 4 for d in dims)
    return None


def _const_rowwise(node: torch.fx.Node, out: list[int], h_axis: int) -> bool:
    """A model constant (``get_attr``) that broadcasts over 4-D ``out`` without varying along
    its H axis ``h_axis`` (2 for NCHW, 1 for a channels-last NHWC value)."""
    shape = _shape(node)
    if node.op != "get_attr" or shape is None or len(shape) > 4:
        return False
    padded = [1] * (4 - len(shape)) + shape
    return padded[h_axis] == 1 and all(p in (1, o) for p, o in zip(padded, out))


def _op_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """What a node inside a channels-last island is, if it is per pixel over the last axis."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if type(mod) is nn.Linear:
            return "linear"
        if type(mod) is nn.LayerNorm and len(mod.normalized_shape) == 1:
            return "norm"
        if isinstance(mod, _ELEMENTWISE_MODULES) or (isinstance(mod, nn.Dropout) and not mod.training):
            return "elementwise"
        return None
    if node.op == "call_function":
        if node.target is F.layer_norm:
            shape = _arg(node, 1, "normalized_shape", None)
            return "norm" if isinstance(shape, (tuple, list)) and len(shape) == 1 else None
        if node.target is F.linear:
            return "linear"
        return "elementwise" if node.target in _ELEMENTWISE_FUNCTIONS else None
    if node.op == "call_method":
        return "elementwise" if node.target in _ELEMENTWISE_METHODS else None
    return None


def _island(gm: torch.fx.GraphModule, entry: torch.fx.Node, x: torch.fx.Node,
            pos: dict[torch.fx.Node, int]) -> tuple[list[torch.fx.Node], list[torch.fx.Node]] | None:
    """(ops, exits) of the channels-last island that starts at ``entry = x.permute(0, 2, 3, 1)``:
    ops per pixel over the last axis, each exit ``v.permute(0, 3, 1, 2)`` of an island value;
    None when a value of the island goes anywhere else."""
    xs = _shape(x)
    assert xs is not None
    lead = [xs[0], xs[2], xs[3]]
    values = {entry}
    ops: list[torch.fx.Node] = []
    exits: list[torch.fx.Node] = []
    heap = [(pos[u], u.name, u) for u in entry.users]
    heapq.heapify(heap)
    seen: set[torch.fx.Node] = set()
    while heap:
        _, _, u = heapq.heappop(heap)
        if u in seen:
            continue
        seen.add(u)
        p = _permute_dims(u)
        if p is not None and p[0] in values and p[1] == (0, 3, 1, 2):
            exits.append(u)
            continue
        shape = _shape(u)
        kind = _op_kind(gm, u)
        if shape is None or len(shape) != 4 or shape[:3] != lead or kind is None or _in_place(u, gm):
            return None  # (in place: it would write into the map the island reads, a view of it)
        for i in _inputs(u):
            if i in values or (i.op == "get_attr" and kind in ("linear", "norm")):
                continue  # an island value, or a weight of F.linear / F.layer_norm
            if not _const_rowwise(i, shape, 1):
                return None  # a value from outside the island (or a constant varying along H)
        values.add(u)
        ops.append(u)
        for w in u.users:
            if w not in seen:
                heapq.heappush(heap, (pos[w], w.name, w))
    if not exits:
        return None
    for v in values:
        if not all(u in seen for u in v.users):
            return None
    return ops, exits


def _wrap(gm: torch.fx.GraphModule, node: torch.fx.Node, maps: list[torch.fx.Node], channels_last: bool,
          kind: str, name: str) -> str:
    """A ``PerPixel`` module computing ``node`` from the NCHW forms of ``maps`` (its map inputs),
    added to ``gm``; returns its name."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, m in enumerate(maps):
        ph = g.placeholder(f"x{i}")
        env[m] = g.call_method("permute", (ph, 0, 2, 3, 1)) if channels_last else ph

    def arg(n: torch.fx.Node) -> torch.fx.Node:
        if n not in env:
            assert n.op == "get_attr", n.name
            env[n] = g.node_copy(n)
        return env[n]

    out = g.node_copy(node, arg)
    g.output(g.call_method("permute", (out, 0, 3, 1, 2)) if channels_last else out)
    body = torch.fx.GraphModule(gm, g, class_name="PerPixelBody")
    target = name
    k = 0
    while hasattr(gm, target):
        k += 1
        target = f"{name}_{k}"
    gm.add_submodule(target, PerPixel(body, kind))
    return target


def wrap_per_pixel(gm: torch.fx.GraphModule) -> int:
    """Rewrite channels-last islands and elementwise ops with H-constant model constants as
    ``PerPixel`` modules (module docstring); returns how many ops were wrapped.

    Needs ``tensor_meta`` on the nodes (``ShapeProp``)."""
    graph = gm.graph
    wrapped = _wrap_constant_ops(gm)  # first: the maps they read still have their shapes
    erased: set[torch.fx.Node] = set()
    for entry in list(graph.nodes):
        if entry in erased:
            continue
        p = _permute_dims(entry)
        if p is None or p[1] != (0, 2, 3, 1) or len(_shape(p[0]) or []) != 4 or p[0].op == "get_attr":
            continue
        x = p[0]
        found = _island(gm, entry, x, {n: i for i, n in enumerate(graph.nodes)})
        if found is None:
            continue
        ops, exits = found
        nchw: dict[torch.fx.Node, torch.fx.Node] = {entry: x}
        for op in ops:
            maps = list(dict.fromkeys(i for i in _inputs(op) if i in nchw))
            target = _wrap(gm, op, maps, True, str(_op_kind(gm, op)), f"ew_pixel_{op.name}")
            with graph.inserting_before(op):
                nchw[op] = graph.call_module(target, tuple(nchw[m] for m in maps))
            wrapped += 1
        for e in exits:
            e.replace_all_uses_with(nchw[e.args[0]])  # type: ignore[index]
        for n in [*exits, *reversed(ops), entry]:
            graph.erase_node(n)
            erased.add(n)
        for n in list(graph.nodes):
            if n.op == "get_attr" and not n.users:
                graph.erase_node(n)
                erased.add(n)
    return wrapped


def _wrap_constant_ops(gm: torch.fx.GraphModule) -> int:
    """Elementwise ops on 4-D maps with model constants that do not vary along H (``[C, 1, 1]``
    scales): ``PerPixel`` modules holding the constant, so the node reads maps only."""
    graph = gm.graph
    n_wrapped = 0
    for node in list(graph.nodes):
        shape = _shape(node)
        if (shape is None or len(shape) != 4 or node.op == "get_attr" or _op_kind(gm, node) != "elementwise"
                or _in_place(node, gm)):
            continue
        ins = _inputs(node)
        consts = [i for i in ins if i.op == "get_attr"]
        maps = list(dict.fromkeys(i for i in ins if i.op != "get_attr"))
        if not consts or not maps or any(_shape(m) != shape for m in maps):
            continue
        if not all(_const_rowwise(c, shape, 2) for c in consts):
            continue
        target = _wrap(gm, node, maps, False, "elementwise", f"ew_pixel_{node.name}")
        with graph.inserting_before(node):
            new = graph.call_module(target, tuple(maps))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for c in consts:
            if not c.users:
                graph.erase_node(c)
        n_wrapped += 1
    return n_wrapped

