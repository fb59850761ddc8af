"""The leader process of the EdgeDI benchmark: :mod:`edgeweave.bench.leader_driver`'s protocol
(``plan``, ``infer``, ``quit``) plus an adaptive stream that runs and re-plans *in the leader*:

- ``stream_start`` ``{"path": plan.json, "cluster": cluster.json, "policy": {...}}``: load the
  plan (checked against the whole model like ``plan``) and start an
  :class:`edgeweave.runtime.stream.AdaptiveStream` whose base profiles are the cluster file's;
- ``stream`` ``{"frames": n}``: serve n frames; reply their records (latency, plan version,
  factors, events). The stream's state persists between calls, so the orchestrator can change
  a CPU cap between two calls, at a known frame.
- ``check`` ``{}``: compare the stream's current plan's output with the whole model's.

Started like the leader driver (``--listen``, ``--model``, ``--cluster``, ``--timeout``).
"""

from __future__ import annotations

import sys
from typing import Any

from edgeweave.bench.leader_driver import LeaderDriver, main


class EdgeDIDriver(LeaderDriver):
    description = "edgeweave EdgeDI benchmark leader (JSON lines on stdin/stdout)"
    stream: Any = None

    def op_stream_start(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from edgeweave.planning.adapt import AdaptPolicy
        from edgeweave.profiling.profile import Cluster
        from edgeweave.runtime.stream import AdaptiveStream

        plan, pid, res = self.load_and_check(cmd["path"])
        self.stream = AdaptiveStream(self.cl, plan, Cluster.load(cmd["cluster"]),
                                     policy=AdaptPolicy(**cmd.get("policy", {})), plan_id=pid)
        return res

    def op_stream(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.stream is None:
            raise RuntimeError("stream before stream_start")
        from edgeweave.runtime.timeline import breakdown

        x, _ref = self.ref_for(self.stream.plan)
        recs = []
        for _ in range(int(cmd["frames"])):
            _y, rec = self.stream.step(x)
            # where the frame's time went (compute / imbalance / transfers and sync), per frame
            recs.append(rec.to_dict() | {"breakdown": breakdown(self.stream.last_timings.to_dict())})
        return {"records": recs, "plan": self.stream.plan.to_dict() if cmd.get("with_plan") else None}

    def op_check(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from edgeweave.runtime.run import compare

        if self.stream is None:
            raise RuntimeError("check before stream_start")
        x, ref = self.ref_for(self.stream.plan)
        y, _tm = self.cl.infer(x, self.stream.plan_id)
        return compare(y, ref)


if __name__ == "__main__":
    sys.exit(main(driver=EdgeDIDriver))
