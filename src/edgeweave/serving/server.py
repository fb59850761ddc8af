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
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from edgeweave.console import console
from edgeweave.errors import EdgeweaveError


class Busy(EdgeweaveError):
    """Too many requests waiting, or one waited too long (HTTP 503)."""


class ClusterFailed(EdgeweaveError):
    """The inference failed and the stream could not go on without the failing device (HTTP 503)."""


@dataclass(frozen=True)
class ServerLimits:
    max_waiting: int = 8  # requests queued for the stream beyond the one running
    wait_timeout_s: float = 30.0  # how long a request may wait for its turn
    window: int = 256  # recent frames the latency percentiles are taken over


class InferenceServer:
    """Serve single inputs on an :class:`~edgeweave.runtime.stream.AdaptiveStream`; thread-safe."""

    def __init__(self, stream: Any, spec: Any, model_name: str, limits: ServerLimits = ServerLimits()):
        self.stream, self.spec, self.model_name, self.limits = stream, spec, model_name, limits
        self._lock = threading.Lock()  # the stream: one frame at a time
        self._slots = threading.BoundedSemaphore(limits.max_waiting + 1)  # the running one + the waiting ones
        self._stats_lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=limits.window)
        self.started = time.time()
        self.served = self.failed = self.refused = self.learn_errors = 0
        self.replans = self.regroups = 0
        self.lost: list[str] = []
        self.joined: list[str] = []

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w = self.stream.plan.input_shape[-2:]
        return (int(self.spec.in_channels), int(h), int(w))

    def warm_up(self) -> float:
        """One untimed frame of zeros (the stream's estimator ignores its first frame anyway), so that
        the first client does not pay the strips' first-run costs. Returns its seconds."""
        t0 = time.perf_counter()
        with self._lock:
            self.stream.step(torch.zeros(1, *self.input_shape))
        return time.perf_counter() - t0

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run ``x`` (1, C, H, W) when its turn comes; the output and what the frame reports.

        The answer does not wait for the stream to learn from the frame: a re-plan takes seconds
        on a slow leader. A thread learns while holding the stream, so the next frame waits for
        it instead (and a frame never runs on a half-made plan)."""
        if tuple(x.shape[1:]) != self.input_shape or x.shape[0] != 1:
            want = ", ".join(map(str, self.input_shape))
            raise EdgeweaveError(f"input shape {list(x.shape)}; the plan takes [1, {want}]")
        t_arrive = time.perf_counter()
        if not self._slots.acquire(blocking=False):
            self._count("refused")
            raise Busy(f"{self.limits.max_waiting} requests are already waiting; try again later")
        try:
            if not self._lock.acquire(timeout=self.limits.wait_timeout_s):
                self._count("refused")
                raise Busy(f"waited {self.limits.wait_timeout_s:g} s for the cluster; try again later")
            t_start = time.perf_counter()
            try:
                index = self.stream.frames
                y, frame = self.stream.run(x)
                version, devices = self.stream.version, list(self.stream.plan.devices)  # after a regroup
            except EdgeweaveError as e:  # PeerError included: a failure the stream could not absorb
                self._lock.release()
                self._count("failed")
                raise ClusterFailed(f"inference failed: {e}") from None
            except BaseException:
                self._lock.release()
                raise
            # the learning thread releases the stream when done
            threading.Thread(target=self._learn, args=(frame,), name="edgeweave-learn", daemon=True).start()
        finally:
            self._slots.release()
        change = frame.change
        info = {
            "frame": index, "latency_s": frame.timings.total_s, "queue_s": t_start - t_arrive,
            "regroup_s": change.seconds if change else 0.0, "plan_version": version,
            "devices": devices, "event": "regrouped" if change else "",
            "lost": list(change.lost) if change else [], "joined": list(change.joined) if change else [],
        }
        with self._stats_lock:
            self.served += 1
            self._latencies.append(frame.timings.total_s)
            self.regroups += change is not None
            self.lost += info["lost"]
            self.joined += info["joined"]
        return y, info

    def _learn(self, frame: Any) -> None:
        try:
            rec = self.stream.learn(frame)
            with self._stats_lock:
                self.replans += rec.event == "replanned"
        except Exception as e:  # a bug, not the client's: keep serving on the plan in use
            console.print(f"[red]learning from frame failed: {type(e).__name__}: {e}[/red]")
            self._count("learn_errors")
        finally:
            self._lock.release()

    def idle(self, timeout_s: float | None = None) -> bool:
        """Wait until no frame runs and nothing is being learnt (a benchmark between phases, a test)."""
        if not self._lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            return False
        self._lock.release()
        return True

    def _count(self, what: str) -> None:
        with self._stats_lock:
            setattr(self, what, getattr(self, what) + 1)

    def stats(self) -> dict[str, Any]:
        """Counters since start, latency percentiles over the recent window, the cluster as it is now."""
        with self._stats_lock:
            lat = list(self._latencies)
            out: dict[str, Any] = {
                "model": self.model_name, "uptime_s": time.time() - self.started, "served": self.served,
                "failed": self.failed, "refused": self.refused, "learn_errors": self.learn_errors,
                "replans": self.replans,
                "regroups": self.regroups, "lost": list(self.lost), "joined": list(self.joined),
            }
        recs = self.stream.records
        last = recs[-1] if recs else None
        out.update({
            "devices": list(self.stream.plan.devices), "plan_version": self.stream.version,
            "speed_factors": list(last.factors) if last else None,
            "predicted_s": last.calibrated_s if last else self.stream.plan.predicted_s,
            "window": len(lat), "latency_s": _percentiles(lat),
        })
        return out


def _percentiles(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    if len(xs) == 1:
        return {"p50": xs[0], "p90": xs[0], "p99": xs[0], "max": xs[0]}
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50": statistics.median(xs), "p90": q[89], "p99": q[98], "max": max(xs)}
