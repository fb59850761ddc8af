"""One on-demand policy over every variant a cluster holds: a request's latency budget or accuracy
target picks, among the variants of a variant set (models/variants.py), their operating points
and the cluster plans in use now, the configuration that serves it best.

Every variant is a multi-exit model whose trunk runs over the cluster segment by segment
(``runtime.exits.ClusterExits``); its calibrated points keep their accuracies (placement does not
change an answer) and get latencies predicted for the current plans from measured segment times.
The policy (``exits.policy``) then sees one list of ``VARIANT/POINT`` configurations: the most
accurate one whose p95 fits the budget, the fastest one reaching the accuracy target, or the
honest "cannot" with the closest configuration.

A device failing during a frame regroups the session once and plans every variant's segments
again over the devices left; the frame runs again there.

Operating points travel in the variant set's checkpoint: ``extra["variant_points"]`` maps each
variant to its calibrated points (``variants_extra`` writes it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.exits.calibrate import OperatingPoint
from edgeweave.exits.ondemand import Prediction
from edgeweave.exits.policy import Choice, choose, default_point, split_name, variant_points
from edgeweave.models.variants import VariantSet
from edgeweave.runtime.exits import ClusterExits, ClusterOnDemand

EXTRA_KEY = "variant_points"


def variants_extra(points: Mapping[str, Sequence[OperatingPoint]]) -> dict[str, Any]:
    """What a variant set's checkpoint stores: every variant's calibrated points."""
    return {name: {"operating_points": [p.to_dict() for p in pts]} for name, pts in points.items()}


def points_from_variants_extra(extra: Mapping[str, Any]) -> dict[str, list[OperatingPoint]]:
    data = (extra or {}).get(EXTRA_KEY, {})
    return {name: [OperatingPoint.from_dict(d) for d in v.get("operating_points", [])] for name, v in data.items()}


def combine_checkpoints(variants: Mapping[str, str | Path], out: str | Path) -> tuple[Path, dict[str, list[OperatingPoint]]]:
    """Calibrated multi-exit checkpoints (``exits calibrate``) as one variant set at ``out``,
    each variant under its name with its operating points. They must classify the same task:
    same classes, input channels and input size."""
    from edgeweave.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
    from edgeweave.exits.ondemand import points_from_extra
    from edgeweave.models.multi_exit import MultiExitNet
    from edgeweave.models.variants import variant_entry

    if len(variants) < 1:
        raise EdgeweaveError("give at least one variant (NAME=CHECKPOINT)")
    models, entries, points, first = {}, [], {}, None
    for name, path in variants.items():
        model, spec, extra = load_checkpoint(path)
        if not isinstance(model, MultiExitNet):
            raise EdgeweaveError(f"{path}: {spec.name} is not a multi-exit model")
        pts = points_from_extra(extra)
        if not pts:
            raise EdgeweaveError(f"{path} has no operating points: run `edgeweave exits calibrate {path}` first")
        task = (spec.num_classes, spec.in_channels, tuple(spec.input_size))
        if first is not None and task != first[1]:
            raise EdgeweaveError(f"{path} classifies {task[0]} classes from {task[1]}x{task[2][0]}x{task[2][1]} inputs; "
                                 f"{first[0]} {first[1][0]} from {first[1][1]}x{first[1][2][0]}x{first[1][2][1]}")
        first = first or (path, task)
        models[name], points[name] = model, pts
        entries.append(variant_entry(name, spec.name, **spec.kwargs))
    from edgeweave.models.variants import VariantSet

    assert first is not None
    n_cls, ch, size = first[1]
    vset = VariantSet(models)
    spec = ModelSpec("variant_set", n_cls, ch, size, {"variants": entries})
    spec.build()  # the stored spec must rebuild the set (names checked there)
    return save_checkpoint(out, vset, spec, {EXTRA_KEY: variants_extra(points)}), points


class VariantsOnDemand:
    """``vset`` (already loaded on ``session``) with ``points[variant]`` calibrated per variant;
    ``plan_kwargs`` go to every segment's ``make_plan``. The same interface as
    ``exits.ondemand.OnDemandModel`` (choose, predict, points), so ``serving.ondemand`` serves it."""

    def __init__(self, session: Any, vset: VariantSet, points: Mapping[str, Sequence[OperatingPoint]],
                 input_shape: Sequence[int], *, model_name: str = "", default: str | None = None,
                 **plan_kwargs: Any) -> None:
        if not isinstance(vset, VariantSet):
            raise EdgeweaveError("on-demand over variants needs a variant set (models/variants.py)")
        missing = [v for v in vset.names if not points.get(v)]
        if missing:
            raise EdgeweaveError(f"variants without operating points: {', '.join(missing)} (calibrate them first)")
        self.session, self.vset, self.default, self.load_tracker = session, vset, default, None
        self.model_spec: Any = None
        self.members: dict[str, ClusterOnDemand] = {}
        for name in vset.names:
            ce = ClusterExits(session, vset.variant(name), input_shape, model_name=model_name, variant=name,
                              **plan_kwargs)
            self.members[name] = ClusterOnDemand(ce, points[name])
        self.exits_taken: list[tuple[str, int]] = []

    # -- what the policy sees --------------------------------------------------------------------
    @property
    def points(self) -> list[OperatingPoint]:
        """Every (variant, point) priced for the current plans, named ``VARIANT/POINT``."""
        return variant_points({name: m.points for name, m in self.members.items()})

    @property
    def devices(self) -> list[str]:
        return list(self.session.names)

    @property
    def lost(self) -> list[str]:
        return [d for m in self.members.values() for d in m.lost]

    def num_exits(self, point: OperatingPoint) -> int:
        return self.members[split_name(point.name)[0]].exits.num_exits

    def choose(self, latency_budget_ms: float | None = None, min_accuracy: float | None = None) -> Choice:
        pts = self.points
        if latency_budget_ms is None and min_accuracy is None:
            p = default_point(pts, self.default)
            return Choice(p, True, f"no constraint: default configuration {p.name}")
        return choose(pts, latency_budget_ms=latency_budget_ms, min_accuracy=min_accuracy)

    # -- frames ----------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Every variant's segments once, so every configuration is priced on measured times."""
        for m in self.members.values():
            m.warm_up()

    def replan(self) -> None:
        """Every variant's segments planned again over the session's devices (after a regroup)."""
        for m in self.members.values():
            m.exits.load_plans()

    def predict(self, x: torch.Tensor, latency_budget_ms: float | None = None,
                min_accuracy: float | None = None) -> Prediction:
        return self.run(x, self.choose(latency_budget_ms, min_accuracy))

    def run(self, x: torch.Tensor, c: Choice) -> Prediction:
        """One frame at the chosen configuration (``c.point`` named ``VARIANT/POINT``)."""
        variant, _ = split_name(c.point.name)
        member = self.members[variant]
        pred = member.run(x, c, replan=self.replan)
        if self.lost:  # a regroup re-planned every variant: re-price the others too
            for m in self.members.values():
                if m is not member:
                    m.points = m.exits.cluster_points(m.base_points)
        self.exits_taken.append((variant, int(pred.exits[0])))
        del self.exits_taken[:-4096]
        return pred

    def skipped_fraction(self) -> float:
        """The share of later-segment work the followers did not do because frames exited, over
        the frames served (each weighed by its variant's work after its first segment)."""
        done = skipped = 0.0
        for variant, k in self.exits_taken:
            flops = self.members[variant].exits.flops
            done += sum(flops[1:])
            skipped += sum(flops[k + 1:])
        return skipped / done if done > 0 else 0.0


__all__ = ["EXTRA_KEY", "VariantsOnDemand", "combine_checkpoints", "points_from_variants_extra", "variants_extra"]
