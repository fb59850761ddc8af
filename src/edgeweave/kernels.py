"""Exact, faster stand-ins for torch ops that are slow on one CPU thread.

torch's NCHW max pooling on one thread runs ~8x slower than the same maxima taken as whole
tensor ops (a 2x2/2 pool of a 64x224x224 map: 19.8 ms against 2.3 ms on this project's
development host): max pooling is separable, so the window's maximum is the maximum over its
rows (elementwise maxima of whole rows, contiguous and vectorised) and then over the columns.
A maximum is exact in any order, so the result is bit-identical to ``F.max_pool2d`` (NaN
propagates as there). Every device runs these, so the planner's profile times them too
(``profiling.compute``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeweave.layout import is_map_layout


def pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """A size argument as (height, width), as torch's pooling and convolution read it."""
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _max_along(x: torch.Tensor, dim: int, k: int, s: int, d: int, n: int) -> torch.Tensor:
    """Maximum over windows of ``k`` elements (stride ``s``, dilation ``d``) along ``dim``: ``n`` out."""
    def tap(a: int) -> torch.Tensor:
        idx = [slice(None)] * x.dim()
        idx[dim] = slice(a * d, a * d + s * (n - 1) + 1, s)
        return x[tuple(idx)]

    if k == 1:
        return tap(0)
    out = torch.maximum(tap(0), tap(1))
    for a in range(2, k):
        torch.maximum(out, tap(a), out=out)
    return out


def max_pool2d(x: torch.Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
               ceil_mode: bool = False) -> torch.Tensor:
    """``F.max_pool2d`` (no indices), rows first then columns; ceil mode and channels-last maps
    go to torch (its NHWC pooling is vectorised over channels and faster still: 0.8 ms for the
    map above), keeping their layout; so does an export to ONNX (one MaxPool node for the
    backends' own kernels)."""
    if ceil_mode or x.dim() not in (3, 4) or is_map_layout(x) or torch.onnx.is_in_onnx_export():
        return F.max_pool2d(x, kernel_size, stride or kernel_size, padding, dilation, ceil_mode=ceil_mode)
    (kh, kw), (sh, sw) = pair(kernel_size), pair(stride or kernel_size)
    (ph, pw), (dh, dw) = pair(padding), pair(dilation)
    h, w = x.shape[-2] + 2 * ph, x.shape[-1] + 2 * pw
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0 or 2 * ph > kh or 2 * pw > kw:
        return F.max_pool2d(x, kernel_size, stride or kernel_size, padding, dilation)  # torch's error
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
    y = _max_along(_max_along(x, -2, kh, sh, dh, oh), -1, kw, sw, dw, ow)
    return y.contiguous()


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` computed by ``max_pool2d`` (the op every device runs; the profiler times it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.return_indices:
            return super().forward(x)
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
