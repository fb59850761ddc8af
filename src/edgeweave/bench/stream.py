"""``edgeweave bench stream``: frames per second of a stream on the emulated cluster, one frame at
a time against groups of devices serving frames at once, under per-frame latency SLOs.

On the testbed (leader + 4 followers at 0.25 core each, 1000 Mbit/s links), for each model:
- the single-device frame rate (plain torch, and raw ONNX Runtime, on one capped device, warm,
  interleaved) as the baseline;
- ``one``: today's plan, every device on every frame, one frame at a time;
- ``pipelined``: the same plan with two frames in flight (each device computes one while the
  other waits for rows);
- ``singles``: every device a group of its own (five frames in flight);
- ``relaxed`` and ``tight``: the planner's grouping (planning/throughput.py) for an SLO of 1.25x
  one device's latency and of 1.5x the one-frame-at-a-time five-device latency measured here.
Each configuration serves a burst (all frames at once: its capacity, as answers per second
between the first and the last answer) and then streams offered at several shares of that
capacity, whose latency percentiles count from each frame's arrival. The configuration's result
is the stream with the highest offered rate whose p95 keeps its SLO (without an SLO: the highest
rate served). Every output is compared with the whole model's.

Summary keys: ``throughput_ratio_<model>_relaxed`` / ``_tight`` (frames/s served at that rate
over one device's frame rate; None where no offered rate kept the SLO), ``p95_over_slo_max``,
``lost_frames``, ``max_rel_err``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeweave.cli.common import console
from edgeweave.errors import EdgeweaveError

NAMES = ["leader", "w1", "w2", "w3", "w4"]


@dataclass
class StreamBenchConfig:
    models: list[str] = field(default_factory=lambda: ["vgg16", "resnet18"])
    size: int = 224
    cpu: float = 0.25
    rate: str = "1000mbit"
    frames: int = 40
    single_rounds: int = 5
    load_factors: tuple[float, ...] = (0.7, 0.85, 1.0)  # offered rates, as shares of the burst's capacity
    prefix: str = "ewv-"
    subnet: str = "10.77.36.0/24"
    timeout_s: float = 900.0
    serve_clients: int = 50  # concurrent clients of serve --slo-ms (0: no serve phase)
    serve_seconds: float = 60.0  # how long they send requests
    quick: bool = False

    @classmethod
    def quick_config(cls) -> StreamBenchConfig:
        return cls(models=["vgg16"], frames=25, single_rounds=3, serve_seconds=40.0, quick=True)


def run_stream_bench(cfg: StreamBenchConfig | None = None, out_dir: Path = Path("results")) -> dict[str, Any]:
    """Bring the testbed up, profile, serve every configuration; JSON (and a plot) under
    ``out_dir/stream``. Needs root and Linux."""
    import torch

    from edgeweave.bench import tbcluster as T
    from edgeweave.testbed import Testbed, emulation_support

    torch.set_num_threads(1)
    cfg = cfg or StreamBenchConfig()
    ok, why = emulation_support()
    if not ok:
        raise EdgeweaveError(f"bench stream needs the emulated testbed (root, Linux, iproute2, cgroups): {why}")
    out = Path(out_dir) / "stream"
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    before = T.machine_state()
    console.print(f"[bold]bench stream[/bold] ({'quick' if cfg.quick else 'full'}): load average {before['loadavg']}")
    spec = {"prefix": cfg.prefix, "subnet": cfg.subnet,
            "devices": [{"name": n, "cpu": cfg.cpu, "bandwidth": cfg.rate} for n in NAMES]}
    models: dict[str, Any] = {}
    tb = Testbed.up(spec)
    try:
        console.print(f"profiling {cfg.cpu:g} core inside the testbed...")
        profiles = T.profile_caps(tb, [cfg.cpu], quick=True, workdir=work / "profiles", timeout_s=cfg.timeout_s)
        goodput = T.measure_rates(tb, [cfg.rate])
        cluster = T.planner_cluster(NAMES, [cfg.cpu] * len(NAMES), [cfg.rate] * len(NAMES), profiles, goodput)
        for name in cfg.models:
            models[name] = _run_model(tb, cfg, name, cluster, work, T)
    finally:
        tb.down()
    after = T.machine_state()
    result = {"config": asdict(cfg), "models": models, "machine_before": before, "machine_after": after,
              "seconds": time.perf_counter() - t_start}
    result["summary"] = summarize(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream.json").write_text(json.dumps(result, indent=2))
    result["files"] = {"json": str(out / "stream.json"), "plot": _plot(result, out / "stream.png")}
    (out / "stream.json").write_text(json.dumps(result, indent=2))
    return result


def _run_model(tb: Any, cfg: StreamBenchConfig, name: str, cluster: Any, work: Path, T: Any) -> dict[str, Any]:
    from edgeweave.checkpoint import load_checkpoint
    from edgeweave.planning.graph import capture
    from edgeweave.planning.throughput import one_group, plan_groups

    ckpt, mhash = T.write_checkpoint(name, work / f"{name}-{cfg.size}.safetensors", cfg.size)
    model, _spec, _ = load_checkpoint(ckpt)
    gm = capture(model.eval(), (1, 3, cfg.size, cfg.size))
    console.print(f"{name}: single-device baselines on {NAMES[0]} ({cfg.single_rounds} rounds, interleaved)...")
    single: dict[str, list[float]] = {"torch": [], "ort": []}
    with T.SingleDevice(tb, NAMES[0], str(ckpt), cfg.size, timeout_s=cfg.timeout_s) as st, \
            T.SingleDevice(tb, NAMES[0], str(ckpt), cfg.size, timeout_s=cfg.timeout_s, runtime="ort") as so:
        for _ in range(cfg.single_rounds):
            single["torch"].append(st.time_once())
            single["ort"].append(so.time_once())
    single_s = {k: statistics.median(v) for k, v in single.items()}
    console.print(f"  one device: torch {single_s['torch']:.3f} s, ONNX Runtime {single_s['ort']:.3f} s per frame")
    opts = dict(model_name=name, model_hash=mhash, backend="torch")
    rows: dict[str, Any] = {}
    with T.BenchCluster(tb, ckpt, cluster, work / f"cluster-{name}", timeout_s=cfg.timeout_s,
                        driver="edgeweave.bench.stream_driver") as bc:
        def serve(label: str, gplan: Any, slo_s: float | None) -> dict[str, Any]:
            path = work / f"{name}-{label}.json"
            path.write_text(gplan.to_json())
            burst = bc.call({"op": "stream", "path": str(path), "frames": cfg.frames}, timeout_s=cfg.timeout_s)
            capacity = burst["fps_steady"] or burst["fps"]
            groups = [g.devices for g in gplan.groups]
            console.print(f"  {label:9s} groups {' | '.join('+'.join(g) for g in groups)} x{gplan.slots}: burst "
                          f"{capacity:.2f}/s"
                          + (f"; SLO {slo_s:.2f} s" if slo_s else ""))
            streams = []
            for f in cfg.load_factors:
                r = _brief(bc.call({"op": "stream", "path": str(path), "frames": cfg.frames, "rate": f * capacity},
                                   timeout_s=cfg.timeout_s))
                r["offered_fps"] = f * capacity
                streams.append(r)
                console.print(f"    offered {f * capacity:.2f}/s -> {r['served_fps']:.2f}/s, p50 {r['p50_s']:.2f} s, "
                              f"p95 {r['p95_s']:.2f} s")
            kept = [r for r in streams if slo_s is None or r["p95_s"] <= slo_s]
            best = max(kept, key=lambda r: r["offered_fps"]) if kept else None
            row = {"groups": groups, "slots": gplan.slots, "slo_s": slo_s, "predicted_fps": gplan.fps,
                   "predicted_latency_s": gplan.latency_s, "feasible": gplan.feasible, "burst": _brief(burst),
                   "capacity_fps": capacity, "streams": streams, "best": best,
                   "p95_over_slo": (min(r["p95_s"] for r in streams) / slo_s if best is None else best["p95_s"] / slo_s)
                   if slo_s else None,
                   "lost_frames": (1 + len(streams)) * cfg.frames - burst["count"] - sum(r["count"] for r in streams),
                   "rel_err": max([burst["rel_err"]] + [r["rel_err"] for r in streams])}
            return row

        every = [list(range(len(NAMES)))]
        rows["one"] = serve("one", one_group(gm, cluster, **opts), None)
        one_latency = rows["one"]["burst"]["service_p50_s"]  # one frame at a time: its service time
        rows["pipelined"] = serve("pipelined", plan_groups(gm, cluster, groupings=[every], slots=2, **opts), None)
        rows["singles"] = serve("singles", plan_groups(gm, cluster, groupings=[[[i] for i in range(len(NAMES))]],
                                                       **opts), None)
        for label, slo in (("relaxed", 1.25 * single_s["torch"]), ("tight", 1.5 * one_latency)):
            rows[label] = serve(label, plan_groups(gm, cluster, slo_s=slo, slots=None, **opts), slo)
        served = None
        if cfg.serve_clients:
            try:
                served = _serve(tb, bc, cfg, name, gm, cluster, rows, 1.25 * single_s["torch"], work, opts)
            except EdgeweaveError as e:  # reported in the JSON and the summary; the failover still runs
                console.print(f"[red]  serve phase failed: {e}[/red]")
                served = {"error": str(e)}
        failover = _failover(bc, cfg, name, gm, cluster, rows, 1.25 * single_s["torch"], work, opts)
    return {"checkpoint": str(ckpt), "hash": mhash, "single_s": single_s, "single_times_s": single,
            "one_frame_latency_s": one_latency, "rows": rows, "serve": served, "failover": failover}


def _serve(tb: Any, bc: Any, cfg: StreamBenchConfig, name: str, gm: Any, cluster: Any, rows: dict[str, Any],
           slo_s: float, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """``serve --slo-ms`` at the relaxed SLO (its groups planned as the command plans them: one
    request per group) under ``serve_clients`` concurrent clients, against the relaxed stream's
    figure: answers per second, refusals, and whether ``/v1/stats`` and ``/metrics`` counted
    every refusal the clients saw."""
    import subprocess
    import sys

    from edgeweave.bench.stream_clients import summarize_clients
    from edgeweave.planning.throughput import plan_groups

    gplan = plan_groups(gm, cluster, slo_s=slo_s, slots=1, **opts)
    path = (work / f"{name}-serve.json").resolve()
    path.write_text(gplan.to_json())
    started = bc.call({"op": "serve_start", "path": str(path), "slo_s": slo_s, "clients": cfg.serve_clients,
                       "model": name}, timeout_s=cfg.timeout_s)
    ref = (work / f"{name}-serve-ref.json").resolve()
    ref.write_text(json.dumps(started["ref"]))
    console.print(f"  serve --slo-ms {1e3 * slo_s:.0f}: groups "
                  f"{' | '.join('+'.join(g.devices) for g in gplan.groups)}, {cfg.serve_clients} clients for "
                  f"{cfg.serve_seconds:g} s...")
    argv = [sys.executable, "-m", "edgeweave.bench.stream_clients", "--url", started["url"], "--clients",
            str(cfg.serve_clients), "--seconds", str(cfg.serve_seconds), "--size", str(cfg.size), "--ref", str(ref)]
    proc = tb.exec(NAMES[0], argv, cgroup=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=cfg.serve_seconds + cfg.timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    stopped = bc.call({"op": "serve_stop"}, timeout_s=cfg.timeout_s)
    if proc.returncode != 0 or not out.strip():
        raise EdgeweaveError(f"bench stream: the serve clients failed (exit {proc.returncode}): {err[-2000:]}")
    raw = json.loads(out.strip().splitlines()[-1])
    res = summarize_clients(raw)
    best = rows["relaxed"]["best"]
    bench_fps = best["served_fps"] if best else None
    res |= {"groups": [list(g.devices) for g in gplan.groups], "slo_s": slo_s, "clients": cfg.serve_clients,
            "seconds": cfg.serve_seconds, "warm_s": started["warm_s"], "bench_relaxed_fps": bench_fps,
            "ratio_to_bench": res["fps"] / bench_fps if res["fps"] and bench_fps else None,
            "p95_over_slo": res["p95_s"] / slo_s if res["p95_s"] else None,
            "server_stats": stopped["stats"], "answers": raw["answers"]}
    console.print(f"    answered {res['answered']} ({res['fps'] or 0:.2f}/s, "
                  f"{res['ratio_to_bench'] or 0:.2f} of the relaxed stream's {bench_fps or 0:.2f}/s), p95 "
                  f"{res['p95_s'] or 0:.2f} s; refused {res['refused']} (counted by the server: "
                  f"{'yes' if res['refusals_counted'] else 'NO'}), errors {res['errors']}")
    return res


VICTIM = "w3"


def _failover(bc: Any, cfg: StreamBenchConfig, name: str, gm: Any, cluster: Any, rows: dict[str, Any],
              slo_s: float, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """The relaxed stream at its best offered rate with a follower killed a third of the way in:
    every frame must be answered; then the four devices left serve a burst, and the stream's
    rate after the regrouping is compared with it."""
    import threading

    from edgeweave.planning.throughput import plan_groups
    from edgeweave.profiling.profile import Cluster

    best = rows["relaxed"]["best"] or rows["relaxed"]["streams"][0]
    rate = best["offered_fps"]
    before = plan_groups(gm, cluster, slo_s=slo_s, slots=None, **opts)
    left = Cluster([d for d in cluster.devices if d.name != VICTIM])
    after = plan_groups(gm, left, slo_s=slo_s, slots=None, **opts)
    paths = {}
    for label, gp in (("before", before), ("after", after)):
        paths[label] = work / f"{name}-failover-{label}.json"
        paths[label].write_text(gp.to_json())
    frames = 2 * cfg.frames
    kill_at = (frames / rate) / 3
    timer = threading.Timer(kill_at + 0.5 * len(before.groups), bc.kill, args=(VICTIM,))
    console.print(f"  failover: {frames} frames offered at {rate:.2f}/s, {VICTIM} killed after ~{kill_at:.1f} s")
    timer.start()
    try:
        r = bc.call({"op": "stream", "path": str(paths["before"]), "fallback": str(paths["after"]),
                     "frames": frames, "rate": rate}, timeout_s=cfg.timeout_s)
    finally:
        timer.cancel()
    regrouped = next((e for e in r["events"] if e["kind"] == "regrouped"), None)
    burst = bc.call({"op": "stream", "path": str(paths["after"]), "frames": cfg.frames}, timeout_s=cfg.timeout_s)
    four = burst["fps_steady"] or burst["fps"]
    recovery = _recovery(r["frames"], regrouped["at_s"] if regrouped else None, min(rate, four))
    out = {"victim": VICTIM, "offered_fps": rate, "frames": frames, "answered": r["count"],
           "lost_frames": frames - r["count"], "events": r["events"], "rel_err": r["rel_err"],
           "four_device_fps": four, **recovery, "stream": _brief(r), "groups_after": after.to_dict()["groups"]}
    console.print(f"    answered {r['count']}/{frames}; regrouped at {regrouped['at_s'] if regrouped else None}; "
                  f"four devices {four:.2f}/s; back within 10 % after {recovery['frames_to_recover']} frames")
    return out


def _recovery(frames: list[dict[str, Any]], at_s: float | None, reference_fps: float, window: int = 3,
              tol: float = 0.10) -> dict[str, Any]:
    """Frames answered after the regrouping until the answer rate over ``window`` consecutive
    answers is within ``tol`` of ``reference_fps`` (the rate the survivors can sustain at the
    offered rate): None if it never is."""
    if at_s is None:
        return {"frames_to_recover": None, "rate_after": None}
    ends = sorted(f["end_s"] for f in frames if f["end_s"] > at_s)
    for i in range(len(ends) - window):
        rate = window / (ends[i + window] - ends[i]) if ends[i + window] > ends[i] else float("inf")
        if rate >= (1 - tol) * reference_fps:
            return {"frames_to_recover": i + window, "rate_after": rate}
    return {"frames_to_recover": None, "rate_after": None}


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    service = sorted(f["service_s"] for f in r["frames"])
    return {k: r[k] for k in ("count", "fps", "fps_steady", "p50_s", "p95_s", "max_s", "rel_err", "groups")} | {
        "served_fps": r["fps_steady"] or r["fps"], "service_p50_s": service[len(service) // 2], "frames": r["frames"]}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    over, lost, errs = [], 0, []
    for name, m in result["models"].items():
        base_fps = 1.0 / m["single_s"]["torch"]
        ort_fps = 1.0 / m["single_s"]["ort"]
        for label, row in m["rows"].items():
            best = row["best"]
            fps = best["served_fps"] if best else None
            s[f"fps_{name}_{label}"] = fps
            s[f"p95_{name}_{label}"] = best["p95_s"] if best else None
            s[f"ratio_{name}_{label}"] = fps / base_fps if fps else None
            s[f"ratio_{name}_{label}_over_ort"] = fps / ort_fps if fps else None
            lost += row["lost_frames"]
            errs.append(row["rel_err"])
            if row["p95_over_slo"] is not None:
                over.append(row["p95_over_slo"])
                s[f"throughput_ratio_{name}_{label}"] = fps / base_fps if fps else None
        sv = m.get("serve")
        if sv and "error" in sv:
            s[f"serve_error_{name}"] = sv["error"]
        elif sv:
            s[f"serve_fps_{name}"] = sv["fps"]
            s[f"serve_ratio_to_bench_{name}"] = sv["ratio_to_bench"]
            s[f"serve_p95_over_slo_{name}"] = sv["p95_over_slo"]
            s[f"serve_refused_{name}"] = sv["refused"]
            s[f"serve_refusals_counted_{name}"] = sv["refusals_counted"]
            s[f"serve_errors_{name}"] = sv["errors"]
            if sv["rel_err"] is not None:
                errs.append(sv["rel_err"])
        fo = m.get("failover")
        if fo:
            lost += fo["lost_frames"]
            errs.append(fo["rel_err"])
            s[f"failover_frames_to_recover_{name}"] = fo["frames_to_recover"]
            s[f"failover_lost_frames_{name}"] = fo["lost_frames"]
    s["p95_over_slo_max"] = max(over) if over else None
    s["lost_frames"] = lost
    s["max_rel_err"] = max(errs) if errs else None
    return s


def _plot(result: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in result["models"].items():
        base = 1.0 / m["single_s"]["torch"]
        for label, row in m["rows"].items():
            xs = [r["p95_s"] for r in row["streams"]]
            ys = [r["served_fps"] / base for r in row["streams"]]
            ax.plot(xs, ys, marker="o", label=f"{name} {label}")
            if row["slo_s"]:
                ax.axvline(row["slo_s"], ls=":", lw=0.8, color=ax.lines[-1].get_color())
        sv = m.get("serve") or {}
        if sv.get("fps") and sv.get("p95_s"):
            ax.plot([sv["p95_s"]], [sv["fps"] / base], "*", ms=12, color="black",
                    label=f"{name} serve --slo-ms, {sv['clients']} HTTP clients")
    ax.set_xlabel("p95 latency of the offered stream (s)")
    ax.set_ylabel("frames/s over one device (torch)")
    ax.set_title("bench stream: throughput vs p95 latency (dotted: SLOs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
