"""Partitioners: how many rows (or output features) each device computes.

Every partitioner is a pure function ``(costs, total, capabilities=None) -> list[int]`` where
``costs[d](n)`` is the predicted seconds device ``d`` needs for ``n`` rows (communication
included, ``costs[d](0) == 0`` when a device may sit out) and the counts sum to ``total``. The
planner hands every partitioner the same monotone (non-decreasing) cost functions, so their
predictions compare fairly: ``max(costs[d](n_d))``, the stage's predicted finish.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

CostFn = Callable[[int], float]


def predicted_max(costs: Sequence[CostFn], counts: Sequence[int]) -> float:
    """The stage's predicted time under a split: the slowest device's finish."""
    return max((costs[d](n) for d, n in enumerate(counts)), default=0.0)


def _largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    s = float(sum(weights))
    if s <= 0:
        return _even(len(weights), total)
    raw = [w / s * total for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _even(k: int, total: int) -> list[int]:
    base, extra = divmod(total, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def equal(costs: Sequence[CostFn], total: int, capabilities: Sequence[float] | None = None) -> list[int]:
    """Same number of rows for every device (the first ones get the remainder)."""
    return _even(len(costs), total)


def _capabilities(costs: Sequence[CostFn], total: int, capabilities: Sequence[float] | None) -> list[float]:
    if capabilities is not None:
        return [float(c) for c in capabilities]
    # Without profiles: rows per second when a device does the whole job alone.
    return [total / max(c(total), 1e-30) for c in costs]


def bodp(costs: Sequence[CostFn], total: int, capabilities: Sequence[float] | None = None) -> list[int]:
    """MoDNN's BODP: strips proportional to capability ``c = 1/a`` (largest-remainder rounding).

    Capabilities come from the device profiles when given; otherwise they are estimated from the
    cost functions as rows per second for the whole job.
    """
    return _largest_remainder(_capabilities(costs, total, capabilities), total)


def ocbp(
    costs: Sequence[CostFn],
    total: int,
    capabilities: Sequence[float] | None = None,
    *,
    t_tolerate: float = 1e-3,
    w_step: int = 1,
    max_iter: int | None = None,
) -> list[int]:
    """EdgeLD's OCBP, as the report describes it.

    Start from the BODP split; repeatedly predict every device's time, move ``w_step`` rows
    (the report: W_step = 1) from the slowest device to the fastest one; stop when
    ``max - min < t_tolerate`` or when the slowest device is down to ``w_step`` rows (it cannot
    give any more without vanishing). The report does not give T_tolerate; 1 ms is our default.

    Two choices the report leaves open, written down here: only devices that BODP gave rows take
    part (a device BODP rounded to zero rows would otherwise always look "fastest" with time 0
    and be handed a row it is too slow for); and because one-row moves can oscillate between
    two splits forever when the row granularity is coarser than T_tolerate, the loop is capped
    at ``max_iter`` moves (default ``total * len(costs)``) and the best split seen is returned
    in that case.
    """
    k = len(costs)
    counts = bodp(costs, total, capabilities)
    if k <= 1 or total == 0:
        return counts
    limit = max_iter if max_iter is not None else total * k
    active = [d for d in range(k) if counts[d] > 0]
    if len(active) <= 1:
        return counts
    best, best_t = list(counts), predicted_max(costs, counts)
    for _ in range(limit):
        times = {d: costs[d](counts[d]) for d in active}
        slow = max(active, key=lambda d: (times[d], -d))
        fast = min(active, key=lambda d: (times[d], d))
        if times[slow] - times[fast] < t_tolerate or counts[slow] <= w_step or slow == fast:
            return counts
        counts[slow] -= w_step
        counts[fast] += w_step
        t = predicted_max(costs, counts)
        if t < best_t:
            best, best_t = list(counts), t
    return best


def optimal(costs: Sequence[CostFn], total: int, capabilities: Sequence[float] | None = None) -> list[int]:
    """The exact min-max integer split for monotone costs.

    The optimal finish time T* is one of the values ``costs[d](n)``; for a candidate T every
    device can take at most ``m_d(T) = max{n : cost_d(n) <= T}`` rows, and T is feasible iff
    ``sum m_d(T) >= total``. Feasibility is monotone in T, so a binary search over the sorted
    candidate values finds T*; surplus rows are then taken back from the devices whose current
    predicted time is highest (which never raises the maximum). Cost functions are made
    monotone first (prefix maximum), so the result is exact for any non-decreasing cost model
    and therefore never predicts worse than ``ocbp``, ``bodp`` or ``equal``.
    """
    k = len(costs)
    if k == 0:
        raise ValueError("no devices")
    tables: list[list[float]] = []
    for c in costs:
        row, m = [], float("-inf")
        for n in range(total + 1):
            m = max(m, float(c(n)))
            row.append(m)
        tables.append(row)
    values = sorted({v for row in tables for v in row})

    def max_rows(d: int, t: float) -> int:
        row = tables[d]
        lo, hi = -1, total  # row[lo] <= t (or lo == -1); find the largest index with row <= t
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if row[mid] <= t:
                lo = mid
            else:
                hi = mid - 1
        return max(lo, 0) if lo >= 0 else -1

    def feasible(t: float) -> list[int] | None:
        m = [max_rows(d, t) for d in range(k)]
        if any(x < 0 for x in m) or sum(m) < total:
            return None
        return m

    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(values[mid]) is not None:
            hi = mid
        else:
            lo = mid + 1
    counts = feasible(values[lo])
    assert counts is not None
    surplus = sum(counts) - total
    while surplus > 0:
        d = max((d for d in range(k) if counts[d] > 0), key=lambda d: (tables[d][counts[d]], d))
        take = 1
        counts[d] -= take
        surplus -= take
    return counts


PARTITIONERS: dict[str, Callable[..., list[int]]] = {
    "equal": equal,
    "bodp": bodp,
    "ocbp": ocbp,
    "optimal": optimal,
}
