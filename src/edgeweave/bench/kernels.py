"""``edgeweave bench kernels``: per-device compute against what a user would run on one board.

A user compares edgeweave with their model on ONE board under the field's CPU runtime. Per
model (batch 1, one thread, the input size given; random weights with BatchNorm statistics
calibrated on random inputs, so that no output is degenerate), interleaved round by round:

* ``torch``: the plain model, as the user holds it (eager, NCHW);
* ``ew_<backend>``: edgeweave on one device with each installed backend, through the code path a
  plan uses (``engine.prepare`` + the runtime's ``execute_plan``);
* ``raw_ort``: one ONNX Runtime session on the whole exported model (ORT_ENABLE_ALL, one thread);
* ``strips_<backend>``: the model's plan over ``devices`` equal devices, every device's share run
  in-process on that backend (``engine.simulate`` with a clock): the summed compute seconds of
  all devices, without transfers.

Every round runs each variant once, the order rotating from round to round (what ran before a
variant leaves the caches in another state); ratios are medians of per-round ratios. Summary keys, per model (short names: vgg16, resnet18,
mobilenet_v2, efficientnet_b0, compact_vgg16): ``ratio_to_ort_<m>`` (edgeweave's best backend on
one device over raw ONNX Runtime; lower is better), ``speedup_over_torch_<m>`` (plain torch over
edgeweave's best), ``strip_speedup_over_torch_<m>`` (the plan's summed compute on torch over the
best backend), ``best_backend_<m>``, ``prepare_s_<m>`` (compiling the 5-device plan for every
device on the best backend, cold), and ``max_rel_err`` over every output against plain torch.

``runtime_cpu_per_stage_ms``: what the runtime itself costs a device per stage (posting and
waiting for transfers, assembling inputs, coding rows: its process's CPU over an inference minus
its compute's), on loopback with the first model's plan over ``devices`` real processes, the
median over frames of the busiest device (``runtime`` per device and backend in the JSON);
``runtime_cpu_fixed_per_stage_ms``, ``runtime_cpu_per_message_ms`` and ``runtime_cpu_per_mb_ms``
split it into a cost per stage, per message and per MB a device moves (least squares over every
stage a device takes part in); ``runtime_cpu_without_messages_ms``: the median where it moves
nothing.
Writes ``kernels.json``, ``kernels.csv`` and ``kernels.png`` under ``<out>/kernels/``.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edgeweave.console import console
from edgeweave.models.calibrate import calibrate_batchnorm

TARGETS = {"runtime_cpu_per_stage_ms": ("<=", 0.3), "ratio_to_ort_vgg16": ("<=", 1.05), "ratio_to_ort_resnet18": ("<=", 1.05),
           "ratio_to_ort_mobilenet_v2": ("<=", 1.05), "strip_speedup_over_torch_vgg16": (">=", 1.05),
           "strip_speedup_over_torch_resnet18": (">=", 1.25), "strip_speedup_over_torch_mobilenet_v2": (">=", 1.5)}


@dataclass
class KernelsConfig:
    models: tuple[str, ...] = ("torchvision:vgg16", "torchvision:resnet18", "torchvision:mobilenet_v2",
                               "torchvision:efficientnet_b0", "compact_vgg16")
    size: int = 224
    rounds: int = 15
    devices: int = 5
    backends: tuple[str, ...] = ()  # default: every exact backend installed here
    seed: int = 0
    runtime_frames: int = 10  # frames of the loopback cluster (0: not measured)

    @classmethod
    def quick_config(cls) -> "KernelsConfig":
        return cls(rounds=5, runtime_frames=5)


@dataclass
class _Model:
    name: str
    model: torch.nn.Module
    x: torch.Tensor
    ref: torch.Tensor
    variants: dict[str, Callable[[], Any]] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    prepare_s: dict[str, float] = field(default_factory=dict)


def short(name: str) -> str:
    return name.split(":", 1)[-1]


def build(name: str, size: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor, Any]:
    """The model in eval mode with calibrated BatchNorm statistics, a seeded input, its spec."""
    from edgeweave.checkpoint import load_model

    torch.manual_seed(seed)
    if name.startswith("compact_"):  # bench edgedi's: grayscale NEU-CLS images, 6 classes
        model, spec = load_model(name, num_classes=6, in_channels=1, input_size=size, ratio=8)
    else:
        model, spec = load_model(name, num_classes=1000, in_channels=3, input_size=size)
    ch = int(spec.in_channels)
    calibrate_batchnorm(model, (4, ch, size, size))
    return model.eval(), torch.randn(1, ch, size, size), spec


def raw_ort(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """What a user runs on one board: the whole model exported once to ONNX and one ONNX Runtime
    session (all graph optimisations, one thread); returns a call that runs it on ``x``."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"],
                          training=torch.onnx.TrainingMode.PRESERVE)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    return lambda: torch.from_numpy(sess.run(None, {"x": xn})[0])


def _setup(name: str, cfg: KernelsConfig, backends: list[str]) -> _Model:
    from edgeweave.engine import prepare, simulate
    from edgeweave.layout import device_copy
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.profiling.profile import Cluster
    from edgeweave.runtime.executor import execute_plan

    model, x, _spec = build(name, cfg.size, cfg.seed)
    with torch.no_grad():
        ref = model(x)
    m = _Model(short(name), model, x, ref)
    gm = capture(device_copy(model), tuple(x.shape))  # what a leader computes with
    one = make_plan(gm, Cluster.uniform(1))
    many = make_plan(gm, Cluster.uniform(cfg.devices), partition="optimal", fusion="auto", mode="exchange")
    m.variants["torch"] = lambda: model(x)
    m.variants["raw_ort"] = raw_ort(model, x)
    for b in backends:
        prog = prepare(gm, one, 0, b)
        m.variants[f"ew_{b}"] = (lambda p: lambda: execute_plan(p, x, None)[0])(prog)
        t0 = time.perf_counter()
        for d in range(cfg.devices):  # cold: nothing of this plan compiled before
            prepare(gm, many, d, b)
        m.prepare_s[b] = (time.perf_counter() - t0) / cfg.devices
        m.variants[f"strips_{b}"] = (lambda b_: lambda: _strips(simulate, gm, many, x, b_))(b)
    return m


def _strips(simulate: Callable[..., Any], gm: Any, plan: Any, x: torch.Tensor, backend: str) -> tuple[Any, float]:
    clock: dict[int, float] = {}
    y = simulate(gm, plan, x, backend=backend, clock=clock)
    return y, sum(clock.values())


def _time(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], float):
        return out[0], out[1]  # strips: the devices' compute, not the in-process bookkeeping
    return out, wall


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _machine() -> dict[str, Any]:
    import onnxruntime

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": list(load), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "machine": platform.machine()}


def run_kernels_bench(cfg: KernelsConfig | None = None, out_dir: Path = Path("results")) -> dict[str, Any]:
    from edgeweave.engine.backends import available, is_exact
    from edgeweave.jsonio import write_json

    cfg = cfg or KernelsConfig()
    torch.set_num_threads(1)
    backends = list(cfg.backends) or [b for b in available() if is_exact(b)]
    out = out_dir / "kernels"
    out.mkdir(parents=True, exist_ok=True)
    machine_before = _machine()
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    per_model: dict[str, Any] = {}
    max_err = 0.0
    for name in cfg.models:
        console.print(f"[bold]{short(name)}[/bold]: compiling {', '.join(backends)} for 1 and {cfg.devices} devices")
        m = _setup(name, cfg, backends)
        times: dict[str, list[float]] = {k: [] for k in m.variants}
        with torch.no_grad():
            for k, fn in m.variants.items():  # warm-up: first calls allocate and select kernels
                m.outputs[k] = _time(fn)[0]
            order = list(m.variants)
            for r in range(cfg.rounds):  # each round in another order: what runs before a variant
                for k in order[r % len(order):] + order[:r % len(order)]:  # (its cache state) rotates
                    times[k].append(_time(m.variants[k])[1])
        errs = {k: _rel(y, m.ref) for k, y in m.outputs.items() if k != "torch"}
        max_err = max(max_err, *errs.values())
        med = {k: statistics.median(v) for k, v in times.items()}

        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        best = min(backends, key=lambda b: med[f"ew_{b}"])
        best_strips = min(backends, key=lambda b: med[f"strips_{b}"])
        s = m.name
        summary[f"ratio_to_ort_{s}"] = ratio(f"ew_{best}", "raw_ort")
        summary[f"speedup_over_torch_{s}"] = ratio("torch", f"ew_{best}")
        summary[f"strip_speedup_over_torch_{s}"] = ratio("strips_torch", f"strips_{best_strips}")
        summary[f"best_backend_{s}"] = best
        summary[f"prepare_s_{s}"] = m.prepare_s[best_strips]
        per_model[s] = {"median_s": med, "rel_err": errs, "prepare_s_per_device": m.prepare_s,
                        "best_backend": best, "best_strip_backend": best_strips,
                        "reference_max_abs": float(m.ref.abs().max()), "reference_std": float(m.ref.std())}
        for k, v in med.items():
            rows.append({"model": s, "variant": k, "median_ms": 1e3 * v, "rel_err": errs.get(k, 0.0)})
        console.print("  " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items()))
        console.print(f"  best {best}: {summary[f'ratio_to_ort_{s}']:.3f}x raw ONNX Runtime, "
                      f"{summary[f'speedup_over_torch_{s}']:.2f}x plain torch; strips "
                      f"{summary[f'strip_speedup_over_torch_{s}']:.2f}x on {best_strips}")
    summary["max_rel_err"] = max_err
    runtime: dict[str, Any] = {}
    if cfg.runtime_frames:
        for b in backends:
            runtime[b] = runtime_overhead(cfg.models[0], cfg, b)
            console.print(f"runtime on {b}: {runtime[b]['per_stage_ms']} ms of CPU per stage per device "
                          f"({runtime[b]['stages']} stages)")
        summary["runtime_cpu_per_stage_ms"] = max(r["busiest_ms"] for r in runtime.values())
        # the same split into a fixed cost per stage, one per message and one per MB (split_runtime_cpu)
        for key, field_ in (("fixed_per_stage", "fixed_ms"), ("per_message", "per_message_ms"), ("per_mb", "per_mb_ms"),
                            ("without_messages", "no_messages_median_ms")):
            vals = [r[field_] for r in runtime.values() if r.get(field_) is not None]
            summary[f"runtime_cpu_{key}_ms"] = max(vals) if vals else None
    targets = {k: {"value": summary.get(k), "target": f"{op} {v}",
                   "met": summary.get(k) is not None and (summary[k] <= v if op == "<=" else summary[k] >= v)}
               for k, (op, v) in TARGETS.items() if k in summary}
    files = {"json": str(out / "kernels.json"), "csv": str(out / "kernels.csv"), "plot": str(out / "kernels.png")}
    with open(files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "variant", "median_ms", "rel_err"])
        w.writeheader()
        w.writerows(rows)
    _plot(per_model, files["plot"], cfg)
    result = {"config": asdict(cfg) | {"backends": backends}, "machine": {"before": machine_before, "after": _machine()},
              "summary": summary, "targets": targets, "models": per_model, "runtime": runtime, "files": files}
    write_json(files["json"], result)
    return result


def runtime_overhead(name: str, cfg: KernelsConfig, backend: str) -> dict[str, Any]:
    """The runtime's own CPU per stage per device: ``name``'s plan over ``cfg.devices`` local
    processes on loopback, ``cfg.runtime_frames`` frames after a warm-up."""
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.runtime.leader import LocalCluster

    model, x, spec = build(name, cfg.size, cfg.seed)
    per_frame: list[list[float]] = []
    cells: dict[tuple[int, int], list[float]] = {}  # (stage, device) -> runtime CPU seconds per frame
    with LocalCluster(cfg.devices - 1, timeout_s=120) as cl:
        cl.load_model(model, spec)
        plan = make_plan(capture(model, tuple(x.shape)), cl.cluster, model_hash=str(cl.model_hash), backend=backend)
        pid = cl.load_plan(plan)
        traffic = moved(plan)
        for i in range(cfg.runtime_frames + 1):
            _y, tm = cl.infer(x, pid)
            if i:  # the first frame warms every device up
                per_frame.append(tm.runtime_cpu_per_stage())
                for d, stages in enumerate(tm.per_device):
                    for s, st in enumerate(stages):
                        if st.compute_s > 0 or traffic[s][d][1]:  # the device takes part in the stage
                            cells.setdefault((s, d), []).append(st.runtime_cpu_s)
    per_device = [statistics.median(f[d] for f in per_frame) for d in range(len(per_frame[0]))]
    return {"per_stage_ms": [round(1e3 * v, 3) for v in per_device], "busiest_ms": 1e3 * max(per_device),
            "stages": len(plan.stages), "devices": cl.names, "frames": cfg.runtime_frames,
            **split_runtime_cpu({c: (*traffic[c[0]][c[1]], statistics.median(v)) for c, v in cells.items()})}


def moved(plan: Any) -> list[list[tuple[int, int]]]:
    """Per stage, and for the final transfers last, per device: ``(bytes, messages)`` of the rows
    it sends and receives (float32, before the wire codec; a transfer counts at both ends)."""
    import math

    def add(row: list[tuple[int, int]], transfers: Any, shape: list[int], axis: int) -> list[tuple[int, int]]:
        per_row = 4 * math.prod(shape) // max(int(shape[axis]), 1)
        for tr in transfers:
            n = max(0, tr.rows[1] - tr.rows[0]) * per_row
            if n and tr.src != tr.dst:
                for d in (tr.src, tr.dst):
                    row[d] = (row[d][0] + n, row[d][1] + 1)
        return row

    k = len(plan.devices)
    out = [add([(0, 0)] * k, st.transfers, list(st.input_shape), plan.in_axis(s)) for s, st in enumerate(plan.stages)]
    return out + [add([(0, 0)] * k, plan.final_transfers, list(plan.stages[-1].output_shape), plan.out_axis)]


def split_runtime_cpu(cells: dict[tuple[int, int], tuple[int, int, float]]) -> dict[str, Any]:
    """The runtime's CPU per (stage, device) where the device takes part, ``(bytes, messages,
    seconds)``, as a fixed cost per stage (the executor's own: Python, posting, assembling) plus
    a cost per message (the transport's work per send or receive) and one per MB (copies,
    coding, the sockets' kernel time): least squares. The runtime can cut the first; the
    others fall only with fewer or smaller messages, or another transport."""
    import numpy as np

    quiet = [t for b, _m, t in cells.values() if b == 0]  # stages where the device moves nothing
    out: dict[str, Any] = {"cells": len(cells), "no_messages_median_ms": 1e3 * statistics.median(quiet) if quiet else None,
                           "fixed_ms": None, "per_message_ms": None, "per_mb_ms": None}
    rows = np.array([[1.0, m, b / (1 << 20)] for b, m, _t in cells.values()])
    if len(cells) < 4 or np.linalg.matrix_rank(rows) < 3:
        return out
    coef = np.linalg.lstsq(rows, np.array([t for *_x, t in cells.values()]), rcond=None)[0]
    out.update(fixed_ms=1e3 * float(coef[0]), per_message_ms=1e3 * float(coef[1]), per_mb_ms=1e3 * float(coef[2]),
               messages_max=int(rows[:, 1].max()), mb_max=float(rows[:, 2].max()))
    return out


def _plot(per_model: dict[str, Any], path: str, cfg: KernelsConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(per_model)
    variants = [k for k in next(iter(per_model.values()))["median_s"]] if models else []
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(models)), 4))
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        rel = [per_model[m]["median_s"][v] / per_model[m]["median_s"]["raw_ort"] for m in models]
        ax.bar([j + i * width for j in range(len(models))], rel, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
    ax.set_ylabel("seconds / raw ONNX Runtime (lower is faster)")
    ax.set_title(f"batch 1, {cfg.size} px, one thread; strips_*: {cfg.devices} devices' compute summed")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
