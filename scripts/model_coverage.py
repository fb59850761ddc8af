"""Every torchvision classification model on the planner and the engine: exact on strips, how
much of it is split, and the cost model's single-device prediction against a measurement.

Per model (``torchvision.models.list_models(module=torchvision.models)``, or ``--models``):

* **exact**: a calibrated copy (``models.calibrate``: BatchNorm statistics measured, all-zero
  weights drawn again, so the reference is not degenerate) at a small input, planned over
  ``--workers`` followers plus the leader with an equal split of every block
  (``engine.simulate``: every device in turn); ``rel_err`` against the model itself;
* **split**: ``split_flops_fraction`` of that plan (``planning.coverage``) and whether the
  model is a transformer (attention left on the leader);
* **latency**: at ``--latency-size`` (224; Inception 299), the one-device plan's prediction on
  this machine's profile (``--profile FILE`` from ``edgeweave profile``, else a quick profile
  measured first) against the median of ``--repeat`` runs of the same plan (torch backend, one
  thread): ``ratio = predicted / measured``. ``--clock cpu`` profiles and measures this
  thread's CPU time instead of wall time, for a machine shared with other work.

Writes JSON lines as it goes and a summary (default results/coverage/coverage.json).

    .venv/bin/python scripts/model_coverage.py [--models a,b] [--no-latency] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit_")


def small_sizes(name: str) -> list[tuple[int, dict[str, Any]]]:
    """Input sizes (and model arguments) of the exactness check: small where the model allows,
    larger where a random network is too sensitive to rounding at the small one."""
    if name.startswith("vit_"):
        size = 28 if name.endswith("_14") else 32
        return [(size, {"image_size": size}), (2 * size, {"image_size": 2 * size})]
    if name == "inception_v3":
        return [(80, {}), (96, {}), (128, {})]  # its smallest is 75
    if name.startswith("maxvit"):
        return [(224, {})]  # its partitions need 224 (7x7 windows of a 7x7 map)
    return [(64, {}), (96, {}), (128, {})]


def latency_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def build(name: str, kwargs: dict[str, Any], size: int) -> tuple[torch.nn.Module, list[str]]:
    """The model as torchvision initialises it, or a calibrated copy where its output would prove
    nothing (``models.calibrate.fair_model``; what ``run --check`` does too). Not always
    calibrated: a deep random ResNet with measured BatchNorm statistics amplifies float rounding
    (ResNet152: float32 against float64 differs by 7e-4 of the output)."""
    from edgeweave.models import build_model
    from edgeweave.models.calibrate import fair_model

    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", num_classes=1000, **kwargs).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    fair, done, why = fair_model(model, x)
    if fair is None:
        raise ValueError(f"no fair reference at {size} px: {why}")
    return fair, done


def exactness(name: str, workers: int) -> dict[str, Any]:
    from edgeweave.engine import simulate
    from edgeweave.models.calibrate import degenerate_reason
    from edgeweave.planning.coverage import split_report
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.profiling.profile import Cluster

    errors = []
    for size, kw in small_sizes(name):
        try:
            model, calibrated = build(name, kw, size)
            break
        except ValueError as e:
            errors.append(str(e))
    else:
        raise ValueError("; ".join(errors))
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    gm = capture(model, x.shape)
    plan = make_plan(gm, Cluster.uniform(workers + 1), partition="equal", fusion="none", mode="exchange",
                     backend="torch")
    y = simulate(gm, plan, x)
    rep = split_report(gm, plan)
    err = float((y - ref).abs().max() / ref.abs().max())
    return {"size": size, "rel_err": err, "calibrated": calibrated, "degenerate": degenerate_reason(model, x, ref),
            "split_flops_fraction": rep["split_flops_fraction"], "transformer": rep["transformer"],
            "top_unsplit": rep["unsplit_nodes"][:2]}


def latency(name: str, profile: Any, repeat: int, clock: Any = time.perf_counter) -> dict[str, Any]:
    from edgeweave.engine import simulate
    from edgeweave.layout import device_copy
    from edgeweave.models import build_model
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.profiling.profile import Cluster

    size = latency_size(name)
    kw = {"image_size": size} if name.startswith("vit_") else {}
    torch.manual_seed(0)  # timing does not depend on the values: the model as built
    model = device_copy(build_model(f"torchvision:{name}", num_classes=1000, **kw).eval())
    x = torch.randn(1, 3, size, size)
    gm = capture(model, x.shape)
    plan = make_plan(gm, Cluster([profile]), partition="optimal", fusion="auto", mode="exchange", backend="torch")
    simulate(gm, plan, x)  # warm-up: preparation, allocations
    times = []
    for _ in range(repeat):
        t0 = clock()
        simulate(gm, plan, x)
        times.append(clock() - t0)
    measured = statistics.median(times)
    return {"latency_size": size, "predicted_s": plan.predicted_s, "measured_s": measured,
            "ratio": plan.predicted_s / measured, "gflops": sum(
                float(n.meta.get("ew_flops", 0.0)) for n in gm.graph.nodes) / 1e9}


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="", help="comma-separated names (default: every classification model)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", default="", help="a profile JSON (edgeweave profile); default: measure a quick one")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: profile and measure the CPU time of this thread (a machine shared with other work)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--no-exact", action="store_true")
    ap.add_argument("--json", default="results/coverage/coverage.json")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    names = [n for n in a.models.split(",") if n] or torchvision.models.list_models(module=torchvision.models)
    out_path = Path(a.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = out_path.with_suffix(".jsonl")
    profile = None
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    if not a.no_latency:
        from edgeweave.profiling.profile import DeviceProfile

        if a.profile:
            profile = DeviceProfile.from_dict(json.loads(Path(a.profile).read_text()))
        else:
            from edgeweave.profiling.compute import profile_device

            profile, _ = profile_device(name="this-machine", quick=True, clock=clock)
            out_path.with_name("profile.json").write_text(json.dumps(profile.to_dict(), indent=1))
    rows = []
    with lines.open("a") as f:
        for name in names:
            row: dict[str, Any] = {"model": name, "transformer_family": name.startswith(TRANSFORMER_PREFIXES)}
            t0 = time.perf_counter()
            for part, fn in (("exact", None if a.no_exact else lambda: exactness(name, a.workers)),
                             ("latency", None if profile is None else lambda: latency(name, profile, a.repeat, clock))):
                if fn is None:
                    continue
                try:
                    row.update(fn())
                except Exception as e:  # noqa: BLE001 - a model that fails is a row that says so
                    row[f"{part}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                gc.collect()
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps({k: row.get(k) for k in ("model", "rel_err", "split_flops_fraction", "ratio",
                                                      "exact_error", "latency_error")}), flush=True)
    summary = {
        "machine": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "torchvision": torchvision.__version__, "threads": 1},
        "workers": a.workers,
        "clock": a.clock,
        "profile": profile.to_dict() if profile is not None else None,
        "models": rows,
    }
    out_path.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
