"""A window op (convolution, pooling) on a strip of rows, exactly as on the whole map.

``planning.halo.window_in_rows`` says which input rows and how much explicit padding a strip's
output rows need; ``apply_window`` runs the op on them with H-padding 0 and the explicit padding
(zeros for convolution and average pooling, -inf for max pooling, which is what max pooling's
own padding means), keeping the op's own W padding: padding only at the true top and bottom of
the map, never at a cut. ``fewer_copies`` moves the window where that gives the same rows with
less copying; ``StripWindow`` is the op with its padding fixed, as a module a strip's generated
graph calls (engine/lower.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeweave.kernels import max_pool2d
from edgeweave.planning.graph import Window


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


def apply_window(mod: torch.nn.Module | None, w: Window, t: torch.Tensor, pad_top: int, pad_bottom: int) -> torch.Tensor:
    """Run window op ``w`` on real rows ``t`` with explicit H padding and H-padding 0.

    Padding is zeros for conv / avg pool and -inf for max pool (max pooling's own padding);
    W keeps the op's padding. A convolution takes its weights (and groups) from ``mod``; a
    pooling op is described by ``w`` alone (``mod`` may be None: ``F.max_pool2d``/
    ``F.avg_pool2d`` calls have no module).
    """
    if pad_top == pad_bottom and t.shape[2] and (w.op == "conv" or (w.op == "max" and not w.ceil_mode)):
        # the whole map (or no border): the op's own padding is the same, without a padded copy
        pad = (pad_top, w.pad_w)
        if w.op == "conv":
            assert mod is not None
            return F.conv2d(t, mod.weight, mod.bias, (w.s, mod.stride[1]), pad, (w.d, mod.dilation[1]), mod.groups)
        return max_pool2d(t, w.kernel, w.stride, pad, w.dilation)
    if pad_top or pad_bottom:
        t = F.pad(t, (0, 0, pad_top, pad_bottom), value=float("-inf") if w.op == "max" else 0.0)
    if w.op == "identity":
        return t
    if w.op == "conv":
        assert mod is not None
        return F.conv2d(t, mod.weight, mod.bias, (w.s, mod.stride[1]), (0, w.pad_w), (w.d, mod.dilation[1]), mod.groups)
    if w.op == "max":
        return max_pool2d(t, w.kernel, w.stride, (0, w.pad_w), w.dilation, ceil_mode=w.ceil_mode)
    return F.avg_pool2d(t, w.kernel, w.stride, (0, w.pad_w), w.ceil_mode, w.count_include_pad, w.divisor_override)


class StripWindow(torch.nn.Module):
    """Window op ``w`` on a strip with fixed explicit padding (``apply_window``); it shares the
    convolution's weights (``op``: its module; None for a pooling call without one). What the
    lowered graph of a strip calls, and what an exporter traces."""

    def __init__(self, op: torch.nn.Module | None, w: Window, pad_top: int, pad_bottom: int) -> None:
        super().__init__()
        self.op, self.w, self.pad_top, self.pad_bottom = op, w, pad_top, pad_bottom

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return apply_window(self.op, self.w, t, self.pad_top, self.pad_bottom)
