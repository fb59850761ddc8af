"""Measurements shared by `bench exits` and the demo: a plain model's batch-1 latency and
memory, operating points re-measured on a test split, speedups within an accuracy tolerance, and
budgeted requests served through the policy (to count latency-budget violations).

All latencies are wall-clock per call at batch 1, in the calling process with its current
thread setting (the bench sets one thread), so teacher and student are measured alike.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from edgeweave.exits.calibrate import OperatingPoint, Setting, _PeakMemory, _param_bytes, measure_settings, time_per_sample
from edgeweave.exits.ondemand import OnDemandModel
from edgeweave.models.multi_exit import MultiExitNet


@torch.no_grad()
def measure_plain_model(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, Any]:
    """Accuracy, batch-1 latency (mean, p95) and peak memory (weights + activations) of a
    single-exit model."""
    model.eval()
    lat = time_per_sample(model, xs)
    pred = torch.cat([model(xs[i : i + 256]).argmax(1) for i in range(0, xs.shape[0], 256)])
    with _PeakMemory() as mem:
        model(xs[:1])
    return {"accuracy": float((pred == ys).float().mean()), "mean_ms": float(lat.mean() * 1e3),
            "p95_ms": float(np.percentile(lat, 95) * 1e3), "peak_memory_bytes": int(_param_bytes([model]) + mem.peak),
            "params": int(sum(p.numel() for p in model.parameters()))}


def remeasure(model: MultiExitNet, points: Sequence[OperatingPoint], xs: torch.Tensor, ys: torch.Tensor, *,
              references: dict[str, nn.Module] | None = None) -> tuple[list[OperatingPoint], dict[str, dict[str, float]]]:
    """The same settings (thresholds fixed by calibration) measured on another split, interleaved
    with the ``references`` (plain models such as the teacher) so all see the same machine load.
    Returns the points and, per reference, its mean and p95 latency in ms."""
    settings = [Setting(p.name, p.thresholds, p.target_proportions, p.forced_exit) for p in points]
    weights = points[0].voting_weights or None if points else None
    conf = points[0].confidence if points else "max_softmax"
    new, ref_lat = measure_settings(model, xs, ys, settings, voting_weights=weights, confidence=conf, references=references)
    refs = {k: {"mean_ms": float(v.mean() * 1e3), "p95_ms": float(np.percentile(v, 95) * 1e3)} for k, v in ref_lat.items()}
    return new, refs


def best_speedup(points: Sequence[OperatingPoint], ref_accuracy: float, ref_ms: float, tolerance: float = 0.01) -> tuple[float, str | None]:
    """Largest ref_ms / mean_ms among points with accuracy >= ref_accuracy - tolerance."""
    ok = [p for p in points if p.accuracy >= ref_accuracy - tolerance - 1e-9]
    if not ok:
        return 0.0, None
    p = min(ok, key=lambda q: q.mean_ms)
    return ref_ms / p.mean_ms, p.name


def budget_grid(points: Sequence[OperatingPoint], n: int) -> list[float]:
    """``n`` budgets spread from the fastest point's p95 to 20 % above the slowest's."""
    lo = min(p.p95_ms for p in points)
    hi = max(p.p95_ms for p in points) * 1.2
    return [float(v) for v in np.linspace(lo, hi, n)]


def serve_budgets(od: OnDemandModel, xs: torch.Tensor, ys: torch.Tensor, budgets: Sequence[float],
                  requests_per_budget: int, seed: int = 0) -> dict[str, Any]:
    """For each budget, ``requests_per_budget`` single-sample requests through ``od.predict``.
    A request the policy could satisfy violates its budget when its measured latency (policy +
    inference) exceeds it; a request answered "cannot meet this budget" is counted apart
    (``unsatisfied``), since no point was chosen for that budget."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    total = violations = correct = unsatisfied = 0
    for b in budgets:
        idx = torch.randint(0, xs.shape[0], (requests_per_budget,), generator=g)
        lat, ok, v, uns, points = [], 0, 0, 0, {}
        for i in idx.tolist():
            t0 = time.perf_counter()
            r = od.predict(xs[i : i + 1], latency_budget_ms=b)
            ms = (time.perf_counter() - t0) * 1e3
            points[r.choice.point.name] = points.get(r.choice.point.name, 0) + 1
            if not r.choice.satisfied:
                uns += 1
                continue
            lat.append(ms)
            ok += int(r.labels[0] == ys[i])
            v += int(ms > b)
        total += len(lat)
        violations += v
        correct += ok
        unsatisfied += uns
        rows.append({"budget_ms": b, "points": points, "requests": requests_per_budget, "served": len(lat),
                     "unsatisfied": uns, "violations": v, "accuracy": ok / len(lat) if lat else None,
                     "mean_ms": float(np.mean(lat)) if lat else None,
                     "p95_ms": float(np.percentile(lat, 95)) if lat else None})
    return {"budget_violations": violations / total if total else None, "requests": total + unsatisfied,
            "served": total, "unsatisfied": unsatisfied, "accuracy": correct / total if total else None,
            "load_factor_end": od.load_tracker.factor() if od.load_tracker is not None else None, "per_budget": rows}


def point_rows(points: Sequence[OperatingPoint]) -> list[dict[str, Any]]:
    return [p.to_dict() for p in points]


def points_table(points, title: str = "operating points"):
    from rich.table import Table

    t = Table(title=title)
    for c in ("point", "accuracy", "mean ms", "p95 ms", "exit proportions", "voted", "memory KiB"):
        t.add_column(c, justify="left" if c == "point" else "right")
    for p in points:
        t.add_row(p.name, f"{p.accuracy:.4f}", f"{p.mean_ms:.3f}", f"{p.p95_ms:.3f}",
                  " ".join(f"{v:.2f}" for v in p.exit_proportions), f"{p.voted_fraction:.2f}",
                  f"{p.peak_memory_bytes / 1024:.0f}")
    return t
