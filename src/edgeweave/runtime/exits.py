"""Early exits over the cluster: a multi-exit model's trunk runs distributed, segment by segment,
and a frame whose exit is confident enough ends there: the followers are never started on the
later segments for it.

Each trunk segment (from one exit to the next, models/multi_exit.py) is planned over the
cluster like any model and loaded as its own plan, naming the piece it runs
(``plan.meta["part"]``; leader and followers cut the same piece out of the weights they hold).
The last segment is planned with its head. A frame runs segment 0's plan; the segment's output
arrives on the leader, which runs the exit's head (a pooling and a linear layer or two) and
compares the confidence with the operating point's threshold; below it, segment 1's plan starts
from that output, and so on. Every exit's logits equal the single-device multi-exit model's up
to float rounding, since every plan is exact.

Latencies: the seconds each segment takes on the cluster (measured, a running mean) give every
operating point's latency under the current plans from its exit proportions
(:meth:`ClusterExits.point_latency_ms`), so a re-plan re-predicts them without re-measuring
accuracy, which does not depend on where the trunk runs.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from edgeweave.errors import EdgeweaveError
from edgeweave.exits.confidence import confidence as confidence_of
from edgeweave.exits.inference import check_thresholds
from edgeweave.exits.ondemand import OnDemandModel, Prediction
from edgeweave.exits.policy import Choice
from edgeweave.exits.voting import check_weights, vote_probs
from edgeweave.models.multi_exit import MultiExitNet, exit_part

RECENT = 64  # frames per segment kept for its p95


@dataclass
class ExitAnswer:
    probs: torch.Tensor  # (1, C): the exit's softmax, or the vote's
    exit_index: int
    voted: bool
    confidence: float
    segment_s: list[float]  # seconds of each segment run (cluster plan + head on the leader)
    logits: list[torch.Tensor]  # every exit reached, in order

    @property
    def latency_s(self) -> float:
        return sum(self.segment_s)


class ClusterExits:
    """``model`` (already loaded on ``session`` with ``load_model``) planned segment by segment
    over the session's devices. ``plan_kwargs`` go to ``make_plan`` (partition, fusion, split,
    backend, ...). ``variant``: the session holds a variant set (models/variants.py) and
    ``model`` is its variant of that name."""

    def __init__(self, session: Any, model: MultiExitNet, input_shape: Sequence[int], *, model_name: str = "",
                 variant: str | None = None, **plan_kwargs: Any):
        if not isinstance(model, MultiExitNet):
            raise EdgeweaveError("exits over the cluster need a multi-exit model")
        self.session, self.model, self.model_name, self.variant = session, model.eval(), model_name, variant
        self.input_shape = tuple(int(v) for v in input_shape)
        self.plan_kwargs = plan_kwargs
        self.plans: list[Any] = []
        self.pids: list[int] = []
        self.flops: list[float] = []
        self._seconds: list[float | None] = []
        self.load_plans()

    @property
    def num_exits(self) -> int:
        return self.model.num_exits

    def parts(self) -> list[dict[str, Any]]:
        k = self.num_exits
        named = {"variant": self.variant} if self.variant is not None else {}
        return [{**named, "segment": i, **({"head": True} if i == k - 1 else {})} for i in range(k)]

    def load_plans(self) -> None:
        """Plan every segment over the session's devices as they are now (again after a regroup)."""
        from edgeweave.planning.cost import node_flops
        from edgeweave.planning.graph import capture
        from edgeweave.planning.planner import make_plan

        s = self.session
        old = list(self.pids)
        self.plans, self.pids, self.flops = [], [], []
        shape = self.input_shape
        with torch.no_grad():
            h = torch.zeros(shape)
            for part in self.parts():
                piece = exit_part(self.model, {k: v for k, v in part.items() if k != "variant"})
                gm = capture(piece, shape)
                name = f"{self.model_name}:{self.variant}" if self.variant is not None else self.model_name
                plan = make_plan(gm, s.cluster, model_name=f"{name}#{part['segment']}",
                                 model_hash=str(s.model_hash), **self.plan_kwargs)
                plan.meta["part"] = part
                self.plans.append(plan)
                self.pids.append(s.load_plan(plan, drop=old if not self.pids else ()))
                self.flops.append(sum(node_flops(gm, n) for n in gm.graph.nodes))
                h = piece(h)
                shape = tuple(h.shape)
        self.forget_times()

    # -- one frame -----------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, x: torch.Tensor, thresholds: Sequence[float], *, voting_weights: Sequence[float] | None = None,
              confidence: str = "max_softmax") -> ExitAnswer:
        """One frame (batch 1): segments over the cluster until an exit is confident enough."""
        k_exits = self.num_exits
        thr = check_thresholds(thresholds, k_exits)
        weights = check_weights(voting_weights, k_exits)
        if tuple(x.shape) != self.input_shape:
            raise EdgeweaveError(f"input shape {list(x.shape)}; the plans were made for {list(self.input_shape)}")
        h, history, logits, seconds = x, [], [], []
        for k in range(k_exits):
            t0 = time.perf_counter()
            out, _tm = self.session.infer(h, self.pids[k])
            last = k == k_exits - 1
            if last:
                z = out
            else:
                h = out
                z = self.model.heads[k](h)  # on the leader: a pooling and a linear layer or two
            seconds.append(time.perf_counter() - t0)
            logits.append(z)
            probs = F.softmax(z, dim=-1)
            history.append(probs)
            conf = float(confidence_of(probs, confidence)[0])
            if conf >= thr[k] or last:
                voted = last and conf < thr[k]
                if voted:
                    probs = vote_probs(history, weights)
                self._learn(seconds)
                return ExitAnswer(probs, k, voted, conf, seconds, logits)
        raise AssertionError("unreachable: the last exit always answers")

    def forget_times(self) -> None:
        """Price the segments on their plans' predictions again until frames are measured."""
        self._seconds = [None] * self.num_exits
        self._recent: list[deque[float]] = [deque(maxlen=RECENT) for _ in range(self.num_exits)]

    def _learn(self, seconds: list[float]) -> None:
        for k, sec in enumerate(seconds):
            old = self._seconds[k]
            self._seconds[k] = sec if old is None else 0.8 * old + 0.2 * sec
            self._recent[k].append(sec)

    # -- operating points on this cluster --------------------------------------------------------
    def segment_seconds(self) -> list[float]:
        """Seconds each segment takes on the cluster now: measured (a running mean), else the
        plan's prediction."""
        return [s if s is not None else p.predicted_s for s, p in zip(self._seconds, self.plans)]

    def segment_p95_seconds(self) -> list[float]:
        """Each segment's 95th percentile over its recent frames (from 5 on), else its mean."""
        means = self.segment_seconds()
        # a sorted copy, not numpy: priced after every frame on a 0.25-core leader, numpy's
        # percentile of a deque (144 us) times every point made requests wait for their prices
        return [sorted(r)[math.ceil(0.95 * len(r)) - 1] if len(r) >= 5 else m for r, m in zip(self._recent, means)]

    def point_latency_ms(self, point: Any, times: tuple[list[float], list[float]] | None = None) -> dict[str, float]:
        """An operating point's latency on this cluster from its exit proportions (a voted frame
        ran every segment, calibration counts it at the last exit): the mean and median from each
        segment's mean time; the p95 from each segment's p95, at the first exit by which at least
        96 % of frames have left (one point of margin: proportions calibrated on one split move
        on another, and a frame near the boundary must not be priced at the earlier exit)."""
        cum, cum95 = times if times is not None else self.cumulative_ms()
        props = list(point.exit_proportions) + [0.0] * (self.num_exits - len(point.exit_proportions))
        total = sum(props) or 1.0
        mean = sum(p * c for p, c in zip(props, cum)) / total

        def quantile(q: float, reach_ms: list[float]) -> float:
            acc = 0.0
            for p, c in zip(props, reach_ms):
                acc += p / total
                if acc >= q - 1e-12:
                    return c
            return reach_ms[-1]

        return {"mean_ms": mean, "p50_ms": quantile(0.5, cum), "p95_ms": quantile(0.96, cum95)}

    def cumulative_ms(self) -> tuple[list[float], list[float]]:
        """Milliseconds to reach each exit: from the segments' means, and from their p95s."""
        def cumulative(secs: list[float]) -> list[float]:
            out, t = [], 0.0
            for sec in secs:
                t += sec
                out.append(1e3 * t)
            return out

        return cumulative(self.segment_seconds()), cumulative(self.segment_p95_seconds())

    def cluster_points(self, points: Sequence[Any]) -> list[Any]:
        """``points`` with their latencies predicted for this cluster (accuracy unchanged)."""
        times = self.cumulative_ms()
        return [replace(p, **self.point_latency_ms(p, times)) for p in points]

    def skipped_fraction(self, exits: Sequence[int]) -> float:
        """The share of the work after the first segment that frames leaving at ``exits`` did not
        ask of the cluster (FLOPs of the segments they never ran)."""
        later = sum(self.flops[1:])
        if not exits or later <= 0:
            return 0.0
        skipped = sum(sum(self.flops[k + 1:]) for k in exits)
        return skipped / (later * len(exits))


class ClusterOnDemand(OnDemandModel):
    """The on-demand policy (``exits.ondemand``) with the trunk on the cluster: a request's
    latency budget or accuracy target picks the operating point whose latency, predicted for the
    cluster's current plans from measured segment times, meets it; the frame then runs its
    segments over the cluster until an exit is confident enough."""

    def __init__(self, exits: ClusterExits, points: Sequence[Any], default: str | None = None,
                 model_spec: Any = None):
        super().__init__(exits.model, list(points), default, adapt_to_load=False, model_spec=model_spec)
        self.exits, self.base_points = exits, list(points)
        self.points = exits.cluster_points(self.base_points)
        self.exits_taken: list[int] = []
        self.lost: list[str] = []  # devices left out after a failure

    @property
    def devices(self) -> list[str]:
        return list(self.exits.session.names)

    def warm_up(self) -> None:
        """Every segment twice (the last exit forced), so the points are priced on measured
        times; the first frame's are forgotten (a plan's first frame pays for lazy set-up: on the
        testbed at 0.25 core it took up to 2.5x a later one)."""
        k = self.exits.num_exits
        for _ in range(2):
            self.exits.forget_times()
            self.exits.infer(torch.zeros(self.exits.input_shape), [2.0] * (k - 1) + [0.0])
        self.points = self.exits.cluster_points(self.base_points)

    def predict(self, x: torch.Tensor, latency_budget_ms: float | None = None,
                min_accuracy: float | None = None) -> Prediction:
        return self.run(x, self.choose(latency_budget_ms, min_accuracy))

    def run(self, x: torch.Tensor, c: Choice, replan: Callable[[], None] | None = None) -> Prediction:
        """One frame at the chosen point. A device failing during it: the session regroups
        without it, ``replan`` (default: this model's segments) plans again, and the frame runs
        once more on the devices left."""
        p = c.point
        try:
            ans = self.exits.infer(x, p.thresholds, voting_weights=p.voting_weights or None, confidence=p.confidence)
        except EdgeweaveError as e:
            if self.exits.session.broken is None:
                raise
            # a device failed: go on with the others (segments planned again over them), once
            from edgeweave.serving.server import ClusterFailed

            try:
                self.lost += self.exits.session.recover(suspects=[e.name] if getattr(e, "name", None) else ())
                (replan or self.exits.load_plans)()
                ans = self.exits.infer(x, p.thresholds, voting_weights=p.voting_weights or None,
                                       confidence=p.confidence)
            except EdgeweaveError as e2:
                raise ClusterFailed(f"inference failed: {e}; after regrouping: {e2}") from None
        self.points = self.exits.cluster_points(self.base_points)  # re-priced on what the frame measured
        self.exits_taken.append(ans.exit_index)
        del self.exits_taken[:-4096]
        return Prediction(ans.probs.argmax(-1), torch.tensor([ans.exit_index]), torch.tensor([ans.voted]), c,
                          1e3 * ans.latency_s, ans.probs, torch.tensor([ans.confidence]))

    def skipped_fraction(self) -> float:
        return self.exits.skipped_fraction(self.exits_taken)
