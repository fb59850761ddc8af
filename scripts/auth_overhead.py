"""What authentication costs an inference: the same plan on two local clusters of 4 followers,
one with a cluster key and one without, inferences interleaved (keyed, unkeyed, unkeyed, keyed,
...) so that load on the machine hits both alike; plus the cost of sealing and checking one
command, measured alone. Writes JSON (default results/security/auth_overhead.json).

    .venv/bin/python scripts/auth_overhead.py [--rounds 60] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from edgeweave.runtime import auth
from edgeweave.runtime.leader import LocalCluster
from edgeweave.runtime.run import RunConfig, load_for_run, plan_for

MODELS = (("small_cnn", 28), ("cifar_resnet18", 64))


def micro(n: int = 20000) -> dict[str, float]:
    """Seconds to seal one inference command (leader) and to check it (a follower)."""
    leader = auth.Control(auth.generate_key(), writer="leader", session=auth.new_nonce())
    reader = auth.Control(leader.key, session=leader.session)
    t0 = time.perf_counter()
    raws = [leader.seal(f"ew/g0/cmd/{i}", {"op": "infer", "plan_id": 3}) for i in range(n)]
    t1 = time.perf_counter()
    for i, raw in enumerate(raws):
        reader.open(f"ew/g0/cmd/{i}", raw, writer="leader", ordered=True)
    t2 = time.perf_counter()
    return {"seal_s": (t1 - t0) / n, "check_s": (t2 - t1) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--json", default="results/security/auth_overhead.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = {"workers": a.workers, "rounds": a.rounds, "machine": {"cpus": os.cpu_count(),
                                                                 "python": platform.python_version(),
                                                                 "torch": torch.__version__,
                                                                 "loadavg_at_start": os.getloadavg()},
           "per_command": micro(), "models": []}
    with LocalCluster(a.workers, timeout_s=60) as keyed, LocalCluster(a.workers, timeout_s=60, key=None) as plain:
        assert keyed.ctl.keyed and not plain.ctl.keyed
        for name, size in MODELS:
            model, spec = load_for_run(name, size)
            x = torch.randn(1, spec.in_channels, size, size)
            pids = {}
            for cl in (keyed, plain):
                cl.load_model(model, spec)
                pids[id(cl)] = cl.load_plan(plan_for(cl, model, tuple(x.shape), RunConfig(), name))
            lat: dict[str, list[float]] = {"keyed": [], "plain": []}
            for _ in range(3):  # warm-up, not kept
                for cl in (keyed, plain):
                    cl.infer(x, pids[id(cl)])
            for r in range(a.rounds):
                order = [("keyed", keyed), ("plain", plain)] if r % 2 == 0 else [("plain", plain), ("keyed", keyed)]
                for label, cl in order:
                    t0 = time.perf_counter()
                    y, _ = cl.infer(x, pids[id(cl)])
                    lat[label].append(time.perf_counter() - t0)
            with torch.no_grad():
                assert float((y - model(x)).abs().max()) <= 1e-4 * float(model(x).abs().max())
            diffs = [k - p for k, p in zip(lat["keyed"], lat["plain"])]
            med = {k: statistics.median(v) for k, v in lat.items()}
            q = statistics.quantiles(diffs, n=4)
            out["models"].append({
                "model": name, "input_size": size, "median_s": med,
                "mean_s": {k: statistics.fmean(v) for k, v in lat.items()},
                "paired_diff_median_s": statistics.median(diffs), "paired_diff_iqr_s": [q[0], q[2]],
                "overhead_of_medians": med["keyed"] / med["plain"] - 1.0,
                "per_command_share": (out["per_command"]["seal_s"] + out["per_command"]["check_s"]) / med["plain"],
            })
            print(json.dumps(out["models"][-1]))
    out["machine"]["loadavg_at_end"] = os.getloadavg()
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
