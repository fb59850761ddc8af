"""Throughput plans: the cluster divided into groups that serve frames concurrently.

A stream of frames arrives at the leader (``cluster.devices[0]``), which also returns every
answer. One :class:`~edgeweave.planning.plan.Plan` over all devices serves one frame at a time;
for a stream it can pay to cut the cluster into disjoint *groups* instead (DESIGN.md, "Frames in
flight"), each group serving whole frames with its own ordinary plan (``make_plan`` on the
sub-cluster of its devices), one frame at a time per group, all groups at once.

A group's first device is its *head*: device 0 of its plan, which holds the frame's input, runs
the leader-only stages and ends with the output. The leader is the head of its own group; any
other group's head is its fastest device (smallest predicted time running the whole model
alone), and a frame served there also costs the input's trip from the leader to the head and
the output's trip back (``cost.transfer_s``).

Predictions (seconds per frame, frames per second) come from the same cost model as the plans:
a group's ``latency_s`` is its plan's ``predicted_s`` plus those two trips, and a grouping's
``fps`` at saturation is the sum of ``1 / latency_s`` over its groups. Not modelled: the leader's
link carrying every other group's frames too, and the leader's CPU time relaying them.

:func:`plan_groups` picks, among candidate groupings, the one with the highest predicted fps whose
every group keeps the per-frame latency SLO; :func:`one_group` is the plan of today, all devices
in one group. Pure: no processes, no clocks.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx

from edgeweave.errors import EdgeweaveError
from edgeweave.planning.cost import DTYPE_BYTES, transfer_s
from edgeweave.planning.plan import Plan
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster, DeviceProfile

# Every set partition is a candidate up to this many devices (Bell(6) = 203 groupings, 63 groups).
ALL_PARTITIONS_UP_TO = 6
# Predictions closer than this (relative) are equal: uniform devices give equal numbers.
_REL_TOL = 1e-9


@dataclass
class Group:
    """Devices that serve whole frames together under one plan."""

    devices: list[str]  # device names, head first (the plan's device order)
    plan: Plan  # make_plan on Cluster([profiles of devices in this order])
    latency_s: float  # predicted seconds per frame, leader <-> head transfers included (frames in flight too)
    fps: float = 0.0  # predicted frames per second of this group (0: 1 / latency_s)

    def rate(self) -> float:
        return self.fps or (1.0 / self.latency_s if self.latency_s > 0 else math.inf)

    def to_dict(self) -> dict[str, Any]:
        return {"devices": list(self.devices), "plan": self.plan.to_dict(), "latency_s": self.latency_s,
                "fps": self.fps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Group:
        return cls(devices=[str(x) for x in d["devices"]], plan=Plan.from_dict(d["plan"]),
                   latency_s=float(d["latency_s"]), fps=float(d.get("fps", 0.0)))


@dataclass
class GroupPlan:
    """The cluster divided into groups; ``feasible`` is False when no candidate grouping keeps
    ``slo_s`` (the plan is then the one with the lowest per-frame latency)."""

    groups: list[Group]
    slo_s: float | None = None
    feasible: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    slots: int = 1  # frames each group serves at once (runtime: Session.open_groups)

    @property
    def fps(self) -> float:
        """Predicted frames per second with every group busy."""
        return sum(g.rate() for g in self.groups)

    @property
    def latency_s(self) -> float:
        """Predicted per-frame latency of the slowest group."""
        return max((g.latency_s for g in self.groups), default=0.0)

    def group_of(self, name: str) -> int | None:
        """The index of the group device ``name`` belongs to (None: in no group)."""
        for i, g in enumerate(self.groups):
            if name in g.devices:
                return i
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups], "slo_s": self.slo_s, "feasible": self.feasible,
                "slots": self.slots, "fps": self.fps, "latency_s": self.latency_s, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupPlan:
        slo = d.get("slo_s")
        return cls(groups=[Group.from_dict(g) for g in d["groups"]], slo_s=None if slo is None else float(slo),
                   feasible=bool(d.get("feasible", True)), meta=dict(d.get("meta", {})), slots=int(d.get("slots", 1)))

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> GroupPlan:
        return cls.from_dict(json.loads(text))


def set_partitions(items: Sequence[int]) -> Iterator[list[list[int]]]:
    """Every partition of ``items`` into non-empty groups (each group in the items' order; the
    first partition yielded is everything in one group)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for i in range(len(part)):  # first joins an existing group...
            yield [[first, *g] if j == i else g for j, g in enumerate(part)]
        yield [[first], *part]  # ...or starts its own


def contiguous_partitions(order: Sequence[int]) -> Iterator[list[list[int]]]:
    """Every partition of ``order`` into runs of consecutive items (2 ** (n - 1) of them)."""
    n = len(order)
    for cuts in itertools.product((False, True), repeat=max(n - 1, 0)):
        groups, cur = [], [order[0]] if n else []
        for i, cut in enumerate(cuts, start=1):
            if cut:
                groups.append(cur)
                cur = []
            cur.append(order[i])
        if cur:
            groups.append(cur)
        yield groups


def output_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the model's output(s): what a head sends back to the leader per frame."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    nodes: list[torch.fx.Node] = []
    torch.fx.node.map_arg(out.args[0], nodes.append)
    return sum(math.prod(n.meta.get("ew_shape") or [0]) for n in nodes) * DTYPE_BYTES


class _Planner:
    """Plans groups, once per distinct list of profiles (names and addresses ignored)."""

    def __init__(self, gm: torch.fx.GraphModule, cluster: Cluster, plan_kwargs: dict[str, Any]):
        self.gm, self.cluster, self.kwargs = gm, cluster, plan_kwargs
        self.cache: dict[str, Plan] = {}
        self.alone: dict[int, float] = {}
        self.calls = 0  # make_plan calls (meta; tests)
        self.in_bytes = math.prod(gm.meta["ew_input_shape"]) * DTYPE_BYTES
        self.out_bytes = output_bytes(gm)

    def plan(self, indices: Sequence[int]) -> Plan:
        """``make_plan`` on the devices ``indices`` in this order, under their real names."""
        profiles = [self.cluster.devices[i] for i in indices]
        key = json.dumps([_planning_fields(p) for p in profiles], sort_keys=True, default=str)
        if key not in self.cache:
            self.calls += 1
            self.cache[key] = make_plan(self.gm, Cluster(profiles), **self.kwargs)
        plan = Plan.from_dict(self.cache[key].to_dict())  # a copy: groups never share stages
        plan.devices = [p.name for p in profiles]
        return plan

    def alone_s(self, i: int) -> float:
        """Predicted seconds for device ``i`` to run the whole model by itself."""
        if i not in self.alone:
            self.alone[i] = self.plan([i]).predicted_s
        return self.alone[i]

    def ordered(self, group: Sequence[int]) -> list[int]:
        """The group's devices head first: the leader if it is in it, else the fastest alone
        (ties: the first given); the others keep their order."""
        head = 0 if 0 in group else min(group, key=lambda i: (self.alone_s(i), group.index(i)))
        return [head] + [i for i in group if i != head]

    def group(self, group: Sequence[int]) -> tuple[list[int], Plan, float]:
        """The group's device order, its plan and its predicted per-frame latency."""
        order = self.ordered(group)
        plan = self.plan(order)
        latency = plan.predicted_s
        head = order[0]
        if head != 0:  # the frame travels leader -> head and the answer back
            lead, dev = self.cluster.devices[0], self.cluster.devices[head]
            latency += transfer_s(self.in_bytes, lead, dev) + transfer_s(self.out_bytes, dev, lead)
        return order, plan, latency


def _planning_fields(p: DeviceProfile) -> dict[str, Any]:
    """What of a profile the planner reads: all but its name and address."""
    d = p.to_dict()
    d.pop("name", None)
    d.pop("address", None)
    return d


def _candidates(planner: _Planner, n: int) -> Iterator[list[list[int]]]:
    if n <= ALL_PARTITIONS_UP_TO:
        yield from set_partitions(list(range(n)))
        return
    by_speed = sorted(range(n), key=lambda i: (planner.alone_s(i), i))
    yield from contiguous_partitions(by_speed)


def _check_grouping(grouping: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    flat = [int(i) for g in grouping for i in g]
    if any(len(g) == 0 for g in grouping) or sorted(flat) != list(range(n)):
        raise EdgeweaveError(f"grouping {[list(g) for g in grouping]} is not a division of the device indices "
                             f"0..{n - 1} into non-empty groups (each device in exactly one)")
    return [[int(i) for i in g] for g in grouping]


def _close(x: float, y: float) -> bool:
    return abs(x - y) <= _REL_TOL * max(abs(x), abs(y))


def plan_groups(
    gm: torch.fx.GraphModule,
    cluster: Cluster,
    *,
    slo_s: float | None = None,
    partition: str = "optimal",
    fusion: str = "auto",
    mode: str = "exchange",
    split: str = "auto",
    backend: str = "torch",
    model_name: str = "",
    model_hash: str = "",
    groupings: Sequence[Sequence[Sequence[int]]] | None = None,
    slots: int | None = 1,
) -> GroupPlan:
    """The grouping of ``cluster``'s devices with the highest predicted frames per second whose
    every group's per-frame latency is at most ``slo_s`` (None: no bound).

    Candidates are ``groupings`` when given (lists of device-index lists; a group's head is
    chosen as the module docstring says, the others keep the order given), else every set
    partition of the devices up to ``ALL_PARTITIONS_UP_TO`` devices and, beyond, the partitions
    into runs of devices sorted fastest first. Ties in fps go to fewer groups, then to the lower
    latency. When no candidate keeps the SLO the result is the one with the lowest latency and
    ``feasible`` is False. The other arguments are ``make_plan``'s, for every group; a group's
    plan is made once per distinct list of device profiles (uniform devices: once per size).

    ``slots``: frames each group serves at once; None lets the planner choose 1 or 2. With s
    frames in flight a group's devices share their time between them: it serves
    ``min(s / latency, 1 / busiest device's work per frame)`` frames per second (the plan's
    ``busy_s``: one frame's computing fills another's waits for rows) and each frame takes
    ``max(latency, s * that work)``.
    """
    n = len(cluster.devices)
    if n == 0:
        raise EdgeweaveError("the cluster has no devices")
    if slo_s is not None and not slo_s > 0:
        raise EdgeweaveError(f"the latency SLO must be a number of seconds > 0, got {slo_s!r}")
    kwargs = {"partition": partition, "fusion": fusion, "mode": mode, "split": split, "backend": backend,
              "model_name": model_name, "model_hash": model_hash}
    planner = _Planner(gm, cluster, kwargs)
    if groupings is not None:
        cands: Iterator[list[list[int]]] | list[list[list[int]]] = [_check_grouping(g, n) for g in groupings]
        if not cands:
            raise EdgeweaveError("groupings is empty: give at least one grouping")
    else:
        cands = _candidates(planner, n)
    made: dict[tuple[int, ...], tuple[list[int], Plan, float]] = {}  # per group, across candidates

    if slots is not None and not 1 <= slots <= 8:
        raise EdgeweaveError(f"slots must be 1..8 frames in flight per group, got {slots}")
    slot_options = [slots] if slots is not None else [1, 2]
    best: tuple[list[list[int]], float, float, int] | None = None  # grouping, fps, latency, slots
    lowest: tuple[list[list[int]], float, float, int] | None = None
    count = 0
    for grouping in cands:
        count += 1
        for g in grouping:
            if tuple(g) not in made:
                made[tuple(g)] = planner.group(g)
        for s in slot_options:
            rates = [in_flight(made[tuple(g)][1], made[tuple(g)][2], s) for g in grouping]
            fps = sum(r[0] for r in rates)
            lat = max(r[1] for r in rates)
            cand = (grouping, fps, lat, s)
            keeps_slo = slo_s is None or lat <= slo_s * (1 + _REL_TOL)
            if keeps_slo and (best is None or _better_fps(cand, best)):
                best = cand
            if lowest is None or _better_latency(cand, lowest):
                lowest = cand
    assert lowest is not None
    chosen = best or lowest
    s = chosen[3]
    groups = []
    for g in chosen[0]:
        order, plan, latency = made[tuple(g)]
        fps_g, lat_g = in_flight(plan, latency, s)
        groups.append(Group(devices=[cluster.devices[i].name for i in order], plan=plan, latency_s=lat_g, fps=fps_g))
    meta = {"candidates": count, "make_plan_calls": planner.calls,
            "grouping": [list(g) for g in chosen[0]]}  # the chosen grouping's device indices, as given
    if best is None:
        meta["slo_unmet"] = f"no grouping keeps {slo_s} s per frame; the lowest predicted is {lowest[2]:.6g} s"
    return GroupPlan(groups=groups, slo_s=slo_s, feasible=best is not None, meta=meta, slots=s)


def in_flight(plan: Plan, latency_s: float, slots: int) -> tuple[float, float]:
    """A group's (frames per second, seconds per frame) serving ``slots`` frames at once: the
    frames share the devices' time, so the busiest device's work per frame bounds the rate and,
    once it is the bottleneck, stretches every frame (see :func:`plan_groups`)."""
    one = 1.0 / latency_s if latency_s > 0 else math.inf
    if slots <= 1:
        return one, latency_s
    busy = max(plan.busy_s(), default=0.0) or latency_s  # a plan without busy times: no overlap assumed
    busy = min(busy, latency_s)
    return min(slots * one, 1.0 / busy if busy > 0 else math.inf), max(latency_s, slots * busy)


Candidate = tuple[list[list[int]], float, float, int]  # grouping, fps, latency, slots


def _better_fps(a: Candidate, b: Candidate) -> bool:
    """Whether candidate ``a`` beats ``b`` on fps; equal fps: fewer groups, fewer slots, then
    lower latency."""
    if not _close(a[1], b[1]):
        return a[1] > b[1]
    if len(a[0]) != len(b[0]):
        return len(a[0]) < len(b[0])
    if a[3] != b[3]:
        return a[3] < b[3]
    return a[2] < b[2] and not _close(a[2], b[2])


def _better_latency(a: Candidate, b: Candidate) -> bool:
    """Whether ``a`` beats ``b`` on latency; equal latency: fewer groups, fewer slots, then
    higher fps."""
    if not _close(a[2], b[2]):
        return a[2] < b[2]
    if len(a[0]) != len(b[0]):
        return len(a[0]) < len(b[0])
    if a[3] != b[3]:
        return a[3] < b[3]
    return a[1] > b[1] and not _close(a[1], b[1])


def one_group(gm: torch.fx.GraphModule, cluster: Cluster, **kwargs: Any) -> GroupPlan:
    """Every device in one group, in cluster order: the plan ``make_plan`` gives (``kwargs`` are
    :func:`plan_groups`'s; ``slo_s`` only decides ``feasible``)."""
    if "groupings" in kwargs:
        raise EdgeweaveError("one_group takes no groupings: it is the grouping of all devices")
    return plan_groups(gm, cluster, groupings=[[list(range(len(cluster.devices)))]], **kwargs)
