"""Concurrent requests on groups of devices, under a per-frame latency SLO (``serve --slo-ms``).

The cluster is divided into groups (planning/throughput.py: the most frames per second whose
groups keep the SLO); each group serves one request at a time and the groups serve at once. A
request takes the fastest free group (by its recent service time). Before it waits, the server
predicts when it would be answered (on the fastest free group; with none free, after the
requests ahead of it shared over the groups, each taking a mean service time) and refuses it at
once (HTTP 503, counted as ``refused_slo``, with a ``Retry-After``) when that is past its
deadline: a request that would miss its SLO anyway is better told now than answered late, and
it no longer delays the ones behind it. The HTTP app asks before it reads the request's body
(:meth:`GroupInferenceServer.admit`), so a refusal costs the leader little CPU. A group that
has not served for ``STALE_S`` is predicted no slower than its plan says, so that one slow
spell does not keep it out for good.

A failure (a follower dies or hangs) stops new requests, lets the other groups finish theirs,
recovers the session with the devices still alive, plans the groups again and runs the request
again: the client sees a slower answer, not an error, while the cluster can go on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.serving.server import Busy, ClusterFailed, Counters, ServerLimits, check_input


STALE_S = 30.0  # a group unused this long is predicted no slower than its plan
MAX_RETRY_S = 60.0  # the longest Retry-After a refusal asks for


class GroupInferenceServer:
    """Serve single inputs on the groups of a ``GroupPlan``; thread-safe (one thread per request)."""

    on_demand = False

    def __init__(self, session: Any, gplan: Any, replan: Callable[[Any], Any], spec: Any, model_name: str,
                 slo_s: float, limits: ServerLimits = ServerLimits()):
        from edgeweave.runtime.frames import GroupServer

        self.session, self.replan, self.spec, self.model_name = session, replan, spec, model_name
        self.slo_s, self.limits = float(slo_s), limits
        self.counters = Counters(limits.window, "refused_slo", "regroups", "unauthorized")
        self.groups = GroupServer(session, gplan)  # loads the plans and opens the groups
        self._cond = threading.Condition()
        self._free = list(range(len(gplan.groups)))
        self._waiting = 0
        self._running = 0
        self._recovering = False
        self._service = [g.latency_s for g in gplan.groups]  # seconds per frame: predicted, then measured
        self._served = [0] * len(gplan.groups)
        self._used_at = [time.perf_counter()] * len(gplan.groups)
        self._refused_at: deque[float] = deque(maxlen=4096)  # when recent requests were refused
        self.lost: list[str] = []

    # -- what the app asks ---------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w = self.groups.gplan.groups[0].plan.input_shape[-2:]
        return (int(self.spec.in_channels), int(h), int(w))

    def warm_up(self) -> float:
        """Every group runs one frame of zeros (at once), so that no client pays first-run costs."""
        t0 = time.perf_counter()
        n = len(self.groups.gplan.groups)
        for r in self.groups.serve([torch.zeros(1, *self.input_shape)] * n):
            self._service[r.group] = r.end_s - r.start_s
        return time.perf_counter() - t0

    def _estimate(self, g: int, now: float) -> float:
        """Group ``g``'s seconds per request: measured, or no more than its plan's once stale."""
        if now - self._used_at[g] > STALE_S:
            return min(self._service[g], self.groups.gplan.groups[g].latency_s)
        return self._service[g]

    def _predicted_s(self) -> float:
        """Seconds until a request arriving now would be answered: the fastest free group's service
        time; with none free, the requests ahead spread over the groups, each a mean service
        time, then the fastest group's."""
        now = time.perf_counter()
        if self._free:
            return min(self._estimate(g, now) for g in self._free)
        n = len(self._service)
        return (self._waiting // n + 1) * sum(self._service) / n + min(self._service)

    def _check_slo(self) -> None:
        """Refuse (Busy, counted) a request predicted past the SLO; the caller holds the lock."""
        predicted = self._predicted_s()
        if predicted > self.slo_s:
            self.counters.add("refused")
            self.counters.add("refused_slo")
            n = len(self._service)
            busy = n - len(self._free)
            raise Busy(f"predicted answer in {1e3 * predicted:.0f} ms ({self._waiting} waiting, {busy} of "
                       f"{n} groups busy), beyond the SLO of {1e3 * self.slo_s:.0f} ms; try again later",
                       retry_after_s=self._retry_after(predicted))

    def _retry_after(self, predicted: float) -> float:
        """When a refused request should come back: once the queue ahead has shrunk by what is
        late, at least a service time, and no sooner than the requests refused recently can be
        served at the groups' rate (each refused client one request), so that clients who honour
        it come back spread over the time the groups need, instead of all hitting the leader again."""
        now = time.perf_counter()
        n = len(self._service)
        mean = sum(self._service) / n
        self._refused_at.append(now)
        while now - self._refused_at[0] > 2 * mean:  # in time order: only the last two service times count
            self._refused_at.popleft()
        return min(MAX_RETRY_S, max(min(self._service), predicted - self.slo_s, len(self._refused_at) * mean / n))

    def _take(self) -> int:
        """The fastest free group, now running a request; the caller holds the lock."""
        now = time.perf_counter()
        g = min(self._free, key=lambda i: (self._estimate(i, now), i))
        self._free.remove(g)
        self._running += 1
        return g

    def admit(self) -> None:
        """Refuse now a request predicted past the SLO (before its body is read); ``infer`` asks again."""
        with self._cond:
            self._check_slo()

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        check_input(x, self.input_shape)
        t0 = time.perf_counter()
        with self._cond:
            self._check_slo()
            if self._waiting >= self.limits.max_waiting:
                self.counters.add("refused")
                raise Busy(f"{self._waiting} requests are already waiting; try again later")
            self._waiting += 1
            try:
                while self._recovering or not self._free:
                    left = self.limits.wait_timeout_s - (time.perf_counter() - t0)
                    if left <= 0:
                        self.counters.add("refused")
                        raise Busy(f"waited {self.limits.wait_timeout_s:g} s for a group; try again later")
                    self._cond.wait(timeout=left)
                g = self._take()
            finally:
                self._waiting -= 1
        queue_s = time.perf_counter() - t0
        regrouped = False
        try:
            for attempt in range(3):
                pid, devices = self.groups.pids[g], list(self.groups.gplan.groups[g].devices)
                t1 = time.perf_counter()
                try:
                    y, tm = self.session.infer(x, pid)
                    break
                except EdgeweaveError as e:
                    if attempt == 2:
                        self.counters.add("failed")
                        raise ClusterFailed(f"inference failed: {e}") from None
                    g = self._recover(g, str(e), getattr(e, "name", None))
                    regrouped = True
            service = time.perf_counter() - t1
        finally:
            with self._cond:
                self._running -= 1
                if g is not None and g < len(self._service):
                    self._free.append(g)
                self._cond.notify_all()
        with self._cond:
            self._service[g] = 0.8 * self._estimate(g, t1) + 0.2 * service
            self._served[g] += 1
            self._used_at[g] = time.perf_counter()
        total = time.perf_counter() - t0
        self.counters.served(total, regroups=int(regrouped))
        return y, {"latency_s": total, "queue_s": queue_s, "service_s": service, "group": g, "devices": devices,
                   "slo_s": self.slo_s, "event": "regrouped" if regrouped else "", "timings_s": tm.total_s}

    def _recover(self, g: int, why: str, suspect: str | None = None) -> int:
        """Called by a request whose group failed, holding group ``g``: wait until no other
        request runs, recover and re-plan (once, whoever comes first), and take a group again."""
        if self.session.broken is None and not self._recovering:
            return g  # the cluster is whole (the error was this request's): try the same group again
        with self._cond:
            self._running -= 1
            self._cond.notify_all()
            if not self._recovering and self.session.broken is not None:
                self._recovering = True
                while self._running > 0:
                    self._cond.wait()
                try:
                    lost = self.session.recover(suspects=[suspect] if suspect else ())
                    self.lost += lost
                    gplan = self.replan(self.session.cluster)
                    self.groups._use(gplan)  # noqa: SLF001 - the stream's own re-grouping
                    self._service = [gr.latency_s for gr in gplan.groups]
                    self._served = [0] * len(gplan.groups)
                    self._used_at = [time.perf_counter()] * len(gplan.groups)
                    self._free = list(range(len(gplan.groups)))
                finally:
                    self._recovering = False
                    self._cond.notify_all()
            while self._recovering or not self._free:
                self._cond.wait()
            return self._take()

    def idle(self, timeout_s: float | None = None) -> bool:
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        with self._cond:
            while self._running or self._waiting or self._recovering:
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=left)
        return True

    def describe(self) -> str:
        gp = self.groups.gplan
        return (f"on {len(gp.groups)} groups ({' | '.join('+'.join(g.devices) for g in gp.groups)}; predicted "
                f"{gp.fps:.2f} frames/s, SLO {1e3 * self.slo_s:.0f} ms)")

    def model_info(self) -> dict[str, Any]:
        gp = self.groups.gplan
        return {"devices": list(self.session.names), "groups": [list(g.devices) for g in gp.groups],
                "slo_s": self.slo_s, "predicted_fps": gp.fps,
                "group_predicted_s": [g.latency_s for g in gp.groups]}

    def stats(self) -> dict[str, Any]:
        with self._cond:
            gp = self.groups.gplan
            groups = [{"devices": list(grp.devices), "served": self._served[i], "busy": i not in self._free,
                       "service_s": self._service[i]} for i, grp in enumerate(gp.groups)]
            out = {"model": self.model_name, **self.counters.snapshot(), "devices": list(self.session.names),
                   "groups": groups, "waiting": self._waiting, "slo_s": self.slo_s, "lost": list(self.lost),
                   "predicted_s": gp.latency_s}
        return out

    def close(self) -> None:
        self.groups.close()
