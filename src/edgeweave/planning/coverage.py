"""How much of a plan's work is split across devices, and what runs whole on the leader and why.

``split_report(gm, plan)`` is what ``edgeweave plan`` and ``edgeweave run`` print and put in their
JSON: ``split_flops_fraction`` (the share of the model's FLOPs, as ``planning.cost.node_flops``
counts them, computed in stages where at least two devices compute), ``unsplit_nodes`` (every
node with FLOPs that one device computes, largest first, with the reason) and ``transformer``
(attention left on the leader). A plan that splits less than half of the work is worth a
warning: the cluster then mostly waits for its leader.

Reasons come from the graph: a node the planner cannot cut into strips says what it is (an
attention, a reshape that moves rows, a layer on a token sequence, ...); a node it could cut
but did not says why the planner kept it whole (predicted faster on one device, or in a
segment with ops that must run whole).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from edgeweave.planning.cost import node_flops
from edgeweave.planning.graph import is_folded, node_kind, node_shape
from edgeweave.planning.halo import is_empty
from edgeweave.planning.plan import Plan, Stage

WARN_BELOW = 0.5

ATTENTION = ("attention: every position reads every other; transformers run on the leader until a split of "
             "their linear layers by output features / attention heads exists")
TRANSFORMER_NOTE = ("transformer: its attention and the layers around it run on the leader (strips of rows "
                    "cannot split attention; a channel split of its linear layers does not exist yet)")

_SOFTMAX: set[Any] = {F.softmax, torch.softmax, F.log_softmax}
_LAYOUT_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "chunk", "split", "narrow",
                   "expand", "squeeze", "unsqueeze", "__getitem__", "roll", "pad"}
_LAYOUT_FUNCTIONS: set[Any] = {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.chunk,
                               torch.split, torch.narrow, torch.squeeze, torch.unsqueeze, torch.roll, F.pad,
                               operator.getitem, torch.cat, torch.stack}


def _name(target: Any) -> str:
    return str(getattr(target, "__name__", target))


def is_attention(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """An attention op: ``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``, a
    function named ``*attention`` (torchvision's Swin), or a softmax (MaxViT's own attention)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (nn.MultiheadAttention, nn.Softmax))
    if node.op == "call_function":
        return (node.target is F.scaled_dot_product_attention or node.target in _SOFTMAX
                or _name(node.target).endswith("attention"))
    return node.op == "call_method" and node.target == "softmax"


def why_global(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """Why the graph cannot cut ``node`` into strips of rows (its kind is ``global``)."""
    if is_attention(gm, node):
        return ATTENTION
    shape = node_shape(node) or []
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        name = type(mod).__name__
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            return f"{name} in training mode (batch statistics)"
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training:
            return f"{name} in training mode (random)"
        if isinstance(mod, nn.Linear):
            return (f"Linear on a {len(shape)}-D value (token sequence): split by output features exists for "
                    "2-D values only")
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            return f"{name} normalises over more than the channels of one pixel"
        if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return f"{name} to another size (windows that depend on the map's size)"
        if isinstance(mod, nn.Flatten):
            return "flatten: rows become features"
        return f"{name}: not known to keep rows apart"
    if node.op in ("call_function", "call_method"):
        name = str(node.target) if node.op == "call_method" else _name(node.target)
        layout = (node.op == "call_method" and node.target in _LAYOUT_METHODS) or (
            node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS)
        if layout:
            return f"{name}: moves or reshapes values across rows"
        if name in ("matmul", "bmm", "einsum", "baddbmm", "linear"):
            return f"{name}: a product over tokens or rows"
        if len(shape) != 4:
            return f"{name} on a {len(shape)}-D value (not a feature map)"
        return f"{name}: not known to keep rows apart"
    return f"{node.op}: not known to keep rows apart"


def devices_computing(stage: Stage) -> int:
    """How many devices compute part of ``stage`` (partial sums of a reduce stage included)."""
    if stage.kind == "leader":
        return 1
    who = {a.device for a in stage.assignments if not is_empty(a.out_rows)}
    for red in stage.reductions:
        who |= {d for d, r in red.rows if not is_empty(r)}
    return len(who)


def _segment_kinds(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Node name -> kind of the atomic segment it belongs to (``fusion.atomic_segments``)."""
    from edgeweave.planning.fusion import atomic_segments, is_reduce_segment

    try:
        segs = gm.meta.get("ew_segments") or atomic_segments(gm)
    except ValueError:
        return {}
    out = {}
    for seg in segs:
        kind = "reduce" if is_reduce_segment(seg) else seg.kind
        for n in seg.nodes:
            out[n.name] = kind
    return out


def split_report(gm: torch.fx.GraphModule, plan: Plan) -> dict[str, Any]:
    """``split_flops_fraction``, ``unsplit_nodes`` and ``transformer`` of ``plan`` (module
    docstring); ``gm`` is the captured graph the plan was made from."""
    by = {n.name: n for n in gm.graph.nodes}
    split_nodes: set[str] = set()
    for st in plan.stages:
        if devices_computing(st) >= 2:
            split_nodes.update(st.nodes)
    seg_kind: dict[str, str] | None = None
    total = split = 0.0
    unsplit: list[dict[str, Any]] = []
    transformer = False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        f = node_flops(gm, node)
        total += f
        if node.name in split_nodes:
            split += f
            continue
        if f <= 0:
            continue
        kind = node_kind(node)
        if kind == "global" and not is_folded(node) and node.meta.get("ew_reduce") is None:
            why = why_global(gm, node)
            transformer = transformer or why == ATTENTION
        elif plan.meta.get("leader_only"):
            why = ("splittable; the planner predicts the whole model faster on the leader alone (a small input, "
                   "slow links or few FLOPs per row)")
        else:
            if seg_kind is None:
                seg_kind = _segment_kinds(gm)
            if seg_kind.get(node.name, "leader") == "leader":
                why = "splittable, but in a segment with ops that must run whole on the leader"
            else:
                why = "splittable; the planner predicts this block faster on one device than split"
        unsplit.append({"node": node.name, "flops": f, "why": why})
    unsplit.sort(key=lambda u: -u["flops"])
    frac = split / total if total > 0 else 1.0
    return {"split_flops_fraction": frac, "unsplit_nodes": unsplit, "transformer": transformer}


def report_lines(rep: dict[str, Any], top: int = 3) -> list[str]:
    """Human-readable lines for a report: the fraction, a warning below one half, the largest
    unsplit nodes with their reasons, and the transformer note."""
    frac = float(rep["split_flops_fraction"])
    lines = [f"split across devices: {100 * frac:.1f} % of the FLOPs"]
    if frac < WARN_BELOW:
        lines[0] = f"[yellow]warning:[/yellow] only {100 * frac:.1f} % of the FLOPs are split across devices"
    if rep.get("transformer"):
        lines.append(TRANSFORMER_NOTE)
    nodes = rep.get("unsplit_nodes") or []
    total_unsplit = sum(u["flops"] for u in nodes)
    if nodes and frac < 0.999:
        lines.append(f"on one device ({len(nodes)} nodes, {total_unsplit / 1e9:.3g} GFLOPs), largest first:")
        for u in nodes[:top]:
            lines.append(f"  {u['node']}: {u['why']}")
    return lines
