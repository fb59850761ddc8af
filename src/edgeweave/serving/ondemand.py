"""A multi-exit model served each request at the operating point it asks for, on the leader
alone or with its trunk over the cluster (``runtime.exits.ClusterOnDemand``).

A request may state a latency budget (``budget_ms``) or an accuracy target (``min_accuracy``);
the policy (``exits.policy``) picks the calibrated operating point that serves it best, and the
answer says which point ran, where the sample left the trunk, and whether the request could be
met. Requests that state neither get the default point (the most accurate one).

On a cluster every trunk segment (exit to exit) has its own plan: after each, the leader runs
the exit's head and decides whether the request goes on, so the followers never start the
segments a request does not need. Whether spreading pays depends on the trunk: a small one costs
more in synchronisation than it saves, and then serving it on the leader alone is the faster
choice.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.exits.inference import NEVER, early_exit
from edgeweave.exits.ondemand import OnDemandModel
from edgeweave.serving.server import Counters, ServerLimits, Turns, check_input


class OnDemandServer:
    """Serve single inputs on an :class:`~edgeweave.exits.ondemand.OnDemandModel`; thread-safe."""

    on_demand = True  # requests may ask for a latency budget or an accuracy target

    def __init__(self, od: OnDemandModel, spec: Any, model_name: str, limits: ServerLimits = ServerLimits()):
        self.od, self.spec, self.model_name, self.limits = od, spec, model_name, limits
        self.counters = Counters(limits.window, "unsatisfied", "unauthorized", tallies=("by_point", "by_exit"))
        self.turns = Turns(limits, self.counters)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w = self.spec.input_size
        return (int(self.spec.in_channels), int(h), int(w))

    def warm_up(self) -> float:
        """The whole trunk once on zeros, outside the load tracker (a first run is slow for reasons
        that say nothing about the device's load). Returns its seconds."""
        t0 = time.perf_counter()
        if hasattr(self.od, "warm_up"):  # the trunk over the cluster: every segment's plan once
            self.od.warm_up()
        else:
            early_exit(self.od.model, torch.zeros(1, *self.input_shape), [NEVER] * self.od.model.num_exits)
        return time.perf_counter() - t0

    def infer(self, x: torch.Tensor, budget_ms: float | None = None,
              min_accuracy: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Classify ``x`` (1, C, H, W) at the operating point the request asks for; returns the
        probabilities the answer was taken from and what the request got."""
        check_input(x, self.input_shape)
        if budget_ms is not None and not budget_ms > 0:
            raise EdgeweaveError(f"budget_ms must be positive, got {budget_ms:g}")
        if min_accuracy is not None and not 0 < min_accuracy <= 1:
            raise EdgeweaveError(f"min_accuracy is a fraction in (0, 1], got {min_accuracy:g}")
        queue_s = self.turns.enter()
        try:  # the choice too: the load factor it reads moves with every answer
            p = self.od.predict(x, latency_budget_ms=budget_ms, min_accuracy=min_accuracy)
        finally:
            self.turns.leave_queue()
            self.turns.release()
        c, exit_k = p.choice, int(p.exits[0])
        info = {
            "latency_s": p.latency_ms / 1e3, "queue_s": queue_s, "exit": exit_k,
            "exits": self.od.num_exits(c.point), "voted": bool(p.voted[0]), "confidence": float(p.confidence[0]),
            "point": c.point.name, "satisfied": c.satisfied, "message": c.message,
            "point_accuracy": c.point.accuracy, "point_p95_ms": c.point.p95_ms,
        }
        self.counters.served(p.latency_ms / 1e3, {"by_point": c.point.name, "by_exit": exit_k},
                             unsatisfied=int(not c.satisfied))
        return p.probs, info

    def idle(self, timeout_s: float | None = None) -> bool:
        return self.turns.idle(timeout_s)

    def describe(self) -> str:
        where = f"on {', '.join(self._devices())}" if len(self._devices()) > 1 else "on this device"
        return (f"{where}, early exits on demand ({len(self.od.points)} operating points, default "
                f"{self.od.choose(None, None).point.name}; /v1/model lists them)")

    def model_info(self) -> dict[str, Any]:
        """What ``/v1/model`` adds: the operating points a request can be served at."""
        points = self.od.points
        return {"devices": self._devices(), "exits": max(self.od.num_exits(p) for p in points),
                "default_point": self.od.choose(None, None).point.name,
                "operating_points": [{"name": p.name, "accuracy": p.accuracy, "mean_ms": p.mean_ms,
                                      "p95_ms": p.p95_ms, "exits": self.od.num_exits(p),
                                      "exit_proportions": p.exit_proportions}
                                     for p in points]}

    def stats(self) -> dict[str, Any]:
        tracker = self.od.load_tracker
        out = {"model": self.model_name, **self.counters.snapshot(), "devices": self._devices(),
               "load_factor": tracker.factor() if tracker is not None else 1.0}
        if hasattr(self.od, "skipped_fraction"):
            out["followers_skipped_fraction"] = self.od.skipped_fraction()
        return out

    def _devices(self) -> list[str]:
        return list(getattr(self.od, "devices", ["leader"]))
