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
from edgeweave.limits import MAX_INPUT_SIZE, check_followers_fit, check_input_size, check_timeout
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
    backend: str = "auto"  # what each device computes with (engine/backends.py)
    split: str = "auto"  # how spatial blocks may be cut: rows | channels | auto (planning/hybrid.py)
    rate: float | None = None  # serve the repeats as a stream arriving at this many frames per second (runtime/slo.py)
    slo_ms: float | None = None  # per-frame latency bound (p95): groups of devices serve frames at once

    def validate(self) -> None:
        from edgeweave.engine.backends import NAMES

        if self.split not in ("rows", "channels", "auto"):
            raise EdgeweaveError(f"--split must be rows, channels or auto, got {self.split!r}")
        if self.backend != "auto" and self.backend not in NAMES:
            raise EdgeweaveError(f"--backend must be one of {', '.join(NAMES)} or auto, got {self.backend!r}")
        if self.partition not in PARTITIONS:
            raise EdgeweaveError(f"--partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if self.fusion not in FUSIONS:
            raise EdgeweaveError(f"--fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.mode not in MODES:
            raise EdgeweaveError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.batch < 1 or self.repeat < 1 or self.warmup < 0:
            raise EdgeweaveError("--batch and --repeat must be >= 1")
        if self.rate is not None and not self.rate > 0:
            raise EdgeweaveError(f"--rate must be > 0 frames per second, got {self.rate:g}")
        if self.slo_ms is not None and not self.slo_ms > 0:
            raise EdgeweaveError(f"--slo-ms must be > 0, got {self.slo_ms:g}")


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
                     backend=cfg.backend, split=cfg.split,
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


def backend_report(session: Session, plan: Any) -> dict[str, Any]:
    """What every device computed with under ``plan`` (the plan's choice; torch where a device
    could not compile a stage, said in ``backend_fallbacks``) and whether all of it is exact."""
    from edgeweave.engine.backends import is_exact

    pid = next((p for p, (pl, _) in session.plans.items() if pl is plan), max(session.plans, default=-1))
    got = session.backends.get(pid) or [{"backend": b, "fallbacks": []} for b in plan.backends]
    names = session.names
    used = {names[d]: g["backend"] for d, g in enumerate(got) if d < len(names)}
    notes = [f"{names[d]}: {f}" for d, g in enumerate(got) for f in g["fallbacks"] if d < len(names)]
    return {"backends": used, "backend_fallbacks": notes,
            "backend_exact": all(is_exact(b) for b in used.values())}


def require_cluster(workers: int | None, cluster_file: str | None) -> None:
    """Say what is missing before anything slow (loading a model) happens."""
    if workers is None and not cluster_file:
        raise EdgeweaveError("give --workers K (local followers) or --cluster FILE (followers started by hand)")


def open_session(workers: int | None, cluster_file: str | None, listen: str = "0.0.0.0:29400",
                 timeout_s: float = 60.0, model_bytes: int = 0) -> Session:
    """``--workers K`` starts K local followers; ``--cluster FILE`` alone waits for followers started
    by hand (both: local followers planned with the file's profiles). Not yet entered.
    ``model_bytes``: the weights each local follower will hold (for the memory check)."""
    require_cluster(workers, cluster_file)
    check_timeout(timeout_s)
    profiles = Cluster.load(cluster_file) if cluster_file else None
    if workers is not None and profiles is not None and len(profiles.devices) != workers + 1:
        raise EdgeweaveError(f"the cluster file describes {len(profiles.devices)} devices; with --workers {workers} "
                             f"it needs {workers + 1} (the leader first)")
    if workers is not None:
        return LocalCluster(workers, profiles=profiles, timeout_s=timeout_s, model_bytes=model_bytes)
    assert profiles is not None
    return RemoteCluster(profiles, listen, timeout_s=timeout_s)


def load_sized(model_name: str, input_size: int | None) -> tuple[torch.nn.Module, Any, int]:
    """The model and the input size to run it at: ``input_size``, else the checkpoint's, else 224.
    The size is checked before the model is loaded (its range) and after (the model's minimum)."""
    check_input_size(input_size)
    model, spec = load_for_run(model_name, input_size or 224)
    default = int(spec.input_size[0])
    if input_size is None:  # a checkpoint knows the size it was trained for
        input_size = default
        check_input_size(input_size)
    check_input_fits(model, int(spec.in_channels), input_size, model_name, default)
    return model, spec, input_size


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights and buffers (what a follower receives)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _meta_error(model: torch.nn.Module, in_channels: int, size: int) -> str | None:
    """Why ``model`` cannot take a 1 x C x size x size input, from shapes alone: the model runs on
    the meta device (no FLOPs, no memory), its weights swapped for meta tensors. None: it can."""
    from torch.func import functional_call

    state = {k: torch.empty_like(v, device="meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}
    try:
        with torch.no_grad():
            functional_call(model, state, (torch.empty(1, in_channels, size, size, device="meta"),))
    except Exception as e:  # noqa: BLE001 - any model code; the caller decides what a failure means
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return None


def check_input_fits(model: torch.nn.Module, in_channels: int, size: int, model_name: str,
                     default: int | None = None) -> None:
    """Refuse an input size the model cannot take (a feature map would be empty: VGG needs 32),
    saying the smallest it can, before any process starts. Found by shapes only (:func:`_meta_error`,
    milliseconds); where the probe cannot run the model at any size (an operator without shape
    rules) it says nothing and the real run decides."""
    err = _meta_error(model, in_channels, size)
    if err is None:
        return
    if _meta_error(model, in_channels, MAX_INPUT_SIZE) is None:
        lo, hi = size, MAX_INPUT_SIZE  # lo fails, hi runs: the smallest size that runs, by bisection
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _meta_error(model, in_channels, mid) is None else (mid, hi)
        raise EdgeweaveError(f"--input-size {size} is too small for {model_name}: it needs at least {hi} ({err})")
    if default is not None and default != size and _meta_error(model, in_channels, default) is None:
        raise EdgeweaveError(f"{model_name} cannot run at --input-size {size} (it runs at {default}): {err}")


def run(model_name: str, input_size: int | None, workers: int | None, cfg: RunConfig, cluster_file: str | None = None,
        listen: str = "0.0.0.0:29400", timeout_s: float = 60.0) -> dict[str, Any]:
    """What ``edgeweave run`` does; returns the JSON result (see DESIGN.md's contract)."""
    cfg.validate()
    require_cluster(workers, cluster_file)
    check_timeout(timeout_s)
    check_input_size(input_size)
    if workers is not None:
        check_followers_fit(workers)  # the processes alone; with the model's size once it is loaded
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    model, spec, input_size = load_sized(model_name, input_size)
    x = torch.randn(cfg.batch, spec.in_channels, input_size, input_size)
    t_start = time.perf_counter()
    with open_session(workers, cluster_file, listen, timeout_s, model_bytes=model_bytes(model)) as session:
        startup_s = time.perf_counter() - t_start
        result = run_on_session(session, model_name, model, spec, x, cfg)
    result["startup_s"] = startup_s
    return result


def run_on_session(session: Session, model_name: str, model: torch.nn.Module, spec: Any, x: torch.Tensor,
                   cfg: RunConfig) -> dict[str, Any]:
    """Ship the model, plan, time ``cfg.repeat`` inferences of ``x``; the contract's JSON keys.
    With a rate or an SLO, serve them as a stream on groups of devices (runtime/slo.py)."""
    if cfg.rate is not None or cfg.slo_ms is not None:
        from edgeweave.runtime.slo import run_stream

        if cfg.adaptive:
            raise EdgeweaveError("--adaptive and --rate/--slo-ms cannot be combined yet: a stream on groups "
                                 "re-plans only when a device fails or joins")
        return run_stream(session, model_name, model, spec, x, cfg)
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
        "profiles": "default" if session.cluster.is_default else "given",
    }
    result.update(backend_report(session, plan))
    result.update(split_summary(session, plan))
    from edgeweave.planning.memory import memory_report

    result["memory"] = memory_report(plan, [d.memory_bytes for d in session.cluster.devices])
    result["breakdown"] = breakdown(result["timings"])
    if frames is not None:
        result["frames"] = frames
        result["replans"] = sum(f["event"] == "replanned" for f in frames)
        result["lost"] = [n for f in frames for n in f["lost"]]
    if cfg.check:
        ref, single_s = single_device(model, x, repeat=max(1, min(cfg.repeat, 3)))
        result.update(compare(y, ref))
        result["exact_backends"] = result["backend_exact"]  # False: a bf16 backend; rel_err is not float rounding
        result["single_device_s"] = single_s
        result["speedup"] = single_s / result["latency_s"] if result["latency_s"] > 0 else None
        result.update(reference_check(session, model_name, model, spec, x, ref, cfg))
    return result


def split_summary(session: Session, plan: Any) -> dict[str, Any]:
    """The plan's ``split_flops_fraction``, ``unsplit_nodes`` and ``transformer``
    (planning/coverage.py), from the graph the leader captured for it."""
    from edgeweave.planning.coverage import split_report

    gm = next((g for pl, g in session.plans.values() if pl is plan), None)
    return split_report(gm, plan) if gm is not None else {}


def reference_check(session: Session, model_name: str, model: torch.nn.Module, spec: Any, x: torch.Tensor,
                    ref: Any, cfg: RunConfig) -> dict[str, Any]:
    """Whether the single-device output ``ref`` proves anything (``reference_degenerate``,
    ``reference_note``: models/calibrate.py) and, when it does not, the same check on a
    calibrated copy of the model (zero weights drawn again, BatchNorm statistics measured)
    shipped and planned like the original: ``recheck`` holds its errors, or ``could_not``.
    The session then holds the copy; every run ships its model first."""
    from edgeweave.models.calibrate import calibrated_copy, degenerate_reason

    why = degenerate_reason(model, x, ref)
    out: dict[str, Any] = {"reference_degenerate": why is not None}
    if why is None:
        return out
    out["reference_note"] = why
    twin, done = calibrated_copy(model, tuple(x.shape))
    with torch.no_grad():
        ref2 = twin(x)
    still = degenerate_reason(twin, x, ref2)
    if still is not None:
        out["recheck"] = {"done": done, "could_not": f"a calibrated copy does not help either: {still}"}
        return out
    session.load_model(twin, spec)
    plan = plan_for(session, twin, tuple(x.shape), cfg, model_name)
    y2, _ = session.infer(x, session.load_plan(plan))
    out["recheck"] = {"done": done, **compare(y2, ref2)}
    return out


KIND_NOTES = {
    "spatial": "spatial: each device computes a strip of rows (plus the halo rows its kernels need)",
    "channels": "channels: each device computes every row of a slice of the output channels (ca-b) from the "
                "whole input map",
    "linear": "linear: a fully connected layer split by output features (a-b: features)",
    "reduce": "reduce: a global pooling, each device summing its own rows and the leader adding the sums",
    "leader": "leader: on the leader alone",
}


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1e3 * seconds:.1f}"


def _span(nodes: list[str]) -> str:
    return nodes[0] if len(nodes) == 1 else f"{nodes[0]} … {nodes[-1]} ({len(nodes)})"


def _rows_cell(out_rows: Any, stage: dict[str, Any]) -> str:
    """``a-b`` (rows [a, b) of the stage's output; ``ca-b``: channels [a, b) of it, every row),
    ``all``, or ``-`` (the device sits it out)."""
    a, b = int(out_rows[0]), int(out_rows[1])
    if b <= a:
        return "-"
    shape = stage.get("output_shape") or []
    channels = stage.get("split") == "channels"
    full = shape[1] if channels else shape[2] if len(shape) == 4 else shape[1] if len(shape) >= 2 else None
    return "all" if a == 0 and b == full else f"{'c' if channels else ''}{a}-{b}"


def plan_table(res: dict[str, Any], measured_s: list[float] | None = None, width: int | None = None) -> Any:
    """The plan as a table readable at 80 columns: one row per stage, one column per device
    (its output rows), predicted and (``measured_s``, per stage) measured milliseconds; the
    notes under it say what the notation means and whether the profiles were measured.
    Too many devices for the width: one column lists ``name a-b`` per device instead."""
    from rich import box
    from rich.console import Group
    from rich.table import Table

    from edgeweave.console import console

    plan = res["plan"]
    names = list(plan["devices"])
    stages = plan["stages"]
    width = width or console.width
    cells = [[_rows_cell(a["out_rows"], s) for a in sorted(s["assignments"], key=lambda a: a["device"])]
             for s in stages]
    cells = [c + ["-"] * (len(names) - len(c)) for c in cells]
    fixed = [max(1, *(len(str(s["index"])) for s in stages)), len("spatial"), 16, len("pred ms")]
    if measured_s is not None:
        fixed.append(len("meas ms"))
    dev_w = [max(len(n), *(len(c[d]) for c in cells)) for d, n in enumerate(names)]
    per_device = sum(w + 2 for w in fixed + dev_w) <= width
    size = res["input_size"]
    t = Table(title=f"plan: {res['model']} {size}x{size}, batch {res.get('batch', 1)}, {len(names)} devices "
                    f"({res['partition']}, fusion {res['fusion']}, {res['mode']})",
              box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True, title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("kind")
    t.add_column("layers", min_width=12, max_width=None if per_device else 18, overflow="fold")
    if per_device:
        for n in names:
            t.add_column(n, justify="right", no_wrap=True)
    else:
        t.add_column("rows by device", min_width=16)
    t.add_column("pred ms", justify="right", no_wrap=True)
    if measured_s is not None:
        t.add_column("meas ms", justify="right", no_wrap=True)
    for i, (s, c) in enumerate(zip(stages, cells)):
        rows = c if per_device else [", ".join(f"{n}:{r}" for n, r in zip(names, c) if r != "-")]
        more = [_ms(measured_s[i]) if i < len(measured_s) else ""] if measured_s is not None else []
        kind = "channels" if s.get("split") == "channels" else s["kind"]
        t.add_row(str(s["index"]), kind, _span(s["nodes"]), *rows, _ms(s["predicted_s"]), *more)
    return Group(t, *plan_notes(res))


def plan_notes(res: dict[str, Any]) -> list[str]:
    """What a plan table's notation means, and a warning when the profiles are defaults."""
    kinds = [k for k in KIND_NOTES if any((s["kind"] if s.get("split") != "channels" else "channels") == k
                                          for s in res["plan"]["stages"])]
    notes = ["rows a-b: the device computes output rows [a, b) of the stage's feature map (all: every row, "
             "-: none); " + "; ".join(KIND_NOTES[k] for k in kinds) + "."]
    if res.get("profiles") == "default":
        notes.append("[yellow]uncalibrated:[/yellow] default profiles (every device 10 GFLOP/s, 1 Gbit/s links), "
                     "not measurements: predicted times and speedups follow from these guesses, they are no "
                     "promise. Measure each device with `edgeweave profile` and give --cluster FILE.")
    if "split_flops_fraction" in res:  # planning/coverage.py
        from edgeweave.planning.coverage import report_lines

        notes += report_lines(res)
    if res.get("memory"):  # planning/memory.py
        from edgeweave.planning.memory import memory_line

        notes.append(memory_line(res["memory"]))
    left = res["plan"].get("meta", {}).get("left_out")
    if left:  # planner._fitting_plan
        notes.append(f"left out: {', '.join(left)} (too little memory for any share of the work; "
                     "it stays in the cluster and computes nothing in this plan)")
    return notes


def result_table(res: dict[str, Any]) -> Any:
    """The plan with each stage's predicted and measured time (the fastest inference's)."""
    return plan_table(res, measured_s=[st["wall_s"] for st in res["timings"]["stages"] if st["index"] != "final"])


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
    """The measured latency against the prediction (and one device, with --check); below it,
    where the fastest inference's time went."""
    line = (f"latency {_ms(res['latency_s'])} ms (median of {len(res['latencies_s'])}), "
            f"predicted {_ms(res['predicted_s'])} ms" + (" (default profiles)" if res.get("profiles") == "default" else ""))
    if "rel_err" in res:
        line += f"; one device {_ms(res['single_device_s'])} ms; rel_err {res['rel_err']:.1e}"
        if not res.get("backend_exact", True):
            line += " (a bf16 backend: not exact by design)"
        if res.get("reference_degenerate"):
            line += (f"\n[yellow]warning:[/yellow] the single-device output proves nothing ({res['reference_note']}); "
                     "rel_err above means nothing")
            re = res.get("recheck") or {}
            if "rel_err" in re:
                line += f"\nre-checked with a calibrated copy ({'; '.join(re['done']) or 'as is'}): rel_err {re['rel_err']:.1e}"
            elif re:
                line += f"\n[yellow]could not re-check:[/yellow] {re['could_not']}"
    used = sorted(set((res.get("backends") or {}).values()))
    if used:
        line += "\nbackend: " + (used[0] if len(used) == 1 else
                                 ", ".join(f"{d} {b}" for d, b in res["backends"].items()))
    for note in res.get("backend_fallbacks", []):
        line += f"\n  {note}"
    b = res.get("breakdown")
    if b:
        line += (f"\nfastest inference {_ms(b['total_s'])} ms = compute {_ms(b['compute_s'])} + imbalance "
                 f"{_ms(b['imbalance_s'])} + transfers/sync {_ms(b['other_s'])} ms")
    return line
