"""A whole plan executed in one process: every device in turn, moving exactly the rows the
plan's transfers say, so tests prove a plan exact and executable without processes or sockets.

Each device runs what ``engine.prepare`` compiled for it, on the backend asked for; at every
reduction all devices run in lockstep and the partials are added in the plan's order, so the
result is bit-identical to the runtime's exchange of partial sums.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.fx

from edgeweave.engine.program import prepare
from edgeweave.engine.reduce import Program, sum_partials
from edgeweave.planning.halo import Range, is_empty
from edgeweave.planning.plan import Plan, Stage

Pieces = list[tuple[int, int, Any]]


def extract(pieces: Pieces, rows: Range, axis: int, who: str = "device") -> torch.Tensor:
    """Assemble ``rows`` along ``axis`` from held pieces ``(lo, hi, tensor)``; fail if not held."""
    lo, hi = rows
    parts: list[torch.Tensor] = []
    cur = lo
    while cur < hi:
        for plo, phi, t in sorted(pieces, key=lambda p: (p[0], -p[1])):
            if plo <= cur < phi:
                stop = min(hi, phi)
                parts.append(t.narrow(axis, cur - plo, stop - cur))
                cur = stop
                break
        else:
            held = sorted((p[0], p[1]) for p in pieces)
            raise AssertionError(f"{who} does not hold rows [{cur},{hi}) of [{lo},{hi}); it holds {held}")
    if not parts:
        raise AssertionError(f"{who}: empty range {rows} requested")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


@torch.no_grad()
def simulate(gm: torch.fx.GraphModule, plan: Plan, x: torch.Tensor, backend: str | None = None,
             clock: dict[int, float] | None = None) -> Any:
    """Execute ``plan`` in-process and return the model output as the leader assembles it.

    Every device computes on ``backend`` (default: what the plan chose for it, else torch);
    ``clock``, when given, gets each device's seconds of computing added (``bench kernels``: the
    work a plan gives the devices, without the transfers).

    Devices are visited in turn; before each stage its transfers run in list order, each
    asserting that the sender holds the rows it sends (its own output strip, or rows it received
    earlier in the list), exactly as the plan.py docstring defines execution. A value a device
    holds is dropped after the stage that consumes it, so nothing is silently reused.
    """
    holdings: dict[int, Pieces] = {0: [(0, int(x.shape[plan.in_axis(0)]), x)]}
    devices = {a.device for st in plan.stages for a in st.assignments} | {0}
    compiled = {d: prepare(gm, plan, d, backend) for d in sorted(devices)}
    for s, stage in enumerate(plan.stages):
        axis = plan.in_axis(s)
        hold: dict[int, Pieces] = {d: list(p) for d, p in holdings.items()}
        for t in stage.transfers:
            piece = extract(hold.get(t.src, []), t.rows, axis, f"stage {stage.index}: device {t.src}")
            hold.setdefault(t.dst, []).append((t.rows[0], t.rows[1], piece.clone()))
        new: dict[int, Pieces] = {}
        programs: dict[int, Program] = {}
        if stage.kind == "reduce":
            for a in stage.assignments:
                if a.device == 0 or not is_empty(a.in_rows):
                    xin = None if is_empty(a.in_rows) else extract(hold.get(a.device, []), a.in_rows, axis,
                                                                   f"stage {stage.index}: device {a.device}")
                    programs[a.device] = _program(compiled[a.device], s, xin)
        else:
            for a in stage.assignments:
                if is_empty(a.out_rows):
                    continue
                xin = extract(hold.get(a.device, []), a.in_rows, axis, f"stage {stage.index}: device {a.device}")
                programs[a.device] = _program(compiled[a.device], s, xin)
        for d, y in _lockstep(stage, programs, clock).items():
            if y is None:
                continue
            a = stage.assignment(d)
            assert a is not None
            if isinstance(y, torch.Tensor):
                out_axis = stage.out_axis
                if y.shape[out_axis] != a.out_rows[1] - a.out_rows[0]:
                    raise AssertionError(f"stage {stage.index}: device {a.device} returned {y.shape[out_axis]} rows for {a.out_rows}")
            new[a.device] = [(a.out_rows[0], a.out_rows[1], y)]
        holdings = new
    last = plan.stages[-1]
    if len(holdings.get(0, [])) == 1 and not isinstance(holdings[0][0][2], torch.Tensor):
        return holdings[0][0][2]
    axis = plan.out_axis
    for t in plan.final_transfers:
        piece = extract(holdings.get(t.src, []), t.rows, axis, f"final: device {t.src}")
        holdings.setdefault(t.dst, []).append((t.rows[0], t.rows[1], piece.clone()))
    return extract(holdings.get(0, []), (0, int(last.output_shape[axis])), axis, "final: leader")


def _lockstep(stage: Stage, programs: dict[int, Program], clock: dict[int, float] | None = None) -> dict[int, Any]:
    """Run every device's stage program; at each reduction add the partials in plan order.

    Every program must reach the same reduction next (they run the same nodes), so this is the
    in-process equivalent of the runtime's "partials to the leader, total back" exchange.
    """
    results: dict[int, Any] = {}
    msgs: dict[int, tuple[int, torch.Tensor | None]] = {}

    def step(d: int, value: torch.Tensor | None, first: bool) -> None:
        t0 = time.perf_counter()
        try:
            msgs[d] = next(programs[d]) if first else programs[d].send(value)
        except StopIteration as stop:
            results[d] = stop.value
        if clock is not None:
            clock[d] = clock.get(d, 0.0) + time.perf_counter() - t0

    for d in sorted(programs):
        step(d, None, True)
    while msgs:
        idx = {i for i, _ in msgs.values()}
        if len(idx) != 1:
            raise AssertionError(f"stage {stage.index}: devices reached different reductions {sorted(idx)}")
        (i,) = idx
        red = stage.reductions[i]
        parts = {d: p for d, (_, p) in msgs.items() if p is not None}
        extra = set(parts) - {d for d, r in red.rows if not is_empty(r)}
        if extra:
            raise AssertionError(f"stage {stage.index}: devices {sorted(extra)} sent partial sums they do not own")
        total = sum_partials(red, parts)
        pending = dict(msgs)
        msgs.clear()
        for d in sorted(pending):
            answer = total.clone() if stage.kind != "reduce" or d == 0 else None
            step(d, answer, False)
    return results


def _program(dev: Any, s: int, x: torch.Tensor | None) -> Program:
    prog = dev.stages[s]
    if prog is None:
        raise ValueError(f"device {dev.device} has no work in stage {s}")
    return prog.program(dev.gm, x)
