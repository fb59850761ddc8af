"""Folding eval-mode BatchNorm into the convolution before it, in a captured graph.

An eval-mode ``BatchNorm2d`` is a per-channel affine map, so ``bn(conv(x))`` is one convolution
with scaled weights and a shifted bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``): exact up
to float rounding, one memory-bound pass over every map less on every device and backend, and a
node fewer for the planner to cut. ``capture`` folds before it annotates the graph, so every
process that captures the same model plans and runs the same folded graph (node names are the
convolutions'; the BatchNorm nodes are gone).

Only what is certainly equivalent is folded: a BatchNorm in eval mode with running statistics,
reading nothing but the output of a plain ``Conv2d`` in eval mode that no other node reads,
called from one place in the graph. The model itself is never changed: the graph holds a new
convolution (a folded copy) where the model holds its convolution and BatchNorm.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from edgeweave.layout import MAP


def fold_batchnorm(gm: torch.fx.GraphModule) -> int:
    """Fold, in place, every eligible Conv2d -> BatchNorm2d pair of ``gm``; returns how many."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn, src = modules.get(str(node.target)), node.args[0]
        if type(bn) is not nn.BatchNorm2d or bn.training or not bn.track_running_stats or bn.running_mean is None:
            continue
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(str(src.target))
        if type(conv) is not nn.Conv2d or conv.training or calls[src.target] != 1:
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        if conv.weight.is_contiguous(memory_format=MAP):
            fused.weight.data = fused.weight.data.contiguous(memory_format=MAP)
        parent, _, attr = str(src.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)  # gm's own container
        modules[str(src.target)] = fused
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded
