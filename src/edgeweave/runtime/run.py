"""One distributed inference end to end (the library behind ``edgeweave run``).

Load the model, start (or wait for) the followers, ask the planner for a plan, ship model and
plan, time ``repeat`` inferences after a warm-up, optionally compare with one device. The plan
comes from ``edgeweave.planning``; this module only wires the pieces together and measures.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.profiling.profile import Cluster
from edgeweave.runtime.leader import LocalCluster, RemoteCluster, Session, Timings
from edgeweave.runtime.timeline import breakdown

PARTITIONS = ("equal", "bodp", "ocbp", "optimal")
FUSIONS = ("none", "pools", "auto")
MODES = ("gather", "exchange")


@dataclass
class RunConfig:
    partition: str = "optimal"
    fusion: str = "auto"
    mode: str = "exchange"
    batch: int = 1
    repeat: int = 3
    warmup: int = 1
    check: bool = False
    seed: int = 0
    adaptive: bool = False  # serve the repeats as a stream that re-plans (planning.adapt)

    def validate(self) -> None:
        if self.partition not in PARTITIONS:
            raise EdgeweaveError(f"--partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if self.fusion not in FUSIONS:
            raise EdgeweaveError(f"--fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.mode not in MODES:
            raise EdgeweaveError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.batch < 1 or self.repeat < 1 or self.warmup < 0:
            raise EdgeweaveError("--batch and --repeat must be >= 1")


def load_for_run(model_name: str, input_size: int) -> tuple[torch.nn.Module, Any]:
    from edgeweave.checkpoint import load_model

    model, spec = load_model(model_name, num_classes=_default_classes(model_name), input_size=input_size)
    model.eval()
    return model, spec


def _default_classes(name: str) -> int:
    """ImageNet-sized heads for torchvision models, 10 classes for our CIFAR-style ones."""
    if name.startswith("torchvision:") or name in ("vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50"):
        return 1000
    return 10


def plan_for(session: Session, model: torch.nn.Module, shape: tuple[int, ...], cfg: RunConfig, model_name: str,
             cluster: Cluster | None = None) -> Any:
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan

    gm = capture(model, shape)
    return make_plan(gm, cluster or session.cluster, partition=cfg.partition, fusion=cfg.fusion, mode=cfg.mode,
                     model_name=model_name, model_hash=str(session.model_hash))


def measure(session: Session, plan_id: int, x: torch.Tensor, repeat: int, warmup: int) -> tuple[torch.Tensor, list[float], Timings]:
    """Median-ready latencies of ``repeat`` inferences after ``warmup`` untimed ones."""
    y = None
    for _ in range(warmup):
        y, _t = session.infer(x, plan_id)
    lats: list[float] = []
    best: Timings | None = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        y, tm = session.infer(x, plan_id)
        lats.append(time.perf_counter() - t0)
        if best is None or tm.total_s <= best.total_s:
            best = tm
    assert y is not None and best is not None
    return y, lats, best


def serve_adaptively(session: Session, plan: Any, pid: int, x: torch.Tensor,
                     frames: int) -> tuple[Any, torch.Tensor, list[float], Timings, list[dict[str, Any]]]:
    """Serve ``frames`` inferences through :class:`~edgeweave.runtime.stream.AdaptiveStream`
    (its first frame is the warm-up the estimator ignores). Returns the plan in use at the end,
    the last output, the latencies, the last frame's timings and one record per frame."""
    from edgeweave.runtime.stream import AdaptiveStream

    stream = AdaptiveStream(session, plan, session.cluster, plan_id=pid)
    y, recs = None, []
    for _ in range(frames):
        y, rec = stream.step(x)
        recs.append(rec)
    assert y is not None
    last_pid = recs[-1].plan_id  # the plan the last frame ran (a re-plan after it runs from the next)
    return (session.plans[last_pid][0], y, [r.latency_s for r in recs], stream.last_timings,
            [r.to_dict() for r in recs])


def single_device(model: torch.nn.Module, x: torch.Tensor, repeat: int = 1) -> tuple[torch.Tensor, float]:
    """The reference: the whole model in this process (median seconds over ``repeat``)."""
    with torch.no_grad():
        y = model(x)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            y = model(x)
            times.append(time.perf_counter() - t0)
    return y, statistics.median(times)


def compare(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    err = float((y - ref).abs().max())
    mref = float(ref.abs().max())
    return {"max_abs_err": err, "max_abs_ref": mref, "rel_err": err / max(mref, 1e-12)}


def require_cluster(workers: int | None, cluster_file: str | None) -> None:
    """Say what is missing before anything slow (loading a model) happens."""
    if workers is None and not cluster_file:
        raise EdgeweaveError("give --workers K (local followers) or --cluster FILE (followers started by hand)")


def open_session(workers: int | None, cluster_file: str | None, listen: str = "0.0.0.0:29400",
                 timeout_s: float = 60.0) -> Session:
    """``--workers K`` starts K local followers; ``--cluster FILE`` alone waits for followers started
    by hand (both: local followers planned with the file's profiles). Not yet entered."""
    require_cluster(workers, cluster_file)
    profiles = Cluster.load(cluster_file) if cluster_file else None
    if workers is not None and profiles is not None and len(profiles.devices) != workers + 1:
        raise EdgeweaveError(f"the cluster file describes {len(profiles.devices)} devices; with --workers {workers} "
                             f"it needs {workers + 1} (the leader first)")
    if workers is not None:
        return LocalCluster(workers, profiles=profiles, timeout_s=timeout_s)
    assert profiles is not None
    return RemoteCluster(profiles, listen, timeout_s=timeout_s)


def load_sized(model_name: str, input_size: int | None) -> tuple[torch.nn.Module, Any, int]:
    """The model and the input size to run it at: ``input_size``, else the checkpoint's, else 224."""
    model, spec = load_for_run(model_name, input_size or 224)
    if input_size is None:  # a checkpoint knows the size it was trained for
        input_size = int(spec.input_size[0])
    if input_size < 1:
        raise EdgeweaveError(f"--input-size must be positive, got {input_size}")
    return model, spec, input_size


def run(model_name: str, input_size: int | None, workers: int | None, cfg: RunConfig, cluster_file: str | None = None,
        listen: str = "0.0.0.0:29400", timeout_s: float = 60.0) -> dict[str, Any]:
    """What ``edgeweave run`` does; returns the JSON result (see DESIGN.md's contract)."""
    cfg.validate()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    require_cluster(workers, cluster_file)
    model, spec, input_size = load_sized(model_name, input_size)
    x = torch.randn(cfg.batch, spec.in_channels, input_size, input_size)
    t_start = time.perf_counter()
    with open_session(workers, cluster_file, listen, timeout_s) as session:
        startup_s = time.perf_counter() - t_start
        result = run_on_session(session, model_name, model, spec, x, cfg)
    result["startup_s"] = startup_s
    return result


def run_on_session(session: Session, model_name: str, model: torch.nn.Module, spec: Any, x: torch.Tensor,
                   cfg: RunConfig) -> dict[str, Any]:
    """Ship the model, plan, time ``cfg.repeat`` inferences of ``x``; the contract's JSON keys."""
    session.load_model(model, spec)
    plan = plan_for(session, model, tuple(x.shape), cfg, model_name)
    pid = session.load_plan(plan)
    frames: list[dict[str, Any]] | None = None
    if cfg.adaptive:
        plan, y, lats, timings, frames = serve_adaptively(session, plan, pid, x, cfg.repeat)
    else:
        y, lats, timings = measure(session, pid, x, cfg.repeat, cfg.warmup)
    result: dict[str, Any] = {
        "model": model_name, "input_size": int(x.shape[-1]), "batch": int(x.shape[0]), "workers": session.world - 1,
        "devices": session.names, "partition": cfg.partition, "fusion": cfg.fusion, "mode": cfg.mode,
        "latency_s": statistics.median(lats), "latencies_s": lats, "predicted_s": plan.predicted_s,
        "timings": timings.to_dict(), "plan": plan.to_dict(),
    }
    result["breakdown"] = breakdown(result["timings"])
    if frames is not None:
        result["frames"] = frames
        result["replans"] = sum(f["event"] == "replanned" for f in frames)
        result["lost"] = [n for f in frames for n in f["lost"]]
    if cfg.check:
        ref, single_s = single_device(model, x, repeat=max(1, min(cfg.repeat, 3)))
        result.update(compare(y, ref))
        result["single_device_s"] = single_s
        result["speedup"] = single_s / result["latency_s"] if result["latency_s"] > 0 else None
    return result


def describe_plan(plan: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(stage, kind, nodes, per-device rows) lines for a human-readable plan table."""
    rows = []
    for s in plan["stages"]:
        nodes = s["nodes"]
        span = nodes[0] if len(nodes) == 1 else f"{nodes[0]} .. {nodes[-1]} ({len(nodes)})"
        parts = []
        for a in s["assignments"]:
            o = a["out_rows"]
            if o[1] > o[0]:
                parts.append(f"{plan['devices'][a['device']]}: {o[0]}-{o[1]}")
        rows.append((str(s["index"]), s["kind"], span, ", ".join(parts)))
    return rows


def result_table(res: dict[str, Any]) -> Any:
    """A rich table: which device computes which rows of which block, and measured times."""
    from rich.table import Table

    t = Table(title=f"plan: {res['model']} {res['input_size']}x{res['input_size']} on {', '.join(res['devices'])} "
                    f"({res['partition']}, fusion {res['fusion']}, {res['mode']})")
    for c in ("stage", "kind", "nodes", "rows per device", "predicted s", "measured s"):
        t.add_column(c, justify="right" if c.endswith(" s") else "left")
    stages = res["timings"]["stages"]
    for (idx, kind, nodes, rows), st, ps in zip(describe_plan(res["plan"]), stages, res["plan"]["stages"]):
        t.add_row(idx, kind, nodes, rows, f"{ps['predicted_s']:.4f}", f"{st['wall_s']:.4f}")
    return t


def frames_line(res: dict[str, Any]) -> str:
    """Per-frame latencies of an adaptive run; * marks a re-plan (taking effect from the next),
    ! a frame that failed and ran again without the devices that left."""
    sign = {"replanned": "*", "regrouped": "!"}
    marks = [f"{f['latency_s']:.3f}{sign.get(f['event'], '')}" for f in res["frames"]]
    line = f"frames (s, * = re-planned after it; {res['replans']} re-plans): " + " ".join(marks)
    if res.get("lost"):
        line += f"\n! left out after a failure (the frame ran again): {', '.join(res['lost'])}"
    return line


def summary_line(res: dict[str, Any]) -> str:
    line = (f"latency {res['latency_s']:.4f} s (median of {len(res['latencies_s'])}), "
            f"predicted {res['predicted_s']:.4f} s")
    if "rel_err" in res:
        line += f"; single device {res['single_device_s']:.4f} s; rel_err {res['rel_err']:.2e}"
    b = res.get("breakdown")
    if b:
        line += (f"\nfastest inference {b['total_s']:.4f} s = compute {b['compute_s']:.4f} + imbalance "
                 f"{b['imbalance_s']:.4f} + transfers/sync {b['other_s']:.4f} s")
    return line
