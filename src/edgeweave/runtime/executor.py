"""Execute a Plan on one device: transfers in list order, then compute (planning/plan.py).

The same function runs on the leader and on every follower; leader-gather and halo-exchange
plans differ only in their transfer lists, so nothing here knows which one it runs. Sends are
posted without waiting (and waited for at the end, keeping their tensors alive); a receive is
waited for only when its rows are needed, either to forward them or to compute. A valid plan
therefore never deadlocks, because waits follow the plan's own data dependencies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from edgeweave.engine.program import DeviceProgram
from edgeweave.engine.reduce import partial_shape, sum_partials
from edgeweave.errors import EdgeweaveError
from edgeweave.layout import dense
from edgeweave.planning.plan import Plan, Stage, Transfer
from edgeweave.runtime import codec
from edgeweave.runtime.wire import TAG_STRIDE, Channel, transfer_tag


def _empty(n: int) -> bool:
    return n <= 0


@dataclass
class _Piece:
    start: int
    stop: int
    tensor: torch.Tensor
    work: Any = None  # pending receive, or None when the rows are here
    src: int = -1
    what: str = ""
    shape: list[int] | None = None  # while ``tensor`` holds the coded message (runtime/codec.py)


@dataclass
class Holdings:
    """The rows of one tensor (along ``axis``) that this device holds or is receiving."""

    axis: int
    shape: list[int]
    pieces: list[_Piece] = field(default_factory=list)
    wait_s: float = 0.0  # time spent waiting for receives

    def add(self, start: int, stop: int, t: torch.Tensor) -> None:
        if t.shape[self.axis] != stop - start:
            raise EdgeweaveError(f"internal: piece [{start},{stop}) has {t.shape[self.axis]} rows")
        self.pieces.append(_Piece(start, stop, t))

    def receive(self, start: int, stop: int, ch: Channel, src: int, tag: int, what: str) -> None:
        """Post the receive of rows ``[start, stop)`` from ``src``, coded (runtime/codec.py)."""
        shape = list(self.shape)
        shape[self.axis] = stop - start
        buf = torch.empty(codec.max_bytes(math.prod(shape)), dtype=torch.uint8)
        self.pieces.append(_Piece(start, stop, buf, ch.irecv(buf, src, tag), src, what, shape))

    def _arrived(self, p: _Piece, ch: Channel | None) -> None:
        if p.work is not None:
            assert ch is not None
            t0 = time.perf_counter()
            ch.wait(p.work, p.src, f"receiving {p.what}")
            self.wait_s += time.perf_counter() - t0
            p.work = None

    def _ready(self, p: _Piece, ch: Channel | None) -> torch.Tensor:
        self._arrived(p, ch)
        if p.shape is not None:
            p.tensor = codec.decode(p.tensor, p.shape, f"{ch.who(p.src) if ch else '?'} ({p.what})")
            p.shape = None
        return p.tensor

    def take(self, rows: tuple[int, int], ch: Channel | None, who: str) -> torch.Tensor:
        """Rows ``[start, stop)`` assembled from the pieces, waiting for receives they need."""
        start, stop = rows
        parts: list[torch.Tensor] = []
        pos = start
        while pos < stop:
            cands = [p for p in self.pieces if p.start <= pos < p.stop]
            if not cands:
                held = sorted((p.start, p.stop) for p in self.pieces)
                raise EdgeweaveError(f"invalid plan: {who} needs rows [{start},{stop}) but holds only {held}")
            # prefer rows already here, then the piece that reaches furthest
            p = max(cands, key=lambda c: (c.work is None, c.stop))
            end = min(p.stop, stop)
            parts.append(self._ready(p, ch).narrow(self.axis, pos - p.start, end - pos))
            pos = end
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=self.axis)

    def drain(self, ch: Channel | None) -> None:
        """Wait for every receive still pending (rows the plan delivered but nobody used)."""
        for p in self.pieces:
            self._arrived(p, ch)


@dataclass
class StageTiming:
    wall_s: float
    compute_s: float
    # This device's clock (time.perf_counter) when the stage began and when its compute began
    # (its inputs in hand; 0 when it computed nothing): what a timeline of the inference needs
    # (runtime/timeline.py). Clocks are comparable only between processes of one host.
    begin: float = 0.0
    ready: float = 0.0
    # CPU seconds of this device's process (all its threads: gloo's sockets too) over the stage,
    # and over its compute: the difference is what the runtime itself costs the device
    cpu_s: float = 0.0
    compute_cpu_s: float = 0.0

    @property
    def comm_s(self) -> float:
        return max(0.0, self.wall_s - self.compute_s)

    @property
    def runtime_cpu_s(self) -> float:
        return max(0.0, self.cpu_s - self.compute_cpu_s)


FIELDS = len(StageTiming.__dataclass_fields__)  # numbers per stage a follower reports


def _run(prog: DeviceProgram, s: int, xin: torch.Tensor | None, rfn: Any, waited: list[float]
         ) -> tuple[Any, float, float, float]:
    """Stage ``s``'s compute: (its result, when it began, its seconds without waits, its CPU seconds)."""
    c0, p0 = time.perf_counter(), time.process_time()
    y = prog.run(s, xin, rfn)
    return y, c0, time.perf_counter() - c0 - waited[0], time.process_time() - p0


def _transfers(hold: Holdings, transfers: list[Transfer], stage_idx: int, device: int, ch: Channel | None,
               label: str) -> None:
    for i, tr in enumerate(transfers):
        a, b = tr.rows
        if _empty(b - a) or tr.src == tr.dst or device not in (tr.src, tr.dst):
            continue
        if ch is None:
            raise EdgeweaveError(f"invalid plan: {label} moves rows between devices but there is no channel")
        tag = transfer_tag(stage_idx, i)
        what = f"rows [{a},{b}) of {label} (transfer {i})"
        if tr.src == device:
            ch.isend(codec.encode(hold.take((a, b), ch, f"device {device}")), tr.dst, tag, what)
        else:
            hold.receive(a, b, ch, tr.src, tag, what)


def _reduce_fn(stage: Stage, s: int, device: int, gm: Any, ch: Channel | None,
               waited: list[float]) -> Callable[..., Any]:
    """This device's side of the stage's reductions (plan.py), set up when the stage starts.

    In a ``reduce`` stage only the leader needs the total: partials go to it. In any other
    stage every device with work needs it, so each owner sends its partial straight to every
    other such device and each adds them itself: one message delay instead of two (to the
    leader and back), which under CPU quotas is a wake-up of a throttled process saved per
    channel-attention block. The receives are posted here, before the stage computes, one
    waiter thread per reduction, so partials that arrive while this device still computes are
    ready when it needs them. Everyone adds the partials in the order of ``reduction.rows``
    (``sum_partials``), so every device holds the same total, whichever message came first.
    Seconds spent waiting for messages are added to ``waited[0]`` so that they count as
    communication, not compute (a device that waits for a slower one must not look slow).
    """
    if len(stage.transfers) > TAG_STRIDE - len(stage.reductions):
        raise EdgeweaveError(f"stage {s} has too many transfers and reductions for the runtime's tags")
    receivers = [0] if stage.kind == "reduce" else [a.device for a in stage.assignments if a.out_rows[1] > a.out_rows[0]]

    def tag(i: int) -> int:
        return transfer_tag(s, TAG_STRIDE - 1 - i)

    def channel() -> Channel:
        if ch is None:
            raise EdgeweaveError(f"invalid plan: stage {s} reduces over devices but there is no channel")
        return ch

    posted: dict[int, tuple[list[int], list[torch.Tensor], Any]] = {}
    if device in receivers:
        for i, red in enumerate(stage.reductions):
            srcs = [d for d, rows in red.rows if rows[1] > rows[0] and d != device]
            if srcs:
                bufs = [torch.empty(partial_shape(gm, red)) for _ in srcs]
                posted[i] = (srcs, bufs, channel().irecv_all(list(zip(bufs, srcs)), tag(i)))

    def fn(i: int, part: torch.Tensor | None) -> torch.Tensor | None:
        red = stage.reductions[i]
        what = f"partial sum {red.node} of stage {s}"
        if part is not None:
            for d in receivers:
                if d != device:
                    channel().isend(part, d, tag(i), what)
        if device not in receivers:
            return None
        parts = {} if part is None else {device: part}
        if i in posted:
            srcs, bufs, ticket = posted.pop(i)
            t0 = time.perf_counter()
            try:
                channel().wait_all(ticket, srcs, what)
            finally:
                waited[0] += time.perf_counter() - t0
            parts.update(zip(srcs, bufs))
        return sum_partials(red, parts)

    return fn


def execute_plan(prog: DeviceProgram, x: torch.Tensor | None, ch: Channel | None
                 ) -> tuple[torch.Tensor | None, list[StageTiming]]:
    """Run ``prog.plan`` as device ``prog.device`` with what ``engine.prepare`` compiled for it;
    the leader (device 0) passes the input ``x``.

    Returns the model output on the leader (None elsewhere) and this device's timings, one per
    stage plus one for the final transfers. Sends are flushed before returning.
    """
    plan, device, gm = prog.plan, prog.device, prog.gm
    timings: list[StageTiming] = []
    shape0 = list(plan.input_shape)
    hold = Holdings(plan.in_axis(0), shape0)
    if device == 0:
        if x is None or list(x.shape) != shape0:
            got = None if x is None else list(x.shape)
            raise EdgeweaveError(f"the plan was made for input shape {shape0}, got {got}")
        hold.add(0, shape0[hold.axis], prog.feed(x))
    for s, stage in enumerate(plan.stages):
        t0, p0 = time.perf_counter(), time.process_time()
        if list(stage.input_shape) != hold.shape:
            raise EdgeweaveError(f"invalid plan: stage {s} input shape {stage.input_shape} != previous output {hold.shape}")
        label = f"stage {s} input"
        _transfers(hold, stage.transfers, s, device, ch, label)
        out_shape = list(stage.output_shape)
        nxt = Holdings(stage.out_axis, out_shape)
        compute = compute_cpu = c_start = 0.0
        a = stage.assignment(device)
        if stage.reductions:
            # Exact global sums (plan.py): this device sends its partial sums and, where it
            # needs the totals, adds everyone's; a device without a strip takes no part.
            waited = [0.0]
            rfn = _reduce_fn(stage, s, device, gm, ch, waited)
            holds = a is not None and not _empty(a.in_rows[1] - a.in_rows[0])
            if stage.kind == "reduce" and (holds or device == 0):
                xin = hold.take(a.in_rows, ch, f"device {device} in stage {s}") if holds and a else None
                y, c_start, compute, compute_cpu = _run(prog, s, xin, rfn, waited)
                if device == 0:
                    assert a is not None
                    nxt.add(a.out_rows[0], a.out_rows[1], dense(y))
                a = None  # handled
        else:
            rfn, waited = None, [0.0]
        if a is not None and not _empty(a.out_rows[1] - a.out_rows[0]):
            xin = hold.take(a.in_rows, ch, f"device {device} in stage {s}")
            y, c_start, compute, compute_cpu = _run(prog, s, xin, rfn, waited)
            if not isinstance(y, torch.Tensor):
                # a model returning a tuple (multi-exit): only the leader's last stage may
                if device != 0 or s != len(plan.stages) - 1 or plan.final_transfers:
                    raise EdgeweaveError(f"stage {s} on device {device} returned {type(y).__name__}, not a tensor; "
                                         "only the leader's last stage may return a structure")
                hold.drain(ch)
                if ch is not None:
                    ch.flush_sends()
                timings.append(StageTiming(time.perf_counter() - t0, compute, t0, c_start,
                                           time.process_time() - p0, compute_cpu))
                timings.append(StageTiming(0.0, 0.0))
                return y, timings
            want = list(out_shape)
            want[nxt.axis] = a.out_rows[1] - a.out_rows[0]
            if list(y.shape) != want:
                raise EdgeweaveError(f"stage {s} on device {device} produced shape {list(y.shape)}, plan says {want}")
            nxt.add(a.out_rows[0], a.out_rows[1], dense(y))
        hold.drain(ch)
        timings.append(StageTiming(time.perf_counter() - t0, compute, t0, c_start, time.process_time() - p0,
                                   compute_cpu))
        hold = nxt
    t0, p0 = time.perf_counter(), time.process_time()
    n = len(plan.stages)
    _transfers(hold, plan.final_transfers, n, device, ch, "the model output")
    out = None
    if device == 0:
        out = hold.take((0, hold.shape[hold.axis]), ch, "the leader (model output)")
    hold.drain(ch)
    if ch is not None:
        ch.flush_sends()
    timings.append(StageTiming(time.perf_counter() - t0, 0.0, t0, 0.0, time.process_time() - p0))
    return out, timings


def _covered(held: list[tuple[int, int]], rows: tuple[int, int]) -> bool:
    pos, stop = rows
    while pos < stop:
        nxt = max((b for a, b in held if a <= pos < b), default=None)
        if nxt is None:
            return False
        pos = nxt
    return True


def check_plan(plan: Plan) -> None:
    """Check, before anything runs, that every device holds each row it sends or computes from.

    A plan that breaks this would stall a generation mid-inference; here it is a clear error.
    """
    if not plan.stages:
        raise EdgeweaveError("invalid plan: no stages")
    n_dev = len(plan.devices)
    held: dict[int, list[tuple[int, int]]] = {0: [(0, plan.input_shape[plan.in_axis(0)])]}

    def run(transfers: list[Transfer], where: str) -> None:
        for i, tr in enumerate(transfers):
            if not (0 <= tr.src < n_dev and 0 <= tr.dst < n_dev):
                raise EdgeweaveError(f"invalid plan: {where} transfer {i} names device {tr.src}->{tr.dst}; "
                                     f"the plan has {n_dev}")
            if tr.rows[1] <= tr.rows[0] or tr.src == tr.dst:
                continue
            if not _covered(held.get(tr.src, []), tr.rows):
                raise EdgeweaveError(f"invalid plan: {where} transfer {i} sends rows {list(tr.rows)} from device "
                                     f"{tr.src}, which holds only {sorted(held.get(tr.src, []))}")
            held.setdefault(tr.dst, []).append(tr.rows)

    for s, stage in enumerate(plan.stages):
        run(stage.transfers, f"stage {s}")
        for r in stage.reductions:  # every owner of rows of a reduced value takes part
            for d, rows in r.rows:
                if not 0 <= d < n_dev:
                    raise EdgeweaveError(f"invalid plan: stage {s} reduction {r.node} names device {d}")
                if stage.kind != "reduce" and rows[1] > rows[0] and not any(
                        a.device == d and a.out_rows[1] > a.out_rows[0] for a in stage.assignments):
                    raise EdgeweaveError(f"invalid plan: stage {s} device {d} owns rows {list(rows)} of "
                                         f"{r.source} but computes nothing in the stage")
                if stage.kind == "reduce" and not _covered(held.get(d, []), rows):
                    raise EdgeweaveError(f"invalid plan: stage {s} device {d} reduces rows {list(rows)} "
                                         f"but holds only {sorted(held.get(d, []))}")
        nxt: dict[int, list[tuple[int, int]]] = {}
        for a in stage.assignments:
            if a.out_rows[1] <= a.out_rows[0]:
                continue
            if not 0 <= a.device < n_dev:
                raise EdgeweaveError(f"invalid plan: stage {s} assigns work to device {a.device}; the plan has {n_dev}")
            if not _covered(held.get(a.device, []), a.in_rows):
                raise EdgeweaveError(f"invalid plan: stage {s} device {a.device} computes from rows {list(a.in_rows)} "
                                     f"but holds only {sorted(held.get(a.device, []))}")
            nxt.setdefault(a.device, []).append(a.out_rows)
        held = nxt
    run(plan.final_transfers, "final")
    last = plan.stages[-1].output_shape
    if not _covered(held.get(0, []), (0, last[plan.out_axis])):
        raise EdgeweaveError(f"invalid plan: the leader ends with rows {sorted(held.get(0, []))} of the output, "
                             f"not all {last[plan.out_axis]}")
