"""Graph capture: a deterministic torch.fx graph annotated with what the planner needs.

Why torch.fx: ``symbolic_trace`` names nodes after module paths (``features_0``,
``layer1_0_conv1``), so every process that traces the same architecture gets the same names, and
a Plan can refer to nodes by name across machines. Each node is annotated with

* ``meta["ew_shape"]``: its output shape (from ``torch.fx.passes.shape_prop.ShapeProp``), or
  ``None`` for non-tensor values;
* ``meta["ew_kind"]``: how its output rows depend on its input rows, one of ``NODE_KINDS``:

  - ``window``: a sliding-window op over rows (Conv2d, MaxPool2d, AvgPool2d) whose exact row
    arithmetic ``planning.halo`` knows;
  - ``pointwise``: output row r depends on input row r only, for every tensor input of the same
    shape (activations, eval-mode BatchNorm, residual add, channel concat, eval-mode dropout);
  - ``linear``: an ``nn.Linear`` on a 2-D input (can be split by output features);
  - ``global``: anything else (adaptive pooling, flatten, training-mode BatchNorm, ops we do not
    understand). Global ops run on the leader, unpartitioned: slower, never wrong;
  - ``input`` / ``output`` / ``const`` for placeholders, the output node and ``get_attr``.

Kinds are decided conservatively: an op is only ``pointwise``/``window`` when that is certainly
exact, e.g. BatchNorm only in eval mode (training mode uses batch statistics: a global op).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from edgeweave.errors import EdgeweaveError
from edgeweave.planning.fold import fold_batchnorm
from edgeweave.planning.rewrite import PerPixel, channel_take, drop_identities, fold_channel_layouts, wrap_per_pixel

NODE_KINDS = ("input", "output", "const", "window", "pointwise", "linear", "global")

# Modules whose output row r depends only on input row r (in eval mode).
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Identity,
)
_DROPOUT_MODULES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_BN_MODULES: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.BatchNorm1d)

_POINTWISE_FUNCTIONS: set[Any] = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.elu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, torch.nn.functional.mish,
    operator.add, operator.mul, operator.sub, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.mul, torch.sub,
}
_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "add", "add_", "mul", "mul_", "sub",
    "contiguous", "clone",
}


@dataclass(frozen=True)
class Window:
    """A sliding-window op: its row (H) parameters plus what is needed to run it on a strip.

    ``op`` is ``conv``, ``max``, ``avg`` or ``identity``. H parameters (``k``, ``s``, ``p``,
    ``d``) drive the halo arithmetic; W parameters are passed to the op unchanged (we never cut
    along W): ``pad_w`` and ``k_w``, ``s_w``, ``d_w`` (None: as along H). With the pooling
    options (``ceil_mode``, ``count_include_pad``, ``divisor_override``) a pooling op is fully
    described here, so a functional ``F.max_pool2d``/``F.avg_pool2d`` call needs no module
    (``engine.windows.apply_window``); a convolution takes its weights from its module.
    """

    op: str
    k: int
    s: int
    p: int
    d: int
    ceil_mode: bool = False
    pad_w: int = 0
    k_w: int | None = None
    s_w: int | None = None
    d_w: int | None = None
    count_include_pad: bool = True
    divisor_override: int | None = None

    @property
    def kernel(self) -> tuple[int, int]:
        return (self.k, self.k if self.k_w is None else self.k_w)

    @property
    def stride(self) -> tuple[int, int]:
        return (self.s, self.s if self.s_w is None else self.s_w)

    @property
    def dilation(self) -> tuple[int, int]:
        return (self.d, self.d if self.d_w is None else self.d_w)


IDENTITY_WINDOW = Window("identity", 1, 1, 0, 1)  # adaptive pooling to the input's own size


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def window_of(module: nn.Module) -> Window | None:
    """The row arithmetic of ``module`` if it is a window op we can split exactly, else None."""
    if type(module) is nn.Conv2d:
        if module.padding_mode != "zeros":
            return None  # reflect/replicate/circular padding would need neighbours' rows at borders
        k, d, s = _pair(module.kernel_size), _pair(module.dilation), _pair(module.stride)
        if isinstance(module.padding, str):
            if module.padding == "valid":
                p = (0, 0)
            else:  # "same": symmetric only when d*(k-1) is even in both dims
                tot = (d[0] * (k[0] - 1), d[1] * (k[1] - 1))
                if tot[0] % 2 or tot[1] % 2:
                    return None
                p = (tot[0] // 2, tot[1] // 2)
        else:
            p = _pair(module.padding)
        return Window("conv", k[0], s[0], p[0], d[0], False, p[1], k[1], s[1], d[1])
    if type(module) is nn.MaxPool2d:
        if module.return_indices:
            return None
        return pool_window("max", module.kernel_size, module.stride, module.padding, module.dilation,
                           module.ceil_mode)
    if type(module) is nn.AvgPool2d:
        return pool_window("avg", module.kernel_size, module.stride, module.padding, 1, module.ceil_mode,
                           module.count_include_pad, module.divisor_override)
    return None


def pool_window(op: str, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                ceil_mode: Any = False, count_include_pad: Any = True,
                divisor_override: Any = None) -> Window | None:
    """The Window of a max (``op="max"``) or average pooling with these arguments (as the module
    or ``F.max_pool2d``/``F.avg_pool2d`` takes them), else None when it cannot run on strips."""
    try:
        k = _pair(kernel_size)
        s = _pair(stride if stride not in (None, [], ()) else kernel_size)
        p, d = _pair(padding), _pair(dilation)
    except (TypeError, ValueError, IndexError):
        return None  # sizes computed at run time (graph nodes): not a fixed window
    if not isinstance(ceil_mode, bool) or not isinstance(count_include_pad, bool):
        return None
    if divisor_override is not None and not isinstance(divisor_override, int):
        return None
    if op == "avg":
        if d != (1, 1):
            return None
        if not count_include_pad and p[0] > 0:
            # The divisor would count only real rows, which a strip cannot see at its true
            # borders with H-padding 0; rather than emulate it we run it on the leader.
            return None
    return Window(op, k[0], s[0], p[0], d[0], bool(ceil_mode), p[1], k[1], s[1], d[1],
                  bool(count_include_pad), divisor_override)


def _bind(node: torch.fx.Node, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """The call's arguments by name (positional then keyword), defaults filled; None when it
    passes an argument ``names`` does not know."""
    if len(node.args) > len(names):
        return None
    out = dict(defaults)
    out.update(zip(names, node.args))
    for k, v in node.kwargs.items():
        if k not in names:
            return None
        out[k] = v
    return out if all(n in out for n in names) else None


_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_MAX_POOL_FUNCTIONS: set[Any] = {F.max_pool2d, torch.max_pool2d}
_AVG_POOL_FUNCTIONS: set[Any] = {F.avg_pool2d, torch._C._nn.avg_pool2d}


def function_window(node: torch.fx.Node) -> Window | None:
    """The Window of a functional pooling call (``F.max_pool2d``, ``F.avg_pool2d``), else None."""
    if node.op != "call_function":
        return None
    if node.target in _MAX_POOL_FUNCTIONS:
        a = _bind(node, _MAX_POOL_ARGS, {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                                         "return_indices": False})
        if a is None or a["return_indices"] is not False:
            return None
        return pool_window("max", a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
    if node.target in _AVG_POOL_FUNCTIONS:
        a = _bind(node, _AVG_POOL_ARGS, {"stride": None, "padding": 0, "ceil_mode": False,
                                         "count_include_pad": True, "divisor_override": None})
        if a is None:
            return None
        return pool_window("avg", a["kernel_size"], a["stride"], a["padding"], 1, a["ceil_mode"],
                           a["count_include_pad"], a["divisor_override"])
    return None


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


def _same_shape_inputs(node: torch.fx.Node) -> bool:
    """True when every tensor input has exactly the output's shape (no broadcasting)."""
    shape = node.meta.get("ew_shape")
    if shape is None:
        return False
    for a in _tensor_args(node):
        if a.meta.get("ew_shape") != shape or a.meta.get("ew_kind") == "const":
            return False
    return bool(_tensor_args(node))


def _same_pixels(node: torch.fx.Node, args: list[torch.fx.Node]) -> bool:
    """True when ``node`` and every tensor it reads are 4-D maps (not constants) of the same
    batch, height and width: a pixel-by-pixel op whose channels may differ (``PerPixel``,
    ``channel_take``)."""
    shape = node.meta.get("ew_shape")
    if shape is None or len(shape) != 4 or not args:
        return False
    for a in args:
        s = a.meta.get("ew_shape")
        if s is None or len(s) != 4 or a.meta.get("ew_kind") == "const" or [s[0], s[2], s[3]] != [shape[0], shape[2], shape[3]]:
            return False
    return True


def _classify(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "const"
    shape = node.meta.get("ew_shape")
    if shape is None:
        return "global"
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        args = _tensor_args(node)
        if isinstance(mod, PerPixel):  # one pixel from the same pixel of its maps (rewrite.py)
            return "pointwise" if _same_pixels(node, args) else "global"
        if len(args) != 1 or len(node.args) != 1 or node.kwargs:
            return "global"
        in_shape = args[0].meta.get("ew_shape")
        if window_of(mod) is not None and in_shape is not None and len(in_shape) == 4:
            return "window"
        if (isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and in_shape is not None
                and len(in_shape) == 4 and list(in_shape[2:]) == list(shape[2:]) and shape[2] * shape[3] > 1):
            # VGG's AdaptiveAvgPool2d((7, 7)) on a 7x7 map: every window is one element, the
            # op is the identity; as a 1-row window it stays in the strips. (To 1x1 it is a
            # global reduction, see reduction_of.)
            node.meta["ew_window"] = IDENTITY_WINDOW
            return "window"
        if type(mod) is nn.Linear and in_shape is not None and len(in_shape) == 2:
            return "linear"
        if isinstance(mod, _POINTWISE_MODULES) and not isinstance(mod, nn.PReLU):
            return "pointwise" if _same_shape_inputs(node) else "global"
        if isinstance(mod, nn.PReLU):  # per-channel weight along dim 1: fine for 4-D / 2-D rows?
            return "pointwise" if in_shape is not None and len(in_shape) == 4 and _same_shape_inputs(node) else "global"
        if isinstance(mod, _DROPOUT_MODULES) and not mod.training:
            return "pointwise" if _same_shape_inputs(node) else "global"
        if isinstance(mod, _BN_MODULES) and not mod.training and mod.track_running_stats:
            # Eval BN is a per-channel affine map; on 2-D input the channels are the split axis,
            # so it is only row-local for 4-D maps.
            return "pointwise" if in_shape is not None and len(in_shape) == 4 and _same_shape_inputs(node) else "global"
        return "global"
    if node.op == "call_function":
        if node.target is channel_take:  # channels of one map (rewrite.py)
            return "pointwise" if _same_pixels(node, _tensor_args(node)) else "global"
        w = function_window(node)
        if w is not None:
            args = _tensor_args(node)
            in_shape = args[0].meta.get("ew_shape") if len(args) == 1 and node.args and node.args[0] is args[0] else None
            if in_shape is not None and len(in_shape) == 4 and len(shape) == 4 and args[0].meta.get("ew_kind") != "const":
                node.meta["ew_window"] = w
                return "window"
            return "global"
        if node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            if (
                dim in (1, -3)  # channels of an NCHW map
                and isinstance(parts, (list, tuple))
                and len(shape) == 4
                and all(isinstance(p, torch.fx.Node) and p.meta.get("ew_shape") is not None
                        and p.meta.get("ew_kind") != "const"
                        and len(p.meta["ew_shape"]) == 4
                        and p.meta["ew_shape"][0] == shape[0]
                        and p.meta["ew_shape"][2:] == shape[2:] for p in parts)
            ):
                return "pointwise"
            return "global"
        if node.target in _POINTWISE_FUNCTIONS:
            return "pointwise" if _same_shape_inputs(node) else "global"
        return "global"
    if node.op == "call_method":
        if node.target in _POINTWISE_METHODS:
            return "pointwise" if _same_shape_inputs(node) else "global"
        return "global"
    return "global"


@contextlib.contextmanager
def _eval_temporarily(model: nn.Module) -> Iterator[None]:
    """Run shape propagation without touching BatchNorm statistics; restore every flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


_VIEW_TO_RESHAPE = {"view": "reshape", "view_as": "reshape_as"}


def _reshape_views(gm: torch.fx.GraphModule) -> None:
    """Make the graph reshape where the model's code views a shape.

    Why: the devices keep maps channels-last (layout.py), and ``x.view(n, -1)`` of such a map
    fails where ``reshape`` gives the same values (copying only when it must). A view to another
    dtype (``x.view(torch.int32)``) has no reshape and is left alone.
    """
    changed = False
    for node in gm.graph.nodes:
        if (node.op == "call_method" and node.target in _VIEW_TO_RESHAPE
                and not any(isinstance(a, torch.dtype) for a in node.args[1:])):
            node.target = _VIEW_TO_RESHAPE[node.target]
            changed = True
    if changed:
        gm.recompile()


def _norm_flop(input_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """A normalisation: 5 operations per element (mean, centring, variance, scaling, affine)."""
    n = 1
    for v in input_shape:
        n *= int(v)
    return 5 * n


def _bn_eval_flop(input_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Eval-mode batch norm: a per-channel scale and shift, 2 operations per element."""
    n = 1
    for v in input_shape:
        n *= int(v)
    return 2 * n


def _sdpa_cpu_flop(query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: Any,
                   out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query, key, value))


def _mha_flop(query: Sequence[int], key: Sequence[int], value: Sequence[int], embed_dim: int, num_heads: int,
              *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``aten._native_multi_head_attention`` (nn.MultiheadAttention's fast path in eval mode):
    the q, k, v and output projections plus the attention itself (batch-first shapes)."""
    b, lq, e = (int(v) for v in query)
    s = int(key[1])
    heads = int(num_heads)
    proj = 2 * b * lq * e * e + 2 * 2 * b * s * e * e + 2 * b * lq * e * e
    attn = 2 * 2 * b * heads * lq * s * (e // heads)
    return proj + attn


def _flop_mapping() -> dict[Any, Any]:
    """``torch.utils.flop_counter`` formulas for what it does not count by itself: norms, and
    the CPU kernels of attention."""
    aten = torch.ops.aten
    out: dict[Any, Any] = {
        aten.native_layer_norm: _norm_flop,
        aten.native_group_norm: _norm_flop,
        aten.native_batch_norm: _bn_eval_flop,
        aten._native_batch_norm_legit_no_training: _bn_eval_flop,
        aten._native_multi_head_attention: _mha_flop,
    }
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    return out


class _ShapeFlops(ShapeProp):
    """Shape propagation that also counts each node's FLOPs with ``torch.utils.flop_counter``
    (``node.meta["ew_flop_count"]`` and, per aten op, ``meta["ew_flop_ops"]``): one counter
    over the whole run, each node charged what the counter added while it ran."""

    counter: Any = None

    def run_node(self, n: torch.fx.Node) -> Any:
        if self.counter is None or n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        totals = self.counter.flop_counts["Global"]
        before = dict(totals)
        out = super().run_node(n)
        ops = {str(k).rsplit(".", 1)[-1]: int(v - before.get(k, 0)) for k, v in totals.items() if v != before.get(k, 0)}
        n.meta["ew_flop_ops"] = ops
        n.meta["ew_flop_count"] = sum(ops.values())
        return out


def _propagate(gm: torch.fx.GraphModule, x: torch.Tensor) -> None:
    """Shapes and FLOP counts of every node, from one run on ``x`` (BatchNorm statistics kept)."""
    from torch.utils.flop_counter import FlopCounterMode

    prop = _ShapeFlops(gm)
    with _eval_temporarily(gm), torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as fc:
        prop.counter = fc
        prop.propagate(x)


def capture(model: nn.Module, input_shape: Sequence[int]) -> torch.fx.GraphModule:
    """Trace ``model`` with torch.fx and annotate every node with its shape and kind.

    Call ``model.eval()`` first: kinds are decided from the modules' current mode (training-mode
    BatchNorm and dropout are global/random and stay on the leader). The returned GraphModule
    shares parameters with ``model``, except where an eval-mode BatchNorm was folded into the
    convolution before it (``planning.fold``): that convolution is a folded copy.
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types for untraceable code
        raise EdgeweaveError(f"cannot trace the model with torch.fx: {type(e).__name__}: {e}") from None
    gm.training = model.training  # only the root flag: submodules are shared with ``model``
    _reshape_views(gm)
    fold_batchnorm(gm)  # eval-mode BatchNorm into the convolution before it (planning/fold.py)
    if drop_identities(gm):  # eval-mode stochastic depth and dropout calls (planning/rewrite.py)
        gm.graph.lint()
        gm.recompile()
    x = torch.zeros(*[int(v) for v in input_shape])
    _propagate(gm, x)
    if fold_channel_layouts(gm) + wrap_per_pixel(gm):  # the same values, row-local ops (rewrite.py)
        gm.graph.lint()
        gm.recompile()
        _propagate(gm, x)
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        shape = list(tm.shape) if tm is not None and hasattr(tm, "shape") else None
        node.meta["ew_shape"] = [int(v) for v in shape] if shape is not None else None
    for node in gm.graph.nodes:  # topological order: inputs are classified before users
        node.meta["ew_kind"] = _classify(gm, node)
    _annotate_reductions(gm)
    gm.meta["ew_input_shape"] = [int(v) for v in input_shape]
    return gm


def measure_density(gm: torch.fx.GraphModule, seed: int = 0) -> None:
    """Annotate each node with the share of its values that are not all-zero bits
    (``node.meta["ew_density"]``), from one run on a seeded normal input; once per graph.

    Why: the runtime codes the rows it sends (runtime/codec.py), and rows after a ReLU travel
    about half as large, so the planner prices a link by the value's density. It is the
    density of a random input, an estimate for real ones (where a trained network is sparser
    after its ReLUs, links are priced high rather than low). A graph that cannot run on
    a random float input keeps no density and is priced raw.
    """
    if gm.meta.get("ew_density_seed") == seed:
        return
    gm.meta["ew_density_seed"] = seed
    x = torch.randn(*gm.meta["ew_input_shape"], generator=torch.Generator().manual_seed(seed))

    class _Density(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.numel():
                n.meta["ew_density"] = float(torch.count_nonzero(out.view(torch.int32))) / out.numel()
            return out

    try:
        with _eval_temporarily(gm), torch.no_grad():
            _Density(gm).run(x)
    except Exception:  # noqa: BLE001 - any model code: then every link is priced raw
        for n in gm.graph.nodes:
            n.meta.pop("ew_density", None)


def node_kind(node: torch.fx.Node) -> str:
    return str(node.meta.get("ew_kind", "global"))


def node_shape(node: torch.fx.Node) -> list[int] | None:
    return node.meta.get("ew_shape")


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The graph nodes ``node`` reads (in argument order, duplicates removed)."""
    seen: dict[torch.fx.Node, None] = {}
    for a in _tensor_args(node):
        seen.setdefault(a, None)
    return list(seen)


def node_window(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Window:
    """The node's Window (cached in ``node.meta``: the planner asks for it many times)."""
    w = node.meta.get("ew_window")
    if w is None:
        w = window_of(gm.get_submodule(str(node.target))) if node.op == "call_module" else function_window(node)
        assert w is not None, node.name
        node.meta["ew_window"] = w
    return w


def nodes_by_name(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


# ---- global reductions (exact partial sums over strips) ---------------------------------------
#
# A *reducing* node sums or averages a 4-D map over H and W (``x.mean((2, 3))``,
# ``torch.sum(x, dim=(-2, -1), keepdim=True)``, ``adaptive_avg_pool2d(x, 1)``). Its value is
# the sum of per-strip partial sums over disjoint row ranges, so a map split into strips can be
# reduced exactly without gathering it. Its result and everything computed from results like it
# (Linear, sigmoid, indexing: ``meta["ew_small"]``) is a small whole tensor; an elementwise op
# that combines a map with such small values broadcast over H and W (``x * w[..., None, None]``)
# stays row-local, with the small values as *side inputs* (``meta["ew_side"]``). The kinds of
# these nodes are unchanged (``global``); the planner decides whether to use the reduction.
#
# A Linear layer on a flattened 4-D map (VGG's first classifier layer, ``fc(flatten(x, 1))``)
# is such a sum too: ``W @ flatten(x)`` is the sum over rows h of ``W[:, cols(h)] @ x[:, :, h]``,
# so each device multiplies the rows it holds by the matching columns of the weight and only the
# ``[N, out]`` partial products travel (op ``linear``; the bias is added to the total). The
# flatten is folded into the reduction (``meta["ew_folded"]``) and never computed; so is an
# adaptive average pool between the map and the flatten when it does not shrink the map (the
# layer's weight is then multiplied by the pooling, ``pool_matrix``).

@dataclass(frozen=True)
class Reduce:
    """How a reducing node turns the total of its partial sums into its value."""

    op: str  # "mean", "sum" or "linear" (a Linear layer on the flattened map)
    keepdim: bool  # output [N, C, 1, 1] (True) or [N, C]
    count: int  # H * W of the reduced map (the divisor of a mean)


_REDUCE_METHODS = {"mean": "mean", "sum": "sum"}
_REDUCE_FUNCTIONS: dict[Any, str] = {torch.mean: "mean", torch.sum: "sum"}


def _is_hw(dims: Any) -> bool:
    if not isinstance(dims, (tuple, list)) or len(dims) != 2:
        return False
    return sorted(int(d) % 4 for d in dims if isinstance(d, int)) == [2, 3]


def _is_one(size: Any) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and len(size) == 2 and all(v == 1 for v in size))


def reduction_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Reduce | None:
    """The node's ``Reduce`` if it is a sum/mean over H and W of one 4-D map, else None."""
    args = _tensor_args(node)
    if len(args) != 1 or not node.args or node.args[0] is not args[0]:
        return None
    shape = args[0].meta.get("ew_shape")
    if shape is None or len(shape) != 4 or args[0].meta.get("ew_kind") == "const":
        return None
    count = int(shape[2]) * int(shape[3])
    op: str | None = None
    rest, kw = list(node.args[1:]), dict(node.kwargs)
    if node.op == "call_method" and node.target in _REDUCE_METHODS:
        op = _REDUCE_METHODS[str(node.target)]
    elif node.op == "call_function" and node.target in _REDUCE_FUNCTIONS:
        op = _REDUCE_FUNCTIONS[node.target]
    if op is not None:
        dims = kw.pop("dim", rest.pop(0) if rest else None)
        keep = kw.pop("keepdim", rest.pop(0) if rest else False)
        if rest or kw or not _is_hw(dims) or not isinstance(keep, bool):
            return None  # dtype=..., out=...: not worth the risk
        return Reduce(op, keep, count)
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = kw.pop("output_size", rest.pop(0) if rest else None)
        return Reduce("mean", True, count) if not rest and not kw and _is_one(size) else None
    if node.op == "call_module" and not node.kwargs and len(node.args) == 1:
        mod = gm.get_submodule(str(node.target))
        if type(mod) is nn.AdaptiveAvgPool2d and _is_one(mod.output_size):
            return Reduce("mean", True, count)
    return None


def _flattened_map(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The 4-D map ``node`` flattens from dim 1, else None.

    ``torch.flatten(x, 1)``, ``x.flatten(1)`` and ``nn.Flatten()``.
    """
    args, kw = list(node.args), dict(node.kwargs)
    if not args or not isinstance(args[0], torch.fx.Node):
        return None
    src = args[0]
    shape = src.meta.get("ew_shape")
    if shape is None or len(shape) != 4 or src.meta.get("ew_kind") == "const" or src.meta.get("ew_small"):
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if type(mod) is not nn.Flatten or len(args) != 1 or kw:
            return None
        start, end = mod.start_dim, mod.end_dim
    elif (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        start = kw.pop("start_dim", args[1] if len(args) > 1 else 0)
        end = kw.pop("end_dim", args[2] if len(args) > 2 else -1)
        if kw or len(args) > 3:
            return None
    else:
        return None
    return src if start == 1 and end in (-1, 3) else None


def _pooled_map(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The map ``node`` average-pools to a fixed size no smaller than the map's, else None.

    VGG's ``AdaptiveAvgPool2d((7, 7))`` at inputs other than 224 (6x6 -> 7x7 at 200): not a
    window op, so it would stop the strips; but pooling is linear, so a Linear layer on the
    flattened pool is a Linear layer on the map itself (``pool_matrix``). Larger maps would make
    that layer larger than the original; they are left alone.
    """
    if node_kind(node) != "global" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    if node.op == "call_module":
        if type(gm.get_submodule(str(node.target))) is not nn.AdaptiveAvgPool2d or len(node.args) != 1 or node.kwargs:
            return None
    elif node.op != "call_function" or node.target is not F.adaptive_avg_pool2d or len(node.args) + len(node.kwargs) != 2:
        return None
    src = node.args[0]
    shape, out = src.meta.get("ew_shape"), node.meta.get("ew_shape")
    if shape is None or out is None or len(shape) != 4 or len(out) != 4 or src.meta.get("ew_kind") == "const":
        return None
    if src.meta.get("ew_small") or int(shape[2]) * int(shape[3]) > int(out[2]) * int(out[3]):
        return None
    return src


def pool_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """``[out, in]``: adaptive average pooling along one axis as a matrix (PyTorch's windows)."""
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        lo, hi = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _linear_reduction(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[Reduce, list[torch.fx.Node]] | None:
    """(Reduce, folded nodes) when ``node`` is an ``nn.Linear`` reading only ``flatten(map, 1)``
    or ``flatten(adaptive_avg_pool2d(map, size), 1)`` (see ``_pooled_map``)."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
        return None
    if type(gm.get_submodule(str(node.target))) is not nn.Linear:
        return None
    flat = node.args[0]
    src = _flattened_map(gm, flat)
    if src is None or len(flat.users) != 1:
        return None
    folded = [flat]
    if len(src.users) == 1 and (pooled := _pooled_map(gm, src)) is not None:
        folded.insert(0, src)
        node.meta["ew_reduce_pool"] = tuple(int(v) for v in src.meta["ew_shape"][2:])
        src = pooled
    shape = src.meta["ew_shape"]
    return Reduce("linear", False, int(shape[2]) * int(shape[3])), folded


def _broadcasts_over_hw(small: Sequence[int], out: Sequence[int]) -> bool:
    """True when a value of shape ``small`` broadcasts to the 4-D ``out`` with H and W of size 1."""
    if len(small) > 4:
        return False
    padded = [1] * (4 - len(small)) + [int(v) for v in small]
    return padded[2] == 1 and padded[3] == 1 and all(p in (1, o) for p, o in zip(padded[:2], out[:2]))


def _annotate_reductions(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        red = reduction_of(gm, node)
        if red is not None:
            src = _tensor_args(node)[0]
        elif (lin := _linear_reduction(gm, node)) is not None:
            red, folded = lin
            for f in folded:
                f.meta["ew_folded"] = True
            src = folded[0].args[0]
        if red is not None:
            node.meta["ew_reduce"] = red
            node.meta["ew_reduce_source"] = src
            node.meta["ew_small"] = True
            continue
        args = _tensor_args(node)
        smalls = [a for a in args if a.meta.get("ew_small")]
        if smalls and all(a.meta.get("ew_small") or a.meta.get("ew_kind") == "const" for a in args):
            node.meta["ew_small"] = True
            continue
        shape = node.meta.get("ew_shape")
        elementwise = (
            (node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS)
            or (node.op == "call_method" and node.target in _POINTWISE_METHODS)
        )
        if smalls and elementwise and shape is not None and len(shape) == 4:
            maps = [a for a in args if not a.meta.get("ew_small")]
            if maps and all(
                a.meta.get("ew_shape") == shape and a.meta.get("ew_kind") != "const" for a in maps
            ) and all(_broadcasts_over_hw(a.meta.get("ew_shape") or [0] * 5, shape) for a in smalls):
                node.meta["ew_side"] = tuple(a.name for a in smalls)


def is_small(node: torch.fx.Node) -> bool:
    """True for a reducing node's result and values computed only from such results."""
    return bool(node.meta.get("ew_small"))


def node_reduce(node: torch.fx.Node) -> Reduce | None:
    return node.meta.get("ew_reduce")


def reduce_source(node: torch.fx.Node) -> torch.fx.Node:
    """The 4-D map a reducing node sums over (for a linear reduction: the map before the flatten)."""
    return node.meta["ew_reduce_source"]


def is_folded(node: torch.fx.Node) -> bool:
    """A flatten (or the pool before it) computed as part of the linear reduction that reads it
    (never run on its own)."""
    return bool(node.meta.get("ew_folded"))


def reduce_pool(node: torch.fx.Node) -> tuple[int, int] | None:
    """The output size of the adaptive average pool a linear reduction folds, else None."""
    return node.meta.get("ew_reduce_pool")


def reduce_partial_shape(node: torch.fx.Node) -> list[int]:
    """Shape of one device's partial sum for a reducing node (the wire format)."""
    red = node_reduce(node)
    if red is not None and red.op == "linear":
        return [int(v) for v in node_shape(node) or []]
    shape = node_shape(reduce_source(node)) or [0, 0]
    return [int(shape[0]), int(shape[1]), 1, 1]


def side_inputs(node: torch.fx.Node) -> tuple[str, ...]:
    """Names of the small values an elementwise op broadcasts over a map (empty: none)."""
    return tuple(node.meta.get("ew_side", ()))


def is_rowwise(node: torch.fx.Node) -> bool:
    """Pointwise, or elementwise with small side inputs: row r of the output needs row r of the maps."""
    return node_kind(node) == "pointwise" or bool(node.meta.get("ew_side"))
