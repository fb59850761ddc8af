"""Compact architecture transform (EdgeDI, ALGORITHMS.md section 3).

Every dense 3x3 ``nn.Conv2d`` of a model is swapped for a ``CompactConv`` (1x1 reduce -> 3x3 ->
channel attention -> 1x1 expand -> ReLU -> BatchNorm, see ``edgeweave.models.compact_blocks``)
that keeps the conv's input/output channels, stride, padding and dilation, so the rest of the
model (BN, pooling, residual adds, classifier) fits around it unchanged. Other convolutions
(7x7 stems, 1x1 projections, grouped / depthwise convs) are kept: the paper rewrites 3x3 ones.

The new blocks start from random initialisation (a trained 3x3 kernel has no exact compact
equivalent); layers that were not replaced keep their weights. Train the result with the shared
loop (``edgeweave train --model compact_<base>``) or from the checkpoint ``compress compact``
writes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch.nn as nn

from edgeweave.models.compact_blocks import CompactConv


@dataclass
class CompactResult:
    model: nn.Module
    replaced: list[str] = field(default_factory=list)  # qualified names of the swapped convs
    kept: list[str] = field(default_factory=list)  # 3x3 convs left alone (skip_costlier)


def _is_dense_3x3(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3) and m.groups == 1


def compact_cost_per_pixel(cin: int, cout: int, ratio: int) -> tuple[int, int]:
    """Multiply-accumulates per output pixel of (original 3x3, compact block), stride ignored."""
    mid = max(1, cout // ratio)
    return 9 * cin * cout, cin * mid + 9 * mid * mid + mid * cout


def compact_model(
    model: nn.Module, ratio: int = 8, *, skip_costlier: bool = False, inplace: bool = False
) -> CompactResult:
    """Replace each dense 3x3 conv of ``model`` by an EdgeDI ``CompactConv`` block.

    ``skip_costlier`` keeps a conv whose compact form would cost more multiply-accumulates than
    the conv itself (a 1-channel stem, say); the default follows the paper and replaces all.
    The result is deterministic in (architecture, ratio, skip_costlier), which is what lets the
    registry name ``compact`` rebuild it from a checkpoint.
    """
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if not inplace:
        model = copy.deepcopy(model)
    result = CompactResult(model)
    # Collect first: mutating while iterating named_modules would revisit the new blocks.
    # Convs inside existing CompactConv blocks are already compact: compacting twice is a no-op.
    inner = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, CompactConv) for c, _ in m.named_children()}
    targets = [(name, m) for name, m in model.named_modules() if _is_dense_3x3(m) and name not in inner]
    for name, conv in targets:
        if skip_costlier:
            orig, new = compact_cost_per_pixel(conv.in_channels, conv.out_channels, ratio)
            if new >= orig:
                result.kept.append(name)
                continue
        block = CompactConv(
            conv.in_channels,
            conv.out_channels,
            ratio=ratio,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
        )
        block.to(device=conv.weight.device, dtype=conv.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, block)
        result.replaced.append(name)
    return result
