"""A Linear layer's columns for a share of the map it reads flattened (VGG's fc1 on 512 x 7 x 7).

A device that holds rows ``[r0, r1)`` of the map (a ``reduce`` stage's partial sum) multiplies
them by those rows' columns of the layer, in the order of a channels-last strip (h, w, c:
``row_columns``); a device that holds channels ``[c0, c1)`` (after a block split by channels) by
those channels' columns in (c, h, w) order (``channel_columns``). Where the layer reads the map
through an adaptive average pool (``graph._pooled_map``), the columns are first carried back
through it, so that they apply to the ``h x w`` map itself: ``W_map[o, c] = P_h^T W[o, c] P_w``.

Each device copies only its share, once, and keeps it: VGG16's fc1 is 392 MB at 224 px, and a
reordered copy of the whole layer on every device made it resident five times on five devices
(a follower on a 1 GB board ran out of memory). A device serving plans whose rows differ keeps
each share until together they would outweigh the layer; then it reorders the whole layer once
and every row range is a view of it (cutting the shares again whenever they fell out of a
bounded cache cost a benchmark interleaving 16 plans +0.35 s per frame at 0.25 core).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from edgeweave.planning.graph import pool_matrix
from edgeweave.planning.halo import Range

_UNPOOL_CHUNK = 256  # output features per step when carrying a weight back through a pool (bounds memory)
_KEPT_MAX = 32  # columns kept per process (a few layers' shares for a few plans)
_KEPT: OrderedDict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = OrderedDict()  # key -> (weight, version, columns)


def _columns(weight: torch.Tensor, c: int, h: int, w: int, pool: tuple[int, int] | None, rows: Range,
             chans: Range, rows_first: bool) -> torch.Tensor:
    """Columns of map rows ``rows`` and channels ``chans``, ``[out, k]``: in (h, w, c) order with
    ``rows_first``, else (c, h, w). A copy of that share only (the layer itself where it is all
    of it, in its own order)."""
    out = weight.shape[0]
    (r0, r1), (c0, c1) = rows, chans
    if pool is None:
        w4 = weight.view(out, c, h, w)[:, c0:c1, r0:r1]
        return (w4.permute(0, 2, 3, 1) if rows_first else w4).reshape(out, -1).contiguous()
    # The pooling's adjoint as two small matrices: torch.func.vjp of adaptive_avg_pool2d gives the
    # same weight but took 4.5 s for VGG16's fc1 at 200 px against 1.2 s (one core).
    ph = pool_matrix(pool[0], h).to(weight.dtype)[:, r0:r1]
    pw = pool_matrix(pool[1], w).to(weight.dtype)
    w4 = weight.view(out, c, pool[0], pool[1])[:, c0:c1]
    spec, shape = (("ocij,ir,jq->orqc", (out, r1 - r0, w, c1 - c0)) if rows_first
                   else ("ocij,ir,jq->ocrq", (out, c1 - c0, r1 - r0, w)))
    res = weight.new_empty(shape)
    for a in range(0, out, _UNPOOL_CHUNK):
        res[a:a + _UNPOOL_CHUNK] = torch.einsum(spec, w4[a:a + _UNPOOL_CHUNK], ph, pw)
    return res.view(out, -1)


def _valid(hit: Any, weight: torch.Tensor) -> bool:
    return hit is not None and hit[0] is weight and hit[1] == weight._version  # a changed weight is cut again


def _kept(key: tuple, weight: torch.Tensor, make: Any) -> torch.Tensor:
    hit = _KEPT.get(key)
    if _valid(hit, weight):
        _KEPT.move_to_end(key)
        return hit[2]
    cols = make()
    _KEPT[key] = (weight, weight._version, cols)
    _KEPT.move_to_end(key)
    while len(_KEPT) > _KEPT_MAX:
        _KEPT.popitem(last=False)
    return cols


def row_columns(weight: torch.Tensor, c: int, h: int, w: int, pool: tuple[int, int] | None,
                rows: Range) -> torch.Tensor:
    """The columns map rows ``rows`` meet, in (h, w, c) order: what a channels-last strip of
    those rows, flattened, is multiplied by (module docstring)."""
    layer = (id(weight), c, h, w, pool)
    per_row = w * c
    full = _KEPT.get((*layer, "full"))
    if _valid(full, weight):
        _KEPT.move_to_end((*layer, "full"))
        return full[2][:, rows[0] * per_row:rows[1] * per_row]
    key = (*layer, "rows", rows)
    if not _valid(_KEPT.get(key), weight):
        shares = [k for k in _KEPT if k[:5] == layer and k[5] == "rows" and _valid(_KEPT[k], weight)]
        if sum(k[6][1] - k[6][0] for k in shares) + rows[1] - rows[0] > h:  # they would outweigh the layer
            for k in shares:
                del _KEPT[k]
            cols = _kept((*layer, "full"), weight, lambda: _columns(weight, c, h, w, pool, (0, h), (0, c), True))
            return cols[:, rows[0] * per_row:rows[1] * per_row]
    return _kept(key, weight, lambda: _columns(weight, c, h, w, pool, rows, (0, c), True))


def channel_columns(weight: torch.Tensor, c: int, h: int, w: int, pool: tuple[int, int] | None,
                    chans: Range) -> torch.Tensor:
    """The columns channels ``chans`` meet, in the order of those channels flattened (c, h, w)."""
    return _kept((id(weight), c, h, w, pool, "chans", chans), weight,
                 lambda: _columns(weight, c, h, w, pool, (0, h), chans, False))


def kept_bytes() -> int:
    """Bytes of columns this process holds (tests and memory reports)."""
    return sum(v[2].numel() * v[2].element_size() for v in _KEPT.values())
