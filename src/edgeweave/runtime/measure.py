"""Measured latency of one model over 1..K local workers, per fusion and transfer mode.

``python -m edgeweave.runtime.measure [--json PATH]`` prints the table the issue asks for
(VGG16 at 224, 1/2/3 workers, pools vs none, gather vs exchange, against one process). One
LocalCluster serves every configuration (plans for k workers use its first k+1 devices), and
repeats are interleaved round-robin so that load from other users of the machine drifts over
all configurations alike. The machine state (cores, load average) is recorded beside the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from edgeweave.profiling.profile import Cluster
from edgeweave.runtime.leader import LocalCluster
from edgeweave.runtime.run import RunConfig, compare, load_for_run, plan_for


def machine_state() -> dict[str, Any]:
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    return {"cpus": os.cpu_count(), "loadavg": [float(x) for x in load], "torch": torch.__version__,
            "python": platform.python_version(), "threads_per_process": 1}


def latency_table(model_name: str = "torchvision:vgg16", size: int = 224, workers: tuple[int, ...] = (1, 2, 3),
                  fusions: tuple[str, ...] = ("pools", "none"), modes: tuple[str, ...] = ("gather", "exchange"),
                  partition: str = "optimal", repeat: int = 5, timeout_s: float = 300.0) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, spec = load_for_run(model_name, size)
    x = torch.randn(1, 3, size, size)
    state_before = machine_state()
    rows: list[dict[str, Any]] = []
    with LocalCluster(max(workers), timeout_s=timeout_s) as cl:
        cl.load_model(model, spec)
        configs = []
        for k, fusion, mode in itertools.product(workers, fusions, modes):
            cfg = RunConfig(partition=partition, fusion=fusion, mode=mode)
            plan = plan_for(cl, model, tuple(x.shape), cfg, model_name, cluster=Cluster(cl.cluster.devices[: k + 1]))
            pid = cl.load_plan(plan)
            y, _ = cl.infer(x, pid)  # warm-up, and the exactness check
            with torch.no_grad():
                err = compare(y, model(x))
            configs.append({"workers": k, "fusion": fusion, "mode": mode, "plan_id": pid, "stages": len(plan.stages),
                            "predicted_s": plan.predicted_s, "rel_err": err["rel_err"], "lat": []})
        single: list[float] = []
        with torch.no_grad():
            model(x)
            for _ in range(repeat):  # round-robin: every configuration sees the same load drift
                t0 = time.perf_counter()
                model(x)
                single.append(time.perf_counter() - t0)
                for c in configs:
                    t0 = time.perf_counter()
                    cl.infer(x, c["plan_id"])
                    c["lat"].append(time.perf_counter() - t0)
    single_s = statistics.median(single)
    for c in configs:
        lat = statistics.median(c.pop("lat"))
        c.pop("plan_id")
        rows.append({**c, "latency_s": lat, "speedup": single_s / lat})
    return {"model": model_name, "input_size": size, "partition": partition, "repeat": repeat,
            "single_device_s": single_s, "rows": rows, "machine_before": state_before, "machine_after": machine_state()}


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"{res['model']} {res['input_size']}x{res['input_size']}, partition {res['partition']}, median of "
             f"{res['repeat']}; single process {res['single_device_s']:.3f} s",
             "", "| workers | fusion | mode | latency s | speedup | stages | rel_err |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['workers']} | {r['fusion']} | {r['mode']} | {r['latency_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['stages']} | {r['rel_err']:.1e} |")
    m0, m1 = res["machine_before"], res["machine_after"]
    lines.append("")
    lines.append(f"machine: {m0['cpus']} CPUs, load average {m0['loadavg']} before, {m1['loadavg']} after; "
                 f"torch {m0['torch']}, 1 thread per process")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="torchvision:vgg16")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--workers", default="1,2,3")
    ap.add_argument("--fusions", default="pools,none")
    ap.add_argument("--modes", default="gather,exchange")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = latency_table(a.model, a.input_size, tuple(int(w) for w in a.workers.split(",")),
                        fusions=tuple(a.fusions.split(",")), modes=tuple(a.modes.split(",")), repeat=a.repeat)
    print(to_markdown(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
