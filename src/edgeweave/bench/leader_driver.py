"""The leader process of a benchmark cluster, run *inside* the leader device's namespace and CPU cap.

The benchmark's orchestrator (outside the testbed, uncapped) plans; this process only holds the
leader's side of the session and executes what it is told, so that the leader's own compute runs
at the emulated device's speed. It speaks JSON lines: commands on stdin, one reply per command
on stdout (prefixed with ``@@ew `` so stray prints from libraries cannot be mistaken for one).

Commands (``op``):

- ``plan``  ``{"path": plan.json}``: load the plan on the cluster, run it once (warm-up) and
  compare with the whole model run here; reply ``plan_id``, ``rel_err``, ``max_abs_err``.
- ``infer`` ``{"plan_id", "repeat"}``: ``repeat`` timed inferences; reply ``latencies_s`` and
  the per-stage timings of the fastest one.
- ``quit``.

Started as ``python -m edgeweave.bench.leader_driver --listen 0.0.0.0:PORT --model CKPT
--cluster CLUSTER.json``; it replies ``ready`` once every follower has joined and verified the
weights (followers load the same checkpoint from disk: nothing big crosses the shaped links).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Any

import torch

PREFIX = "@@ew "


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def bench_input(size: int, channels: int = 3, batch: int = 1) -> torch.Tensor:
    """The input every process uses for a given size (seeded, so the reference is repeatable)."""
    g = torch.Generator().manual_seed(1000 + size)
    return torch.randn(batch, channels, size, size, generator=g)


class LeaderDriver:
    """Holds the leader's session and answers commands; ``op_<name>`` methods are the commands,
    so a benchmark adds its own by subclassing (see :mod:`edgeweave.bench.edgedi_driver`)."""

    description = "edgeweave benchmark leader (JSON lines on stdin/stdout)"

    def __init__(self, cl: Any, model: torch.nn.Module, spec: Any = None) -> None:
        self.cl, self.model, self.spec = cl, model, spec
        self.refs: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def ref_for(self, plan: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The seeded input for the plan's shape and the whole model's output on it."""
        shape = tuple(plan.input_shape)
        if shape not in self.refs:
            x = bench_input(shape[-1], shape[1], shape[0])
            with torch.no_grad():
                self.refs[shape] = (x, self.model(x))
        return self.refs[shape]

    def load_and_check(self, path: str) -> tuple[Any, int, dict[str, Any]]:
        """Load a plan, run it once (warm-up) and compare with the whole model."""
        from edgeweave.planning.plan import Plan
        from edgeweave.runtime.run import compare

        plan = Plan.load(path)
        pid = self.cl.load_plan(plan)
        x, ref = self.ref_for(plan)
        t1 = time.perf_counter()
        y, _tm = self.cl.infer(x, pid)
        return plan, pid, {"plan_id": pid, "warmup_s": time.perf_counter() - t1, **compare(y, ref)}

    def op_plan(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return self.load_and_check(cmd["path"])[2]

    def op_infer(self, cmd: dict[str, Any]) -> dict[str, Any]:
        pid = int(cmd["plan_id"])
        plan, _gm = self.cl.plans[pid]
        x, _ref = self.ref_for(plan)
        lats, best = [], None
        for _ in range(int(cmd.get("repeat", 1))):
            t1 = time.perf_counter()
            _y, tm = self.cl.infer(x, pid)
            lats.append(time.perf_counter() - t1)
            if best is None or tm.total_s <= best.total_s:
                best = tm
        return {"latencies_s": lats, "timings": best.to_dict() if best else None}


def main(argv: list[str] | None = None, driver: type[LeaderDriver] = LeaderDriver) -> int:
    ap = argparse.ArgumentParser(description=driver.description)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--model", required=True, help="checkpoint path (the followers load the same file)")
    ap.add_argument("--cluster", required=True, help="cluster JSON (leader first); names must match the followers")
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from edgeweave.checkpoint import load_checkpoint
    from edgeweave.profiling.profile import Cluster
    from edgeweave.runtime.leader import RemoteCluster

    t0 = time.perf_counter()
    model, spec, _extra = load_checkpoint(a.model)
    model.eval()
    with RemoteCluster(Cluster.load(a.cluster), a.listen, timeout_s=a.timeout, start_timeout_s=a.timeout) as cl:
        h = cl.load_model(model, spec)
        d = driver(cl, model, spec)
        reply({"op": "ready", "names": cl.names, "model_hash": h, "startup_s": time.perf_counter() - t0})
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                reply({"op": "bye"})
                break
            handler = getattr(d, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                reply({"op": str(op), "ok": False, "error": f"unknown op {op!r}"})
                continue
            try:
                reply({"op": op, "ok": True, **handler(cmd)})
            except Exception as e:  # noqa: BLE001 - report to the orchestrator, which decides
                traceback.print_exc()
                reply({"op": str(op), "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
                if cl.broken:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
