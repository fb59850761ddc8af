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

import argparse
import json
import sys
import time
import traceback
from typing import Any

import torch

from edgeweave.bench.leader_driver import bench_input, reply


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="edgeweave EdgeDI benchmark leader (JSON lines on stdin/stdout)")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from edgeweave.checkpoint import load_checkpoint
    from edgeweave.planning.adapt import AdaptPolicy
    from edgeweave.planning.plan import Plan
    from edgeweave.profiling.profile import Cluster
    from edgeweave.runtime.leader import RemoteCluster
    from edgeweave.runtime.run import compare
    from edgeweave.runtime.stream import AdaptiveStream

    t0 = time.perf_counter()
    model, spec, _extra = load_checkpoint(a.model)
    model.eval()
    refs: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def ref_for(plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        shape = tuple(plan.input_shape)
        if shape not in refs:
            x = bench_input(shape[-1], shape[1], shape[0])
            with torch.no_grad():
                refs[shape] = (x, model(x))
        return refs[shape]

    stream: AdaptiveStream | None = None
    with RemoteCluster(Cluster.load(a.cluster), a.listen, timeout_s=a.timeout, start_timeout_s=a.timeout) as cl:
        h = cl.load_model(model, spec)
        reply({"op": "ready", "names": cl.names, "model_hash": h, "startup_s": time.perf_counter() - t0})
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            op = cmd.get("op")
            try:
                if op == "quit":
                    reply({"op": "bye"})
                    break
                if op in ("plan", "stream_start"):
                    plan = Plan.load(cmd["path"])
                    pid = cl.load_plan(plan)
                    x, ref = ref_for(plan)
                    t1 = time.perf_counter()
                    y, _tm = cl.infer(x, pid)
                    warm = time.perf_counter() - t1
                    extra: dict[str, Any] = {}
                    if op == "stream_start":
                        stream = AdaptiveStream(cl, plan, Cluster.load(cmd["cluster"]),
                                                policy=AdaptPolicy(**cmd.get("policy", {})), plan_id=pid)
                    reply({"op": op, "ok": True, "plan_id": pid, "warmup_s": warm, **compare(y, ref), **extra})
                elif op == "infer":
                    pid = int(cmd["plan_id"])
                    plan, _gm = cl.plans[pid]
                    x, _ref = ref_for(plan)
                    lats, best = [], None
                    for _ in range(int(cmd.get("repeat", 1))):
                        t1 = time.perf_counter()
                        _y, tm = cl.infer(x, pid)
                        lats.append(time.perf_counter() - t1)
                        if best is None or tm.total_s <= best.total_s:
                            best = tm
                    reply({"op": "infer", "ok": True, "latencies_s": lats, "timings": best.to_dict() if best else None})
                elif op == "stream":
                    if stream is None:
                        raise RuntimeError("stream before stream_start")
                    x, _ref = ref_for(stream.plan)
                    recs = stream.serve([x] * int(cmd["frames"]))
                    reply({"op": "stream", "ok": True, "records": [r.to_dict() for r in recs],
                           "plan": stream.plan.to_dict() if cmd.get("with_plan") else None})
                elif op == "check":
                    if stream is None:
                        raise RuntimeError("check before stream_start")
                    x, ref = ref_for(stream.plan)
                    y, _tm = cl.infer(x, stream.plan_id)
                    reply({"op": "check", "ok": True, **compare(y, ref)})
                else:
                    reply({"op": str(op), "ok": False, "error": f"unknown op {op!r}"})
            except Exception as e:  # noqa: BLE001 - report to the orchestrator, which decides
                traceback.print_exc()
                reply({"op": str(op), "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
                if cl.broken:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
