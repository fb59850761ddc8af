"""On-demand policy: a request's service-level objective -> an operating point.

Pure function over calibrated points (``calibrate.OperatingPoint``), measured on the device:

- latency budget only: the most accurate point whose p95 latency fits the budget (ties: faster);
- accuracy target only: the fastest point (p95) whose accuracy meets the target (ties: more
  accurate);
- both: the most accurate point meeting both;
- neither: the default point (the most accurate one unless a name is given).

When no point satisfies the request the answer says so (``satisfied=False`` and a message) and
carries the closest point: the fastest point for a budget nobody meets, the most accurate one
for an accuracy nobody reaches, and for both, the point with the smallest relative shortfall.
Accuracies are fractions in [0, 1]; latencies are milliseconds.

Variants: a deployment may hold several variants of the task (models/variants.py: the full
multi-exit model, a distilled compact student, ...), each with its own calibrated points.
``variant_points`` names every point ``VARIANT/POINT`` in one list, so the same choice runs over
every (variant, operating point) pair: the most accurate configuration meeting a budget, the
fastest meeting an accuracy target; ``split_name`` reads the pair back.

Load: calibrated latencies were measured under the load of calibration time; a shared device
may be busier when serving. ``LoadTracker`` keeps the recent ratios of measured latency to the
chosen point's calibrated median; their median (never below 1: we only react to slowdowns) scales
every point's latency before the policy compares it with a budget, so a busier device answers
with faster points (or says it cannot meet the budget now) instead of missing budgets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from edgeweave.errors import EdgeweaveError
from edgeweave.exits.calibrate import OperatingPoint


@dataclass
class Choice:
    point: OperatingPoint
    satisfied: bool
    message: str

    def to_dict(self) -> dict:
        return {"point": self.point.to_dict(), "satisfied": self.satisfied, "message": self.message}


def _latency(p: OperatingPoint, stat: str) -> float:
    return p.p95_ms if stat == "p95" else p.mean_ms


class LoadTracker:
    """Serving-time slowdown relative to calibration (see the module docstring)."""

    def __init__(self, window: int = 32, min_samples: int = 5) -> None:
        from collections import deque

        self.ratios: "deque[float]" = deque(maxlen=window)
        self.min_samples = min_samples

    def observe(self, point: OperatingPoint, measured_ms: float) -> None:
        ref = point.p50_ms if point.p50_ms else point.mean_ms
        if ref > 0:
            self.ratios.append(measured_ms / ref)

    def factor(self) -> float:
        if len(self.ratios) < self.min_samples:
            return 1.0
        r = sorted(self.ratios)
        return max(1.0, r[len(r) // 2])


def default_point(points: Sequence[OperatingPoint], name: str | None = None) -> OperatingPoint:
    if not points:
        raise EdgeweaveError("no operating points: run `edgeweave exits calibrate` first")
    if name is not None:
        for p in points:
            if p.name == name:
                return p
        raise EdgeweaveError(f"no operating point named {name!r}; known: {', '.join(p.name for p in points)}")
    return max(points, key=lambda p: (p.accuracy, -p.p95_ms))


def choose(points: Sequence[OperatingPoint], *, latency_budget_ms: float | None = None,
           min_accuracy: float | None = None, default: str | None = None, latency_stat: str = "p95",
           latency_scale: float = 1.0) -> Choice:
    """Pick the operating point for one request; see the module docstring. ``latency_scale``
    multiplies every calibrated latency (the serving-time load factor, see ``LoadTracker``)."""
    if not points:
        raise EdgeweaveError("no operating points: run `edgeweave exits calibrate` first")
    if latency_budget_ms is not None and latency_budget_ms <= 0:
        raise EdgeweaveError(f"latency budget must be > 0 ms, got {latency_budget_ms}")
    if min_accuracy is not None and not 0 <= min_accuracy <= 1:
        raise EdgeweaveError(f"accuracy target is a fraction in [0, 1], got {min_accuracy}")
    lat = lambda p: _latency(p, latency_stat) * latency_scale  # noqa: E731
    if latency_budget_ms is None and min_accuracy is None:
        p = default_point(points, default)
        return Choice(p, True, f"no constraint: default point {p.name}")
    ok = [p for p in points
          if (latency_budget_ms is None or lat(p) <= latency_budget_ms)
          and (min_accuracy is None or p.accuracy >= min_accuracy)]
    if ok:
        if latency_budget_ms is not None:
            p = max(ok, key=lambda q: (q.accuracy, -lat(q)))
        else:
            p = min(ok, key=lambda q: (lat(q), -q.accuracy))
        return Choice(p, True, f"{p.name}: accuracy {p.accuracy:.4f}, {latency_stat} {lat(p):.3f} ms")
    if min_accuracy is None:
        p = min(points, key=lambda q: (lat(q), -q.accuracy))
        why = f"no operating point meets {latency_budget_ms:g} ms ({latency_stat}); the fastest is {p.name} at {lat(p):.3f} ms"
    elif latency_budget_ms is None:
        p = max(points, key=lambda q: (q.accuracy, -lat(q)))
        why = f"no operating point reaches accuracy {min_accuracy:.4f}; the most accurate is {p.name} at {p.accuracy:.4f}"
    else:
        def shortfall(q: OperatingPoint) -> float:
            return max(0.0, lat(q) / latency_budget_ms - 1) + max(0.0, (min_accuracy - q.accuracy) / max(min_accuracy, 1e-9))
        p = min(points, key=shortfall)
        why = (f"no operating point meets both {latency_budget_ms:g} ms and accuracy {min_accuracy:.4f}; closest is "
               f"{p.name} ({lat(p):.3f} ms, accuracy {p.accuracy:.4f})")
    return Choice(p, False, why)


def variant_points(points: Mapping[str, Sequence[OperatingPoint]]) -> list[OperatingPoint]:
    """Every variant's points in one list, each named ``VARIANT/POINT`` (see the module docstring)."""
    return [replace(p, name=f"{v}/{p.name}") for v, pts in points.items() for p in pts]


def split_name(name: str) -> tuple[str, str]:
    """``VARIANT/POINT`` -> (variant, point)."""
    variant, sep, point = name.partition("/")
    if not sep:
        raise EdgeweaveError(f"{name!r} names no variant (expected VARIANT/POINT)")
    return variant, point
