"""One adaptive stream behind many clients.

HTTP requests arrive concurrently; the cluster runs one frame at a time (a session is one
ordered conversation with its followers). So requests queue for the stream, and the queue is
bounded twice: how many may wait, and how long. A client that would wait longer than that
is told at once that the cluster is busy (HTTP 503), which it can act on; an unbounded queue
would turn a load spike into time-outs for everyone. Everything the stream does (re-plans when a
device slows down, regroups when one dies or comes back) happens between two requests' frames
and is reported with the frame it happened before or after.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import torch

from edgeweave.console import console
from edgeweave.errors import EdgeweaveError


class Busy(EdgeweaveError):
    """Too many requests waiting, or one waited too long (HTTP 503). ``retry_after_s``: when a
    request is predicted to be admitted (the answer's ``Retry-After``), where the server knows."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ClusterFailed(EdgeweaveError):
    """The inference failed and the stream could not go on without the failing device (HTTP 503)."""


@dataclass(frozen=True)
class ServerLimits:
    max_waiting: int = 8  # requests queued for the stream beyond the one running
    wait_timeout_s: float = 30.0  # how long a request may wait for its turn
    window: int = 256  # recent frames the latency percentiles are taken over


class Turns:
    """One request computes at a time; at most ``max_waiting`` more wait, each for at most
    ``wait_timeout_s``. :meth:`enter` either gives the caller the turn or raises :class:`Busy`;
    the caller then calls :meth:`leave_queue` once it stops counting as waiting and
    :meth:`release` once the model (or stream) is free again, which may be later, from another
    thread."""

    def __init__(self, limits: ServerLimits, counters: "Counters") -> None:
        self.limits, self.counters = limits, counters
        self._lock = threading.Lock()  # the model: one request at a time
        self._slots = threading.BoundedSemaphore(limits.max_waiting + 1)  # the running one + the waiting ones

    def enter(self) -> float:
        """Wait for the turn; returns the seconds waited. A refusal is counted (``refused``)."""
        t0 = time.perf_counter()
        if not self._slots.acquire(blocking=False):
            self.counters.add("refused")
            raise Busy(f"{self.limits.max_waiting} requests are already waiting; try again later")
        if not self._lock.acquire(timeout=self.limits.wait_timeout_s):
            self._slots.release()
            self.counters.add("refused")
            raise Busy(f"waited {self.limits.wait_timeout_s:g} s for the model; try again later")
        return time.perf_counter() - t0

    def leave_queue(self) -> None:
        self._slots.release()

    def release(self) -> None:
        self._lock.release()

    def idle(self, timeout_s: float | None = None) -> bool:
        """Wait until no request runs and nothing holds the model (a benchmark between phases, a test)."""
        if not self._lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            return False
        self._lock.release()
        return True


class Counters:
    """What a server counts since it started, and the latencies of its recent answers; thread-safe.

    ``names``: counters besides served/failed/refused; ``tallies``: answers counted by a value
    they carry (e.g. which operating point served them)."""

    def __init__(self, window: int, *names: str, tallies: tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self.started = time.time()
        self.counts = dict.fromkeys(("served", "failed", "refused", *names), 0)
        self.tallies: dict[str, Counter[str]] = {t: Counter() for t in tallies}

    def add(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    def served(self, latency_s: float, tally: dict[str, Any] | None = None, **more: int) -> None:
        with self._lock:
            self.counts["served"] += 1
            self._latencies.append(latency_s)
            for k, v in more.items():
                self.counts[k] += v
            for t, v in (tally or {}).items():
                self.tallies[t][str(v)] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = list(self._latencies)
            return {"uptime_s": time.time() - self.started, **self.counts,
                    **{t: dict(sorted(c.items())) for t, c in self.tallies.items()},
                    "window": len(lat), "latency_s": _percentiles(lat)}


class InferenceServer:
    """Serve single inputs on an :class:`~edgeweave.runtime.stream.AdaptiveStream`; thread-safe."""

    on_demand = False  # requests cannot choose how deep the model runs (see serving.ondemand)

    def __init__(self, stream: Any, spec: Any, model_name: str, limits: ServerLimits = ServerLimits()):
        self.stream, self.spec, self.model_name, self.limits = stream, spec, model_name, limits
        self.counters = Counters(limits.window, "learn_errors", "replans", "regroups", "unauthorized")
        self.turns = Turns(limits, self.counters)
        self._events_lock = threading.Lock()
        self.lost: list[str] = []
        self.joined: list[str] = []
        self._view = self._cluster_view()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w = self.stream.plan.input_shape[-2:]
        return (int(self.spec.in_channels), int(h), int(w))

    def warm_up(self) -> float:
        """One untimed frame of zeros (the stream's estimator ignores its first frame anyway), so that
        the first client does not pay the strips' first-run costs. Returns its seconds."""
        t0 = time.perf_counter()
        self.turns.enter()
        try:
            self.stream.step(torch.zeros(1, *self.input_shape))
            self._view = self._cluster_view()
        finally:
            self.turns.leave_queue()
            self.turns.release()
        return time.perf_counter() - t0

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run ``x`` (1, C, H, W) when its turn comes; the output and what the frame reports.

        The answer does not wait for the stream to learn from the frame: a re-plan takes seconds
        on a slow leader. A thread learns while holding the stream, so the next frame waits for
        it instead (and a frame never runs on a half-made plan)."""
        check_input(x, self.input_shape)
        queue_s = self.turns.enter()
        try:
            try:
                index = self.stream.frames
                y, frame = self.stream.run(x)
                self._view = view = self._cluster_view()  # after a regroup
            except EdgeweaveError as e:  # PeerError included: a failure the stream could not absorb
                self.turns.release()
                self.counters.add("failed")
                raise ClusterFailed(f"inference failed: {e}") from None
            except BaseException:
                self.turns.release()
                raise
            # the learning thread releases the stream when done
            threading.Thread(target=self._learn, args=(frame,), name="edgeweave-learn", daemon=True).start()
        finally:
            self.turns.leave_queue()
        change = frame.change
        info = {
            "frame": index, "latency_s": frame.timings.total_s, "queue_s": queue_s,
            "regroup_s": change.seconds if change else 0.0, "plan_version": view["plan_version"],
            "devices": view["devices"], "event": "regrouped" if change else "",
            "lost": list(change.lost) if change else [], "joined": list(change.joined) if change else [],
        }
        self.counters.served(frame.timings.total_s, regroups=int(change is not None))
        if change is not None:
            with self._events_lock:
                self.lost += info["lost"]
                self.joined += info["joined"]
        return y, info

    def _learn(self, frame: Any) -> None:
        try:
            rec = self.stream.learn(frame)
            self.counters.add("replans", int(rec.event == "replanned"))
        except Exception as e:  # a bug, not the client's: keep serving on the plan in use
            console.print(f"[red]learning from frame failed: {type(e).__name__}: {e}[/red]")
            self.counters.add("learn_errors")
        finally:
            self._view = self._cluster_view()
            self.turns.release()

    def _cluster_view(self) -> dict[str, Any]:
        """The stream as stats report it, taken while this thread holds it (one reference
        assignment publishes it): a re-plan between two reads would otherwise pair one plan's
        devices with another's version."""
        recs = self.stream.records
        last = recs[-1] if recs else None
        return {"devices": list(self.stream.plan.devices), "plan_version": self.stream.version,
                "speed_factors": list(last.factors) if last else None,
                "predicted_s": last.calibrated_s if last else self.stream.plan.predicted_s}

    def idle(self, timeout_s: float | None = None) -> bool:
        return self.turns.idle(timeout_s)

    def describe(self) -> str:
        plan = self.stream.plan
        return (f"with {', '.join(plan.devices)} ({plan.partition}, fusion {plan.fusion}, {plan.mode}; "
                f"predicted {plan.predicted_s:.4f} s)")

    def model_info(self) -> dict[str, Any]:
        """What ``/v1/model`` adds about how the model runs: the current plan."""
        plan = self.stream.plan  # one reference: its fields belong together
        return {"devices": list(plan.devices), "partition": plan.partition, "fusion": plan.fusion, "mode": plan.mode,
                "backends": dict(zip(plan.devices, plan.backends)), "predicted_s": plan.predicted_s}

    def stats(self) -> dict[str, Any]:
        """Counters since start, latency percentiles over the recent window, the cluster as it is now."""
        out: dict[str, Any] = {"model": self.model_name, **self.counters.snapshot()}
        with self._events_lock:
            out.update(lost=list(self.lost), joined=list(self.joined))
        security = getattr(getattr(self.stream, "session", None), "security", None)
        if security is not None:  # the cluster's door: registrations refused, control values ignored
            sec = security()
            out.update(cluster_keyed=sec["keyed"], members_refused=sec["members_refused"],
                       control_forged=sec["control_forged"])
        return out | self._view


def check_input(x: torch.Tensor, shape: tuple[int, int, int]) -> None:
    if tuple(x.shape[1:]) != tuple(shape) or x.shape[0] != 1:
        raise EdgeweaveError(f"input shape {list(x.shape)}; the model takes [1, {', '.join(map(str, shape))}]")


def _percentiles(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    if len(xs) == 1:
        return {"p50": xs[0], "p90": xs[0], "p99": xs[0], "max": xs[0]}
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50": statistics.median(xs), "p90": q[89], "p99": q[98], "max": max(xs)}
