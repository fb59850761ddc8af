"""A multi-exit model served on the leader alone, each request at the operating point it asks for.

A request may state a latency budget (``budget_ms``) or an accuracy target (``min_accuracy``);
the policy (``exits.policy``) picks the calibrated operating point that serves it best, and the
answer says which point ran, where the sample left the trunk, and whether the request could be
met. Requests that state neither get the default point (the most accurate one).

Why on one device: an early exit decides after each segment, per sample, whether to go on, so
the work of a request is not known before it runs, while a plan spreads a known graph; and the
trunk of a multi-exit model is small (that is its point), so spreading it would cost more in
synchronisation than it saves.
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
            "exits": self.od.model.num_exits, "voted": bool(p.voted[0]), "confidence": float(p.confidence[0]),
            "point": c.point.name, "satisfied": c.satisfied, "message": c.message,
            "point_accuracy": c.point.accuracy, "point_p95_ms": c.point.p95_ms,
        }
        self.counters.served(p.latency_ms / 1e3, {"by_point": c.point.name, "by_exit": exit_k},
                             unsatisfied=int(not c.satisfied))
        return p.probs, info

    def idle(self, timeout_s: float | None = None) -> bool:
        return self.turns.idle(timeout_s)

    def describe(self) -> str:
        return (f"on this device, early exits on demand ({len(self.od.points)} operating points, default "
                f"{self.od.choose(None, None).point.name}; /v1/model lists them)")

    def model_info(self) -> dict[str, Any]:
        """What ``/v1/model`` adds: the operating points a request can be served at."""
        return {"devices": ["leader"], "exits": self.od.model.num_exits,
                "default_point": self.od.choose(None, None).point.name,
                "operating_points": [{"name": p.name, "accuracy": p.accuracy, "mean_ms": p.mean_ms,
                                      "p95_ms": p.p95_ms, "exit_proportions": p.exit_proportions}
                                     for p in self.od.points]}

    def stats(self) -> dict[str, Any]:
        tracker = self.od.load_tracker
        return {"model": self.model_name, **self.counters.snapshot(), "devices": ["leader"],
                "load_factor": tracker.factor() if tracker is not None else 1.0}
