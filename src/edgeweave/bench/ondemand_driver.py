"""The leader process of ``bench ondemand``: :mod:`edgeweave.bench.leader_driver`'s protocol
with a variant set (models/variants.py) held by the cluster and one on-demand policy over it
(``runtime.variants.VariantsOnDemand``), run *in the leader* at the leader's cap:

- ``setup`` ``{"points": {variant: [point, ...]}, "data": test.safetensors, "plan": {...}}``:
  plan every variant's segments over the cluster (``plan`` holds make_plan's keyword
  arguments), run each once with every exit computed and compare every exit's logits with the
  variant run whole on the leader; reply the plans, the errors and the configurations priced
  for the cluster;
- ``measure`` ``{"config": "VARIANT/POINT", "indices": [...]}``: those test frames at that
  configuration, one at a time; reply latency, exit and label per frame;
- ``whole_plan`` ``{"variant"}`` / ``frames`` ``{"plan_id", "indices"}``: a variant planned
  whole over the cluster (the reference) and test frames through it;
- ``requests`` ``{"items": [[index, budget_ms], ...]}``: each frame served through the policy
  with its budget; reply per request the configuration chosen, whether the policy expected to
  meet the budget, latency, exit and label, and the followers' skipped share over them.

Started like the leader driver (``--listen``, ``--model``, ``--cluster``, ``--timeout``).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from edgeweave.bench.leader_driver import LeaderDriver, main


class OndemandDriver(LeaderDriver):
    description = "edgeweave on-demand benchmark leader (JSON lines on stdin/stdout)"
    od: Any = None
    xs: torch.Tensor | None = None

    def op_setup(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from safetensors.torch import load_file

        from edgeweave.exits.calibrate import OperatingPoint
        from edgeweave.exits.inference import forced_exit_thresholds
        from edgeweave.runtime.run import compare
        from edgeweave.runtime.variants import VariantsOnDemand

        self.xs = load_file(cmd["data"])["x"]
        points = {v: [OperatingPoint.from_dict(d) for d in pts] for v, pts in cmd["points"].items()}
        t0 = time.perf_counter()
        self.od = VariantsOnDemand(self.cl, self.model, points, (1, *self.xs.shape[1:]), model_name="ondemand",
                                   **cmd.get("plan", {}))
        plan_s = time.perf_counter() - t0
        self.od.warm_up()
        x = self.xs[:1]
        checks, plans = {}, {}
        for name, m in self.od.members.items():
            with torch.no_grad():
                refs = self.model.variant(name).forward_all(x)
            k = m.exits.num_exits
            ans = m.exits.infer(x, forced_exit_thresholds(k, k - 1))
            checks[name] = [compare(z, ref) | {"ref_std": float(ref.std())} for z, ref in zip(ans.logits, refs)]
            plans[name] = [{"devices": list(p.devices), "kinds": [s.kind for s in p.stages], "predicted_s": p.predicted_s}
                           for p in m.exits.plans]
        self.od.warm_up()  # the priced points from steady segment times
        return {"plan_s": plan_s, "checks": checks, "plans": plans, "devices": self.od.devices,
                "segment_s": {n: m.exits.segment_seconds() for n, m in self.od.members.items()},
                "points": [p.to_dict() for p in self.od.points]}

    def op_whole_plan(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """One variant planned whole over the cluster (its last exit; no early exit computed):
        what the cluster ran before exits and variants were chosen per request."""
        from edgeweave.models.multi_exit import exit_part
        from edgeweave.planning.graph import capture
        from edgeweave.planning.planner import make_plan
        from edgeweave.runtime.run import compare

        if self.xs is None:
            raise RuntimeError("whole_plan before setup")
        part = {"variant": str(cmd["variant"])}
        net = exit_part(self.model, part)
        x = self._frame(0)
        plan = make_plan(capture(net, tuple(x.shape)), self.cl.cluster, model_name=f"ondemand:{part['variant']}",
                         model_hash=str(self.cl.model_hash), **cmd.get("plan", {}))
        plan.meta["part"] = part
        pid = self.cl.load_plan(plan)
        y, _tm = self.cl.infer(x, pid)
        with torch.no_grad():
            ref = net(x)
        return {"plan_id": pid, "check": compare(y, ref) | {"ref_std": float(ref.std())},
                "plan": {"devices": list(plan.devices), "kinds": [s.kind for s in plan.stages],
                         "predicted_s": plan.predicted_s}}

    def op_frames(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Test frames through a plan loaded by ``whole_plan``; their latencies."""
        pid, lats = int(cmd["plan_id"]), []
        for i in cmd["indices"]:
            t0 = time.perf_counter()
            self.cl.infer(self._frame(i), pid)
            lats.append(1e3 * (time.perf_counter() - t0))
        return {"latencies_ms": lats}

    def _frame(self, i: int) -> torch.Tensor:
        assert self.xs is not None
        return self.xs[int(i): int(i) + 1]

    def op_measure(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from edgeweave.exits.policy import Choice

        if self.od is None:
            raise RuntimeError("measure before setup")
        by = {p.name: p for p in self.od.points}
        point = by[cmd["config"]]
        out = []
        for i in cmd["indices"]:
            t0 = time.perf_counter()
            p = self.od.run(self._frame(i), Choice(point, True, "measured"))
            out.append({"index": int(i), "latency_ms": 1e3 * (time.perf_counter() - t0), "exit": int(p.exits[0]),
                        "label": int(p.labels[0])})
        return {"frames": out}

    def op_requests(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.od is None:
            raise RuntimeError("requests before setup")
        self.od.exits_taken.clear()
        out = []
        for i, budget in cmd["items"]:
            t0 = time.perf_counter()
            p = self.od.predict(self._frame(i), latency_budget_ms=float(budget))
            out.append({"index": int(i), "budget_ms": float(budget), "latency_ms": 1e3 * (time.perf_counter() - t0),
                        "config": p.choice.point.name, "satisfied": p.choice.satisfied,
                        "predicted_p95_ms": p.choice.point.p95_ms, "exit": int(p.exits[0]), "label": int(p.labels[0])})
        return {"requests": out, "followers_skipped_fraction": self.od.skipped_fraction(), "lost": self.od.lost}


if __name__ == "__main__":
    sys.exit(main(driver=OndemandDriver))
