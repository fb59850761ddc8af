"""Frames in flight: a stream served by groups of devices at once.

The planner (planning/throughput.py) divides the cluster into groups, each with an ordinary plan
for whole frames; :class:`GroupServer` loads those plans, opens the groups on the session
(``Session.open_groups``) and serves frames with one thread per group: a group takes the oldest
frame that has arrived as soon as it is free. Answers come back in arrival order with each
frame's latency counted from its arrival, so a queue that grows shows in the numbers.

A failure (a follower dies, hangs or loses its link) stops every group after its current
frame; the frames that failed go back to the queue, the session recovers with the devices still
alive (``Session.recover``), the groups are planned again over them (``replan``) and the stream
goes on: no frame is lost. Between frames, a device that registered since (a board that came
back) is taken in the same way when ``admit`` is set.

It decides nothing itself beyond "which free group takes the next frame": the groups and their
plans come from the planner.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.profiling.profile import Cluster


@dataclass
class FrameResult:
    """One frame: when it arrived, which group served it, when that started and ended (seconds
    from the stream's start), and how many times it was run again after a failure."""

    index: int
    arrival_s: float
    start_s: float
    end_s: float
    group: int
    devices: list[str]
    retries: int = 0
    output: torch.Tensor | None = field(default=None, repr=False)

    @property
    def latency_s(self) -> float:
        return self.end_s - self.arrival_s

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "arrival_s": self.arrival_s, "start_s": self.start_s, "end_s": self.end_s,
                "latency_s": self.latency_s, "service_s": self.end_s - self.start_s, "group": self.group,
                "devices": self.devices, "retries": self.retries}


@dataclass
class Event:
    at_s: float
    kind: str  # "failure" | "regrouped" | "admitted"
    detail: str
    groups: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"at_s": self.at_s, "kind": self.kind, "detail": self.detail, "groups": self.groups}


class GroupServer:
    """Serve frames on ``session`` with the groups of ``gplan`` (a ``GroupPlan``).

    ``replan(cluster)`` makes a new GroupPlan for the devices of ``cluster`` (after a failure or
    a newcomer); without it a failure ends the stream with the error. ``admit``: look for
    devices that registered since, every ``admit_every_s`` seconds, and take them in."""

    def __init__(self, session: Any, gplan: Any, *, replan: Callable[[Cluster], Any] | None = None,
                 admit: bool = False, admit_every_s: float = 2.0):
        self.session = session
        self.replan = replan
        self.admit, self.admit_every_s = admit, admit_every_s
        self.events: list[Event] = []
        self.gplan: Any = None
        self.pids: list[int] = []
        self._use(gplan)

    # -- groups ------------------------------------------------------------------------------
    def _use(self, gplan: Any) -> None:
        """Load every group's plan on its devices and open the groups."""
        s = self.session
        s.close_groups()
        rank = {n: r for r, n in enumerate(s.names)}
        groups = []
        for g in gplan.groups:
            missing = [n for n in g.devices if n not in rank]
            if missing:
                raise EdgeweaveError(f"the group plan names devices {missing} that are not in the cluster {s.names}")
            groups.append([rank[n] for n in g.devices])
        old = list(self.pids)
        self.pids = [s.load_plan(g.plan, drop=old if i == 0 else (), ranks=ranks)
                     for i, (g, ranks) in enumerate(zip(gplan.groups, groups))]
        s.open_groups(groups, slots=int(getattr(gplan, "slots", 1)))
        self.gplan = gplan

    @property
    def groups(self) -> list[list[str]]:
        return [list(g.devices) for g in self.gplan.groups]

    def _regroup(self, t0: float, why: str, suspects: Sequence[str] = ()) -> None:
        if self.replan is None:
            raise EdgeweaveError(f"a group failed and no re-planning was given: {why}")
        # the devices the failures named: the session need not wait its time-out for them
        lost = self.session.recover(suspects=suspects)
        self.events.append(Event(time.perf_counter() - t0, "failure", f"{why[:300]}; left out: {lost}"))
        self._use(self.replan(self.session.cluster))
        self.events.append(Event(time.perf_counter() - t0, "regrouped", f"{self.session.world} devices",
                                 self.groups))

    def _take_newcomers(self, t0: float) -> None:
        s = self.session
        new = s.newcomers()
        if not new or self.replan is None:
            return
        s.close_groups()
        s.regroup(alive=[f.name for f in s.followers], join=new)
        self.events.append(Event(time.perf_counter() - t0, "admitted", f"{new}"))
        self._use(self.replan(s.cluster))
        self.events.append(Event(time.perf_counter() - t0, "regrouped", f"{s.world} devices", self.groups))

    # -- serving -----------------------------------------------------------------------------
    def serve(self, frames: Sequence[torch.Tensor], rate: float | None = None,
              on_frame: Callable[[FrameResult], None] | None = None) -> list[FrameResult]:
        """Serve ``frames``: frame i arrives at ``i / rate`` seconds (all at once without a
        rate); returns one result per frame, in arrival order."""
        n = len(frames)
        arrival = [i / rate if rate else 0.0 for i in range(n)]
        results: list[FrameResult | None] = [None] * n
        retries = [0] * n
        queue = list(range(n))  # a heap of frame indices: the oldest first
        cond = threading.Condition()
        t0 = time.perf_counter()
        failed: list[str] = []
        suspects: list[str] = []  # the devices failures named (PeerError.name)
        next_admit = self.admit_every_s

        def worker(g: int, slot: int, pid: int, devices: list[str]) -> None:
            while True:
                with cond:
                    while True:
                        if failed or not queue:
                            return
                        wait = arrival[queue[0]] - (time.perf_counter() - t0)
                        if wait <= 0:
                            i = heapq.heappop(queue)
                            break
                        cond.wait(timeout=wait)
                start = time.perf_counter() - t0
                try:
                    y, _tm = self.session.infer(frames[i], pid, slot=slot)
                except Exception as e:  # noqa: BLE001 - the frame goes back; the stream recovers
                    with cond:
                        heapq.heappush(queue, i)
                        retries[i] += 1
                        failed.append(f"{type(e).__name__}: {e}")
                        if getattr(e, "name", None):
                            suspects.append(str(e.name))
                        cond.notify_all()
                    return
                res = FrameResult(i, arrival[i], start, time.perf_counter() - t0, g, devices, retries[i], y)
                results[i] = res
                if on_frame is not None:
                    on_frame(res)

        while queue:
            slots = int(getattr(self.gplan, "slots", 1))
            threads = [threading.Thread(target=worker, args=(g, slot, pid, list(grp.devices)), daemon=True)
                       for g, (pid, grp) in enumerate(zip(self.pids, self.gplan.groups)) for slot in range(slots)]
            for t in threads:
                t.start()
            if self.admit:  # look for newcomers while the groups work; taken in between two rounds
                while any(t.is_alive() for t in threads):
                    next(t for t in threads if t.is_alive()).join(timeout=0.1)
                    if time.perf_counter() - t0 > next_admit and self.session.newcomers():
                        with cond:
                            failed.append("newcomer")  # stops the groups after their current frames
                        break
            for t in threads:
                t.join()
            if failed:
                why = failed[0]
                failed.clear()
                if why == "newcomer":
                    next_admit = time.perf_counter() - t0 + self.admit_every_s
                    self._take_newcomers(t0)
                else:
                    if max(retries) > 3:
                        raise EdgeweaveError(f"a frame failed {max(retries)} times; last: {why}")
                    self._regroup(t0, why, list(suspects))
                    suspects.clear()
        out = [r for r in results if r is not None]
        assert len(out) == n
        return out

    def close(self) -> None:
        self.session.close_groups()


def latency_stats(results: Sequence[FrameResult], warmup: int = 0, parallel: int = 1) -> dict[str, float]:
    """Frames per second (first arrival to last answer, and ``fps_steady`` below) and latency
    percentiles, leaving out the first ``warmup`` frames. ``parallel``: frames served at once
    (groups x slots)."""
    rs = list(results)[warmup:]
    if not rs:
        return {}
    lat = sorted(r.latency_s for r in rs)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, max(0, int(round(p * (len(lat) - 1)))))]

    span = max(r.end_s for r in rs) - min(r.arrival_s for r in rs)
    ends = sorted(r.end_s for r in rs)
    # answers per second once every server has answered its first frame: the rate a stream is
    # served at once it runs, without the first frames' start-up or the last one's service time
    # (from the first answer instead, k servers starting together would count k - 1 answers too many)
    k = max(1, min(parallel, len(ends) - 1))
    steady = (len(ends) - k) / (ends[-1] - ends[k - 1]) if len(ends) > k and ends[-1] > ends[k - 1] else None
    return {"count": len(rs), "fps": len(rs) / span if span > 0 else float("inf"), "fps_steady": steady,
            "p50_s": pct(0.5), "p95_s": pct(0.95), "max_s": lat[-1], "mean_s": sum(lat) / len(lat)}
