"""Serving a stream of frames with adaptive re-planning (the leader's side).

The leader runs each frame with the current plan, reads every device's measured compute time
from the timings the followers return anyway, and lets :mod:`edgeweave.planning.adapt` update
its speed estimates and decide whether a new plan (made by the pure planner under the
estimated profiles) is worth loading. The session still only executes plans; the decisions
are pure functions of measurements. ``AdaptiveStream`` keeps its state between calls, so a
caller can serve a stream in pieces (a benchmark changes a CPU cap between pieces).

A device that dies, hangs or loses its link does not end the stream: the session regroups with
the devices still there (``Session.recover``), the stream re-plans for them under its current
speed estimates, and the frame that failed runs again (in-flight work is retried, not lost).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.planning import adapt as A
from edgeweave.planning.plan import Plan
from edgeweave.profiling.profile import Cluster
from edgeweave.runtime.wire import PeerError

Planner = Callable[[Any, Cluster, Plan], Plan]  # (graph, estimated cluster, current plan) -> plan
KEEP_PLANS = 8  # plans a stream keeps loaded to go back to; each costs memory on every board


def default_planner(gm: Any, cluster: Cluster, current: Plan) -> Plan:
    """Same partitioner, fusion and mode as the current plan, under the estimated profiles, with
    the strips' order searched again (``make_plan`` does where links differ).

    Why search: a device whose speed changed much may belong elsewhere in the line. Bench
    edgedi run AH kept the order after w2's cap dropped to 0.1 core, so w2 stayed in the middle
    with 2 of 50 rows and two neighbours waiting for it at each of 10 stage boundaries: 0.41 s a
    frame; the searched order puts it at an end (9 stages) and ran 0.30 s (10 interleaved rounds
    on one testbed; predicted 0.354 against 0.293 s). The search costs 0.55 s of planning against
    0.13 s with the order given, on one host core (2.3-2.5 s per re-plan on a 0.25-core leader)."""
    from edgeweave.planning.planner import make_plan

    return make_plan(gm, cluster, partition=current.partition, fusion=current.fusion, mode=current.mode,
                     model_name=current.model, model_hash=current.model_hash,
                     backend=str(current.meta.get("backend_request", "torch")),
                     split=str(current.meta.get("split_request", "auto")))


@dataclass
class FrameRecord:
    index: int
    latency_s: float  # wall time of the inference at the leader
    plan_id: int
    plan_version: int  # 0 = the plan the stream started with, +1 per re-plan
    predicted_s: float  # the plan's own prediction (under the factors it was made with)
    estimated_s: float  # the plan re-priced under the estimate after this frame
    factors: list[float]  # per-device speed factors after this frame (1 = as profiled)
    compute_s: list[float]  # measured compute seconds per device
    event: str = ""  # "" | "kept" (change evaluated, plan kept) | "replanned" | "regrouped" (a device left)
    reused: bool = False  # the re-plan went back to a plan measured under these speeds before
    reverted: bool = False  # the re-plan undid the previous one, which ran slower (adapt rule 5)
    # an idle slow device was probed (adapt rule 6): re-planned for, or kept when no probe was worth a trial
    probe: bool = False
    candidate_s: float | None = None
    gain: float | None = None
    replan_s: float = 0.0  # planning + loading time spent after this frame (not in latency_s)
    changed: list[int] = field(default_factory=list)
    latency_ratio: float = 1.0  # measured / estimated latency over recent steady frames
    calibrated_s: float = 0.0  # estimated_s * latency_ratio: the stream's latency prediction
    lost: list[str] = field(default_factory=list)  # devices left out when this frame failed (it then ran again)
    joined: list[str] = field(default_factory=list)  # devices taken in before this frame
    regroup_s: float = 0.0  # failed attempt + new generation + new plan, before the frame ran (not in latency_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Regroup:
    """A change of the devices before a frame ran: who left (after a failure) and who joined."""

    lost: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Frame:
    """A frame that ran and has not been learnt from yet (see :meth:`AdaptiveStream.run`)."""

    timings: Any
    change: Regroup | None = None


@dataclass
class Trial:
    """A re-plan under test (adapt rule 5): what to go back to, and the evidence."""

    plan: Plan
    plan_id: int
    factors: list[float]  # the speeds the old plan's prediction assumed
    before_s: list[float]  # the old plan's last frames
    levels: dict[int, float]  # device -> its factor before the change that caused the re-plan
    believed: dict[int, float]  # device -> the factor believed
    after_s: list[float] = field(default_factory=list)


class AdaptiveStream:
    """Serve frames on ``session`` starting with ``plan`` (made on ``base``'s profiles, or on
    ``base`` scaled by ``factors``), re-planning with ``planner`` when the policy says so."""

    def __init__(self, session: Any, plan: Plan, base: Cluster, *, policy: A.AdaptPolicy | None = None,
                 planner: Planner = default_planner, plan_id: int | None = None,
                 factors: list[float] | None = None, admit_every_s: float = 1.0):
        k = len(plan.devices)
        if [d.name for d in base.devices[:k]] != list(plan.devices):
            raise EdgeweaveError(f"the base cluster's devices {[d.name for d in base.devices]} do not start with the "
                                 f"plan's {plan.devices}")
        self.session, self.policy, self.planner = session, policy or A.AdaptPolicy(), planner
        self.base = Cluster(base.devices[:k])
        self.profiles = {d.name: d for d in base.devices}  # for a regroup: the base profiles by name
        self.k = k
        self.state = A.AdaptState.start(k, factors)
        self.admit_every_s, self._admitted_at = admit_every_s, time.monotonic()
        self._pending: Regroup | None = None  # devices taken in after the last frame, reported with the next
        self.version = 0
        # the recent frames (a server runs for days; callers keep what step() returns if they want all)
        self.records: deque[FrameRecord] = deque(maxlen=64)
        self.frames = 0
        # the plans served, least recently used first, at most KEEP_PLANS: (plan, the speeds its
        # prediction assumes, steady samples of (speed estimates, measured latency)); the stream may
        # go back to one (adapt rule 4)
        self.known: dict[int, tuple[Plan, list[float], list[tuple[list[float], float]]]] = {}
        self.trial: Trial | None = None
        self._use(plan, plan_id if plan_id is not None else session.load_plan(plan), list(self.state.factors))

    def _load(self, plan: Plan) -> int:
        """Load ``plan`` on the session; the least recently used plans beyond ``KEEP_PLANS`` are
        dropped with it (never the one in use, which a trial would go back to)."""
        spare = [p for p in self.known if p != self.plan_id]
        drop = spare[: max(0, len(self.known) + 1 - KEEP_PLANS)]
        pid = self.session.load_plan(plan, drop=drop)
        for p in drop:
            del self.known[p]
        return pid

    def _use(self, plan: Plan, pid: int, factors: list[float]) -> None:
        # ``factors``: the speeds the plan's own prediction assumes (re-pricing starts from them)
        self.plan, self.plan_id, self.plan_factors = plan, pid, factors
        self.known[pid] = self.known.pop(pid, None) or (plan, factors, [])  # now the most recently used
        self.gm = self.session.plans[pid][1]
        self.works = A.stage_works(self.gm, plan)
        # every device priced on the backend it computes with under this plan
        priced = Cluster([p.on(plan.backends[d] if d < len(plan.backends) else "torch")
                          for d, p in enumerate(self.base.devices)])
        self.comp_base = A.stage_compute(self.works, priced)
        # Speed samples come from the stages that are split (their time scales with the planned
        # FLOPs); the leader's whole-map stages (pooling heads, attention scales, ...) are small
        # and dominated by fixed costs, so they would bias the leader's factor.
        # A plan that leaves everything to the leader is one leader stage (planner._merge_leader_runs):
        # then that stage is the whole model, and it says how fast the leader is.
        alone = all(a.out_rows[1] <= a.out_rows[0] for st in plan.stages for a in st.assignments if a.device != 0)
        self.sampled_stages = [s for s, st in enumerate(plan.stages)
                               if st.kind in ("spatial", "linear") or (alone and st.kind == "leader")]
        self.pred_base = [sum(self.comp_base[s][d] for s in self.sampled_stages) for d in range(self.k)]
        self.scale_base = A.stage_scaling(plan, self.comp_base, priced)  # what a speed change moves

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, FrameRecord]:
        """Run one frame and learn from it (which may re-plan before the next)."""
        y, frame = self.run(x)
        return y, self.learn(frame)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        """The inference half of :meth:`step`: a server answers after it and calls :meth:`learn`
        before the next frame (re-planning takes seconds on a slow leader; the answer need not wait)."""
        y, tm, change = self._infer(x)
        return y, Frame(tm, change)

    def learn(self, frame: Frame) -> FrameRecord:
        """Update the speed estimates from ``frame`` and re-plan when the policy says so."""
        tm, change = frame.timings, frame.change
        self.last_timings = tm
        measured = [sum(tm.per_device[d][s].compute_s for s in self.sampled_stages) for d in range(self.k)]
        self.state, changed = A.observe(self.state, self.policy, self.pred_base, measured)
        rec = FrameRecord(self.frames, tm.total_s, self.plan_id, self.version, self.plan.predicted_s, 0.0,
                          list(self.state.factors), measured, changed=changed)
        if change is not None:
            rec.event, rec.lost, rec.joined, rec.regroup_s = "regrouped", change.lost, change.joined, change.seconds
        # the plan that ran, re-priced under the updated estimate: the latency ratio's sample,
        # and the current plan's side of an evaluation
        estimated = A.reprice(self.plan, self.scale_base, self.plan_factors, self.state.factors)
        if not changed:
            self.state = A.observe_latency(self.state, self.policy, tm.total_s, estimated)
            if self.state.frames > self.policy.warmup and not any(self.state.recent):
                samples = self.known[self.plan_id][2]
                samples.append((list(self.state.factors), tm.total_s))
                del samples[:-self.policy.ratio_window]
        if self.trial is not None and A.deepened(self.state, self.trial.believed, self.trial.levels, changed):
            self.trial = None  # void: re-plan for the deeper change now (adapt rule 5)
        if self.trial is not None and self._judge(tm.total_s):
            rec.event, rec.reverted = "replanned", True
            estimated = A.reprice(self.plan, self.scale_base, self.plan_factors, self.state.factors)
        # while a re-plan is under test, the test decides first (a change stays believed until then)
        if not rec.reverted and self.trial is None and A.evaluation_due(self.state, self.policy, changed):
            t0 = time.perf_counter()
            trial = self._trial(tm.total_s, {d: self.state.basis[d] for d in changed},
                                {d: self.state.factors[d] for d in changed})
            cand = self.planner(self.gm, A.scaled_cluster(self.base, self.state.factors), self.plan)
            dec = A.decide(self.policy, estimated, cand.predicted_s)
            rec.candidate_s, rec.gain = cand.predicted_s, dec.gain
            known = A.best_measured({pid: k[2] for pid, k in self.known.items() if pid != self.plan_id},
                                    self.state.factors, self.policy)
            choice = A.choose(self.policy, dec, A.calibrated(self.state, cand.predicted_s),
                              A.calibrated(self.state, estimated), known[1] if known else None)
            if choice == "candidate":
                self._use(cand, self._load(cand), list(self.state.factors))
                estimated = cand.predicted_s  # made under these very factors
            elif choice == "known":
                assert known is not None
                plan, factors, _ = self.known[known[0]]
                self._use(plan, known[0], factors)
                estimated = A.reprice(plan, self.scale_base, factors, self.state.factors)
                rec.reused = True
            if choice != "current":
                self.trial = trial
                self.version += 1
                rec.event = "replanned"
            else:
                rec.event = "kept"
            self.state = A.rebase(self.state)
            rec.replan_s = time.perf_counter() - t0
        elif not rec.reverted and self.trial is None and (tries := A.probe(self.state, self.policy)):
            t0 = time.perf_counter()
            rec.event, rec.probe = "kept", True
            for levels in tries:  # the first probe that changes the split enough is tried
                trial = self._trial(tm.total_s, {d: self.state.factors[d] for d in levels}, dict(levels))
                probed = A.start_probe(self.state, levels)
                cand = self.planner(self.gm, A.scaled_cluster(self.base, probed.factors), self.plan)
                now = A.reprice(self.plan, self.scale_base, self.plan_factors, probed.factors)
                rec.candidate_s = cand.predicted_s
                if A.decide(self.policy, now, cand.predicted_s).replan:
                    self.state = probed
                    self._use(cand, self._load(cand), list(self.state.factors))
                    self.trial = trial
                    self.version += 1
                    rec.event = "replanned"
                    estimated = cand.predicted_s
                    break
            else:  # none worth a trial: keep the estimate, try again later
                self.state = A.refute(probed, self.policy, trial.levels, trial.believed)
            rec.replan_s = time.perf_counter() - t0
        rec.estimated_s = estimated
        rec.latency_ratio = self.state.latency_ratio
        rec.calibrated_s = A.calibrated(self.state, estimated)
        self.records.append(rec)
        self.frames += 1
        self._admit()
        return rec

    def _admit(self) -> None:
        """Take in the devices that registered since (a board that came back), at most once every
        ``admit_every_s``, and plan for them. Done after a frame was learnt from, not before the
        next one runs, so a server has already answered (a new group, shipping the model and
        preparing the plan take seconds); the next frame reports the change."""
        now = time.monotonic()
        if now - self._admitted_at < self.admit_every_s:
            return
        self._admitted_at = now
        if not (new := self.session.newcomers()):
            return
        change, t0 = Regroup(), time.perf_counter()
        try:
            self.session.regroup(join=new)
        except EdgeweaveError:  # one of them never joined the group: go on without it
            change.lost += self.session.recover()
        change.joined = [n for n in new if n in self.session.names]
        for _ in range(2):  # a newcomer may die at once; else the next frame's retry loop plans
            try:
                if self.plan_id not in self.session.plans:
                    self._regrouped()
                break
            except PeerError as e:
                change.lost += self.session.recover(suspects=[e.name] if e.name else [])
        change.seconds += time.perf_counter() - t0
        self._pending = change

    def _infer(self, x: torch.Tensor) -> tuple[torch.Tensor, Any, Regroup | None]:
        """One inference on the current devices; when it fails, the stream regroups with the
        devices still there, re-plans and runs it again. A second failure with every device still
        there is not a device that left (a bad input, a bug): it is raised."""
        change, self._pending = self._pending, None
        failed = False
        while True:
            t0 = time.perf_counter()
            try:
                if change is not None and self.plan_id not in self.session.plans:  # a new generation
                    self._regrouped()
                    change.seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                y, tm = self.session.infer(x, self.plan_id)
                return y, tm, change
            except PeerError as e:  # the failed attempt's time counts as the regroup's
                gone = self.session.recover(suspects=[e.name] if e.name else [])
                if failed and not gone:
                    raise
                failed = True
                change = change or Regroup()
                change.lost += gone
                change.seconds += time.perf_counter() - t0

    def _regrouped(self) -> None:
        """Start over on the session's new membership: each device keeps its speed estimate,
        the plan is made again for these devices (adapt's history belongs to the old ones)."""
        names = self.session.names
        self.base = Cluster([self.profiles.get(n, p) for n, p in zip(names, self.session.cluster.devices)])
        factors = A.carried_factors(self.plan.devices, self.state.factors, names)
        self.k = len(names)
        self.state = A.AdaptState.start(self.k, factors)
        self.known, self.trial = {}, None
        self.version += 1
        plan = self.planner(self.gm, A.scaled_cluster(self.base, factors), self.plan)
        self._use(plan, self._load(plan), factors)

    def _trial(self, latency_s: float, levels: dict[int, float], believed: dict[int, float]) -> Trial:
        """A test of leaving the current plan, judged against its last ``patience`` latencies
        (this frame's included)."""
        ran = [r.latency_s for r in self.records if r.plan_version == self.version] + [latency_s]
        return Trial(self.plan, self.plan_id, self.plan_factors, ran[-self.policy.patience:], levels, believed)

    def _judge(self, latency_s: float) -> bool:
        """Add a frame to the re-plan under test; once it has ``patience`` frames after its
        first, go back if they ran slower than the plan before (adapt rule 5). True when it went back."""
        t = self.trial
        assert t is not None
        t.after_s.append(latency_s)
        # the new plan's first frame is not evidence: new strip shapes run it 20-30 % slow
        if len(t.after_s) < self.policy.patience + 1:
            return False
        self.trial = None
        if not A.worse(self.policy, t.before_s, t.after_s[1:]):
            return False
        self._use(t.plan, t.plan_id, t.factors)
        self.state = A.refute(self.state, self.policy, t.levels, t.believed,
                              A.confirmed_by(self.state, self.policy, t.believed, t.levels))
        self.version += 1
        return True

    def serve(self, frames: Iterable[torch.Tensor]) -> list[FrameRecord]:
        return [self.step(x)[1] for x in frames]


def serve_stream(session: Any, frames: Iterable[torch.Tensor], plan: Plan, base: Cluster, *,
                 policy: A.AdaptPolicy | None = None, planner: Planner = default_planner) -> list[FrameRecord]:
    """Serve ``frames`` adaptively from ``plan``; one record per frame (see :class:`FrameRecord`)."""
    return AdaptiveStream(session, plan, base, policy=policy, planner=planner).serve(frames)
