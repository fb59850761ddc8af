"""Cost model: FLOPs per node, compute seconds per device, transfer seconds per link.

Compute: EdgeLD's linear model, ``seconds = a * FLOPs + b`` per device and node call
(optionally per op kind, as in ``DeviceProfile.per_kind``; see ``compute_s``). A node's FLOPs
are what ``torch.utils.flop_counter`` counts while the node runs at capture
(``graph.capture``: convolutions, matrix products, attention, and the norms
``graph._flop_mapping`` adds), with EdgeLD's bias term on convolutions and 2-D linear layers
(``2 * H * W * (Cin/groups * K^2 + 1) * Cout``, the convention the profiles are fitted in);
pooling counts one operation per window element, and an elementwise op its elements times
the operations one element takes (``profiling.flops.ELEMENTWISE_OPS``: a GELU costs about ten
times a ReLU). ``flop_kind`` says which of the profile's lines prices a node.

Transfers: every device has one full-duplex link (``bandwidth_bps``, one-way ``latency_s``) to a
switch. A transfer src -> dst takes ``bytes * 8 / min(bw_src, bw_dst) + lat_src + lat_dst`` and
occupies src's uplink for ``bytes * 8 / bw_src`` and dst's downlink for ``bytes * 8 / bw_dst``
(a link is busy for the bytes at its own rate); transfers sharing a link queue in plan order,
and a device forwards rows it received only after receiving them. In gather mode the leader's
link carries every strip twice (in and out), so it is the shared bottleneck, as on EdgeLD's
testbed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch.fx
import torch.nn as nn

from edgeweave.planning.graph import node_kind, node_reduce, node_shape, node_window, reduce_source, tensor_inputs
from edgeweave.planning.halo import EMPTY, Range, intersect, size
from edgeweave.planning.rewrite import PerPixel
from edgeweave.profiling.compute import KIND_FALLBACK, op_kind
from edgeweave.profiling.flops import ELEMENTWISE_OPS
from edgeweave.profiling.profile import DeviceProfile
from edgeweave.runtime.codec import wire_ratio

DTYPE_BYTES = 4  # float32 activations


_MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "_native_multi_head_attention",
               "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention"}
_CONV_OPS = {"convolution", "conv2d", "_convolution"}
_NORM_OPS = {"native_layer_norm", "native_group_norm", "native_batch_norm", "_native_batch_norm_legit_no_training"}


def flop_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """Which of the profile's kinds a node's FLOPs are charged to (``profiling.compute.KINDS``):
    convolutions by their module (``op_kind``), a Linear layer on a 2-D value ``linear``,
    other matrix products and attention ``matmul`` (a GEMM over many rows, not a batch-1
    product), norms ``norm``, pooling ``pool``, everything else ``other``."""
    fk = node.meta.get("ew_flop_kind")
    if fk is None:
        k = node_kind(node)
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        ops = node.meta.get("ew_flop_ops") or {}
        top = max(ops, key=ops.get) if ops else None
        if k == "linear":
            fk = "linear"
        elif isinstance(mod, PerPixel):
            fk = {"linear": "matmul", "norm": "norm"}.get(mod.kind, "other")
        elif mod is not None and (k == "window" or isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))):
            fk = op_kind(mod)  # the profiler's kinds
        elif k == "window":
            fk = "conv" if node_window(gm, node).op == "conv" else "pool"
        elif top in _CONV_OPS:
            fk = "conv"
        elif top in _MATMUL_OPS:
            fk = "matmul"
        elif top in _NORM_OPS:
            fk = "norm"
        else:
            fk = "other"
        node.meta["ew_flop_kind"] = fk
    return str(fk)


def partial_work(gm: torch.fx.GraphModule, node: torch.fx.Node, n_rows: int, h: int) -> tuple[str, float]:
    """(kind, FLOPs) of a reducing node's partial sum over ``n_rows`` of the ``h`` rows it reduces.

    A linear reduction is a matmul with the matching weight columns (priced as ``linear``);
    sums and means are cheap adds (``other``).
    """
    red = node_reduce(node)
    if red is None or red.op != "linear":
        return "other", node_flops(gm, node) * n_rows / max(h, 1)
    # a folded pool (graph._pooled_map) changes the layer's in-features to the map's C * H * W
    src = node_shape(reduce_source(node)) or [1, 1, 1, 1]
    in_features = gm.get_submodule(str(node.target)).in_features
    scale = int(src[1]) * int(src[2]) * int(src[3]) / max(in_features, 1)
    return flop_kind(gm, node), node_flops(gm, node) * scale * n_rows / max(h, 1)


def _numel(shape: Sequence[int] | None) -> int:
    n = 1
    for v in shape or []:
        n *= int(v)
    return n


def node_flops(gm: torch.fx.GraphModule, node: torch.fx.Node) -> float:
    """FLOPs to compute the node's whole output (module docstring; cached in ``node.meta``)."""
    if "ew_flops" in node.meta:
        return float(node.meta["ew_flops"])
    shape = node_shape(node)
    kind = node_kind(node)
    flops = 0.0
    counted = node.meta.get("ew_flop_count")  # torch.utils.flop_counter, at capture
    if shape is not None and node.op not in ("placeholder", "output", "get_attr"):
        numel = _numel(shape)
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if kind == "window":
            w = node_window(gm, node)
            if w.op == "identity":
                flops = float(numel)
            elif w.op == "conv":
                assert mod is not None
                if counted is None:
                    counted = 2.0 * numel * (mod.in_channels // mod.groups) * w.kernel[0] * w.kernel[1]
                # EdgeLD's F = 2*H*W*(Cin*K^2 + 1)*Cout: the +1 (the bias add) only with a bias
                flops = float(counted) + (2.0 * numel if mod.bias is not None else 0.0)
            else:
                flops = float(numel * w.kernel[0] * w.kernel[1])
        elif kind == "linear" and mod is not None:
            flops = (float(counted) if counted else 2.0 * numel * mod.in_features) + (
                numel if mod.bias is not None else 0)
        elif counted:
            flops = float(counted)
        else:
            ins = [i for i in tensor_inputs(node) if node_shape(i) is not None]
            in_numel = sum(_numel(node_shape(i)) for i in ins)
            flops = float(max(numel, in_numel)) * elementwise_ops(gm, node)
    elif counted and node.op not in ("placeholder", "output", "get_attr"):
        flops = float(counted)  # a tuple-valued op (nn.MultiheadAttention returns output and weights)
    node.meta["ew_flops"] = flops
    return flops


def elementwise_ops(gm: torch.fx.GraphModule, node: torch.fx.Node) -> float:
    """Operations per element of an op ``torch.utils.flop_counter`` does not count
    (``profiling.flops.ELEMENTWISE_OPS``; 1 for anything not listed: copies, adds, ReLU)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, PerPixel):
            inner = [n for n in mod.body.graph.nodes if n.op in ("call_module", "call_function", "call_method")
                     and not (n.op == "call_method" and n.target == "permute")]
            return max((elementwise_ops(mod.body, n) for n in inner), default=1.0)
        return float(ELEMENTWISE_OPS.get(type(mod).__name__.lower(), 1.0))
    name = str(node.target) if node.op == "call_method" else str(getattr(node.target, "__name__", ""))
    return float(ELEMENTWISE_OPS.get(name.lower().rstrip("_"), 1.0))


def rows_of(shape: Sequence[int]) -> int:
    """Length of the split axis (rows of a 4-D map, features of a 2-D activation)."""
    if len(shape) == 4:
        return int(shape[2])
    return int(shape[1]) if len(shape) >= 2 else int(shape[0]) if shape else 1


def row_bytes(shape: Sequence[int] | None) -> int:
    """Bytes of one row (one unit of the split axis) of a value of this shape."""
    if not shape:
        return DTYPE_BYTES
    numel = 1
    for v in shape:
        numel *= int(v)
    return numel // max(rows_of(shape), 1) * DTYPE_BYTES


def wire_row_bytes(node: torch.fx.Node | None) -> float:
    """Bytes one row of ``node``'s value takes on the wire: raw bytes times the codec's ratio
    for the value's measured density (``graph.measure_density``; runtime/codec.py)."""
    if node is None:
        return float(DTYPE_BYTES)
    return row_bytes(node_shape(node)) * wire_ratio(node.meta.get("ew_density"))


Work = dict[str, tuple[float, int]]  # kind -> (FLOPs, calls)

WEIGHTS = "weights"  # a pseudo-kind: weight elements a call reads (``node_weights``), priced per element


def node_weights(gm: torch.fx.GraphModule, node: torch.fx.Node) -> float:
    """Weight elements one call of convolution ``node`` reads, whatever share of its output it
    computes: all its filters for a strip of two rows as for the whole map. Priced as work of
    kind ``weights`` (``DeviceProfile.per_kind["weights"]``, fitted by the profiler on thin
    strips of convolutions, over the conv line), it is what makes thin strips of wide layers cost
    more than their FLOPs say, and a channel slice (1/k of the filters) less. Linear layers: 0,
    their line is fitted on weights read from memory already (it would count them twice)."""
    if "ew_weights" not in node.meta:
        w = getattr(gm.get_submodule(str(node.target)), "weight", None) if node.op == "call_module" else None
        node.meta["ew_weights"] = float(w.numel()) if isinstance(w, torch.Tensor) and w.dim() >= 3 else 0.0
    return float(node.meta["ew_weights"])


def aggregate(items: Iterable[tuple[str, float]]) -> Work:
    """Sum ``(kind, flops)`` items per kind, counting the calls that do any work."""
    out: Work = {}
    for kind, flops in items:
        if flops <= 0:
            continue
        f, c = out.get(kind, (0.0, 0))
        out[kind] = (f + flops, c + 1)
    return out


def add_work(a: Work, b: Work) -> Work:
    out = dict(a)
    for kind, (f, c) in b.items():
        f0, c0 = out.get(kind, (0.0, 0))
        out[kind] = (f0 + f, c0 + c)
    return out


def compute_s(profile: DeviceProfile, work: Iterable[tuple[str, float]] | Work) -> float:
    """Seconds for some work: ``a * FLOPs + b`` per node call, per kind.

    ``work`` is a list of ``(kind, flops)`` items (one per node) or an aggregated ``Work``. The
    fixed ``b`` is a per-call overhead fitted on conv layers (EdgeLD); cheap "other" ops
    (activations, batch norm, pooling) pay it only when the profile has an explicit
    ``per_kind["other"]`` line, otherwise just ``a * FLOPs``. Charging per node keeps the
    prediction independent of how the nodes are grouped into stages.
    """
    agg = work if isinstance(work, dict) else aggregate(work)
    total = 0.0
    for kind, (flops, calls) in agg.items():
        if flops <= 0 or (kind == WEIGHTS and WEIGHTS not in profile.per_kind):
            continue  # weights read are priced only where the profile measured them (node_weights)
        a, b = line_for(profile, kind)
        total += a * flops + b * calls
    return total


def line_for(profile: DeviceProfile, kind: str) -> tuple[float, float]:
    """The ``(a, b)`` line that prices ``kind`` on ``profile``: its own, else the nearest kind
    the profile has (``profiling.compute.KIND_FALLBACK``: a profile measured before a kind
    existed), else the top-level line (with its per-call ``b`` only for convolutions and linear
    layers)."""
    k: str | None = kind
    while k is not None:
        if k in profile.per_kind:
            a, b = profile.per_kind[k]
            return float(a), float(b)
        k = KIND_FALLBACK.get(k)
    return profile.a, (profile.b if kind.startswith("conv") or kind in ("linear", "matmul") else 0.0)


def transfer_s(nbytes: float, src: DeviceProfile, dst: DeviceProfile) -> float:
    """Seconds to move ``nbytes`` from src to dst over their two links."""
    if nbytes <= 0:
        return 0.0
    bw = min(src.bandwidth_bps, dst.bandwidth_bps)
    return nbytes * 8.0 / bw + src.latency_s + dst.latency_s


def schedule_transfers(
    transfers: Sequence[tuple[int, int, float, bool]],
    devices: Sequence[DeviceProfile],
) -> tuple[dict[int, float], float]:
    """Event model of one stage's transfers ``(src, dst, nbytes, forwards_received)``.

    Returns each device's ready time (when its last incoming transfer ends) and the time the
    last transfer ends. ``forwards_received`` marks a transfer whose rows the sender received
    earlier in the same list (the leader re-sending gathered rows): it starts only after the
    sender's earlier receptions finished.
    """
    up: dict[int, float] = {}
    down: dict[int, float] = {}
    ready: dict[int, float] = {}
    end_all = 0.0
    for src, dst, nbytes, fwd in transfers:
        if nbytes <= 0 or src == dst:
            continue
        start = max(up.get(src, 0.0), down.get(dst, 0.0), ready.get(src, 0.0) if fwd else 0.0)
        end = start + transfer_s(nbytes, devices[src], devices[dst])
        # each link is held for the bytes at its own rate: a fast leader sending to followers
        # on slower links serves them side by side, each transfer lasting as long as its
        # slower end allows (the links are shaped separately, as on the testbed)
        up[src] = start + nbytes * 8.0 / devices[src].bandwidth_bps
        down[dst] = start + nbytes * 8.0 / devices[dst].bandwidth_bps
        ready[dst] = max(ready.get(dst, 0.0), end)
        end_all = max(end_all, end)
    return ready, end_all


def relay_bytes(moves: Iterable[tuple[int, int, Range]], needs: Mapping[int, Range], rb: int) -> dict[int, float]:
    """Per device, the bytes it moves for others in one stage's transfers ``(src, dst, rows)``:
    everything it sends, and what it receives but does not compute from (``needs[d]``: the
    input rows device d computes from; the leader gathering strips in gather mode).

    Their CPU time (``DeviceProfile.byte_s``) comes on top of the device's compute: measured
    on the bench, a 0.25-core leader that gathered and re-sent 12 MB per frame spent 65 ms more
    than a follower computing as much (8 MB: 49 ms; 44 MB: 320 ms), while the link model let
    it compute as if its CPU were free while its link carried the strips.
    """
    out: dict[int, float] = {}
    for src, dst, rows in moves:
        n = size(rows)
        if n <= 0 or src == dst:
            continue
        out[src] = out.get(src, 0.0) + n * rb
        kept = size(intersect(rows, needs.get(dst, EMPTY)))
        if n > kept:
            out[dst] = out.get(dst, 0.0) + (n - kept) * rb
    return out
