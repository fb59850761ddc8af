"""On-demand inference API: a multi-exit model plus its calibrated operating points.

    od = OnDemandModel.load("student.safetensors")
    res = od.predict(x, latency_budget_ms=2.0)          # best accuracy within 2 ms (p95)
    res = od.predict(x, min_accuracy=0.97)               # fastest point reaching 97 %
    res.labels, res.exits, res.choice.satisfied, res.choice.message

Operating points live in the checkpoint's ``extra["exits"]`` (``exits calibrate`` writes
them), so a reloaded checkpoint answers with the same points it was calibrated with.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.exits.calibrate import OperatingPoint
from edgeweave.exits.inference import early_exit
from edgeweave.exits.policy import Choice, LoadTracker, choose
from edgeweave.models.multi_exit import MultiExitNet

EXTRA_KEY = "exits"


@dataclass
class Prediction:
    labels: torch.Tensor
    exits: torch.Tensor
    voted: torch.Tensor
    choice: Choice
    latency_ms: float
    probs: torch.Tensor  # (N, C) what each answer was taken from: its exit's softmax, or the vote
    confidence: torch.Tensor  # (N,) at the exit each sample left from

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels.tolist(), "exits": self.exits.tolist(), "voted": self.voted.tolist(),
                "latency_ms": self.latency_ms, **self.choice.to_dict()}


def exits_extra(points: Sequence[OperatingPoint], **info: Any) -> dict[str, Any]:
    """What ``exits calibrate`` stores with the checkpoint."""
    return {"operating_points": [p.to_dict() for p in points],
            "measured_on": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                            "torch": torch.__version__, "threads": torch.get_num_threads(), **info}}


def points_from_extra(extra: dict[str, Any]) -> list[OperatingPoint]:
    data = (extra or {}).get(EXTRA_KEY, {})
    return [OperatingPoint.from_dict(d) for d in data.get("operating_points", [])]


class OnDemandModel:
    def __init__(self, model: MultiExitNet, points: Sequence[OperatingPoint], default: str | None = None,
                 adapt_to_load: bool = True, model_spec: Any = None) -> None:
        """``adapt_to_load``: scale calibrated latencies by the slowdown observed on recent
        single-sample requests (``policy.LoadTracker``) before choosing a point."""
        if not isinstance(model, MultiExitNet):
            raise EdgeweaveError("on-demand inference needs a multi-exit model (e.g. multi_exit_small)")
        if not points:
            raise EdgeweaveError("this model has no operating points: run `edgeweave exits calibrate CKPT` first")
        self.model = model.eval()
        self.model_spec = model_spec  # the checkpoint's ModelSpec when loaded from one
        self.measured_on: dict[str, Any] = {}  # where the points were measured (machine, threads), if known
        self.points = list(points)
        self.default = default
        self.load_tracker = LoadTracker() if adapt_to_load else None

    @classmethod
    def load(cls, path: str | Path, default: str | None = None) -> "OnDemandModel":
        from edgeweave.checkpoint import load_checkpoint

        model, spec, extra = load_checkpoint(path)
        od = cls(model, points_from_extra(extra), default, model_spec=spec)  # type: ignore[arg-type]
        od.measured_on = dict((extra or {}).get(EXTRA_KEY, {}).get("measured_on", {}))
        return od

    def num_exits(self, point: OperatingPoint) -> int:
        """How many exits the model a point runs has (one model here; a variant set's differ)."""
        return self.model.num_exits

    def choose(self, latency_budget_ms: float | None = None, min_accuracy: float | None = None) -> Choice:
        scale = self.load_tracker.factor() if self.load_tracker is not None else 1.0
        c = choose(self.points, latency_budget_ms=latency_budget_ms, min_accuracy=min_accuracy, default=self.default,
                   latency_scale=scale)
        if scale > 1 and latency_budget_ms is not None:
            c.message += f" (calibrated latencies x{scale:.2f} for the current load)"
        return c

    def predict(self, x: torch.Tensor, latency_budget_ms: float | None = None,
                min_accuracy: float | None = None) -> Prediction:
        """Classify ``x`` (N, C, H, W) at the operating point the request asks for. An
        unsatisfiable request still gets answers, at the closest point, with ``satisfied=False``."""
        import time

        c = self.choose(latency_budget_ms, min_accuracy)
        t0 = time.perf_counter()
        r = early_exit(self.model, x, c.point.thresholds, voting_weights=c.point.voting_weights or None,
                       confidence=c.point.confidence)
        ms = (time.perf_counter() - t0) * 1e3
        if self.load_tracker is not None and x.shape[0] == 1:
            self.load_tracker.observe(c.point, ms)
        return Prediction(r.pred, r.exit_index, r.voted, c, ms, r.probs, r.confidence)


def predict(model: MultiExitNet, points: Sequence[OperatingPoint], x: torch.Tensor, *,
            latency_budget_ms: float | None = None, min_accuracy: float | None = None) -> Prediction:
    """Functional form of ``OnDemandModel.predict``."""
    return OnDemandModel(model, points).predict(x, latency_budget_ms=latency_budget_ms, min_accuracy=min_accuracy)


def calibrate_checkpoint(path: str | Path, bundle: Any, *, out: str | Path | None = None, confidence: str = "max_softmax",
                         voting_weights: Sequence[float] | None = None, grid: Sequence[Sequence[float]] | None = None,
                         limit: int | None = None, progress: bool = False) -> tuple[list[OperatingPoint], Path]:
    """Calibrate the checkpoint's model on ``bundle`` (thresholds from the validation split,
    operating points measured one sample at a time on the same split, batch 1) and store the
    points in the checkpoint (or in ``out``); the weights are unchanged."""
    from edgeweave.checkpoint import load_checkpoint, save_checkpoint
    from edgeweave.exits.calibrate import calibrate

    model, spec, extra = load_checkpoint(path)
    if not isinstance(model, MultiExitNet):
        raise EdgeweaveError(f"{path}: {spec.name} is not a multi-exit model")
    points = calibrate(model, bundle.val, bundle.val, confidence=confidence, voting_weights=voting_weights,
                       grid=grid, limit=limit, progress=progress)
    extra = dict(extra)
    extra[EXTRA_KEY] = exits_extra(points, dataset=getattr(bundle, "name", "?"), split="val",
                                   samples=min(limit or len(bundle.val), len(bundle.val)))
    target = Path(out) if out is not None else Path(path)
    save_checkpoint(target, model, spec, extra)
    return points, target
