"""The stream benchmark's leader (``edgeweave bench stream``): the leader driver plus ``stream``,
which serves frames on the groups of a group plan (planning/throughput.py) and reports them."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from typing import Any

import torch

from edgeweave.bench.leader_driver import LeaderDriver, main as driver_main


class StreamDriver(LeaderDriver):
    description = "edgeweave stream benchmark leader (JSON lines on stdin/stdout)"

    def op_stream(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Serve ``frames`` copies of the seeded input on the groups of the plan at ``path``, at
        ``rate`` frames per second (all at once without one), after one warm-up frame per group.
        Every output is compared with the whole model's."""
        from pathlib import Path

        from edgeweave.planning.throughput import GroupPlan
        from edgeweave.runtime.frames import GroupServer, latency_stats

        gplan = GroupPlan.from_json(Path(cmd["path"]).read_text())
        x, ref = self.ref_for(gplan.groups[0].plan)
        # after a failure: the groups the orchestrator planned for the devices left (planning
        # VGG16 again on a 0.25-core leader would take longer than the failover itself)
        fallback = GroupPlan.from_json(Path(cmd["fallback"]).read_text()) if cmd.get("fallback") else None
        server = GroupServer(self.cl, gplan, replan=(lambda _cluster: fallback) if fallback else None)
        try:
            if not cmd.get("no_warmup"):
                server.serve([x] * len(gplan.groups))
            res = server.serve([x] * int(cmd["frames"]), rate=cmd.get("rate"))
        finally:
            server.close()
        scale = float(ref.abs().max())
        err = max(float((r.output - ref).abs().max()) for r in res) / max(scale, 1e-30)
        parallel = len(gplan.groups) * int(getattr(gplan, "slots", 1))
        return {**latency_stats(res, parallel=parallel), "rel_err": err, "groups": server.groups,
                "frames": [r.to_dict() for r in res], "events": [e.to_dict() for e in server.events]}

    def op_serve_start(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """``edgeweave serve --slo-ms``'s server on the groups of the plan at ``path`` (one
        request per group), its HTTP API on this device's loopback; the reply gives the URL and
        the whole model's output on the seeded input, for the clients to compare with."""
        from pathlib import Path

        from edgeweave.bench.serve import Uvicorn
        from edgeweave.planning.throughput import GroupPlan
        from edgeweave.serving.app import create_app
        from edgeweave.serving.groups import GroupInferenceServer
        from edgeweave.serving.preprocess import NORMALIZATIONS
        from edgeweave.serving.server import ServerLimits

        gplan = GroupPlan.from_json(Path(cmd["path"]).read_text())
        _x, ref = self.ref_for(gplan.groups[0].plan)
        clients = int(cmd["clients"])
        server = GroupInferenceServer(self.cl, gplan, lambda _cluster: gplan, self.spec, str(cmd.get("model", "model")),
                                      float(cmd["slo_s"]), ServerLimits(max_waiting=2 * clients, wait_timeout_s=60))
        with ExitStack() as stack:  # closed here if it cannot start, by serve_stop otherwise
            stack.callback(server.close)
            warm_s = server.warm_up()
            url = stack.enter_context(Uvicorn(create_app(server, NORMALIZATIONS["none"])))
            self._serving, self._server = stack.pop_all(), server
        return {"url": url, "warm_s": warm_s, "ref": ref.flatten().tolist()}

    def op_serve_stop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """The server's statistics once it is idle; then its HTTP API and groups closed."""
        with self._serving:
            self._server.idle(60)
            return {"stats": self._server.stats()}


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    return driver_main(argv, StreamDriver)


if __name__ == "__main__":
    sys.exit(main())
