"""`edgeweave bench edgedi`: EdgeDI's experiments (ALGORITHMS.md section 3) on the emulated testbed.

What runs (one testbed of 4 devices, leader first: ``leader`` 0.25 core and ``w1`` 0.375 core on
1000 Mbit/s links, ``w2`` 0.25 core and ``w3`` 0.375 core on 100 Mbit/s links):

1. **Compression x distribution.** For each base model (VGG16 and ResNet18 at 200x200, one input
   channel, 6 classes as NEU-CLS; seeded random weights, which is fine for latency) three
   variants: the original, the EdgeDI compact form (``compact_<base>``) and the compact form
   pruned structurally with ``edgeweave.compress.prune.prune_l1_once`` at a fixed ratio. Each
   runs on the first 1..4 devices (partition ``optimal``, fusion ``auto``). Beside every
   measured speedup (the model alone on the 0.25-core leader, plain torch, over the latency on
   k devices) is the theoretical bound for the same model: the sum of the k devices' speeds
   over the leader's speed, a device's speed being 1 / its measured single-device latency.
   The single-device runs (one warm process per distinct cap, in that device's namespace and
   cap) join the round-robin of the distributed frames, one run each per round: the bound then
   compares speeds measured within seconds of each other and of the frames (measured one
   device after the other before the frames, the leader-to-w1 ratio came out anywhere from
   1.33 to 1.92 for a 1.5x cap ratio, and the bound with it: runs AD and AF).
2. **Adaptive partitioning.** A stream of frames of the original VGG16 (``adapt_model``; its
   plans are the ones the profiles predict well) on all 4 devices,
   served by the leader's :class:`edgeweave.runtime.stream.AdaptiveStream`; after a few frames
   ``w2``'s CPU cap drops from 0.25 to 0.1 core, later it goes back. Per frame: latency, plan
   version, speed estimates. The reference after each change is the prediction of the best
   plan for the new caps (planned on the stream's calibrated speeds with the changed device
   slowed by the cap ratio), times the stream's latency ratio learnt before the change
   (measured / cost-model latency over steady frames: the share of synchronisation and
   overheads the cost model leaves out); recovery against the raw prediction and against the
   oracle plan measured once during the slow phase is reported beside it.

The leader runs inside its own namespace and cap (:mod:`edgeweave.bench.edgedi_driver` via
:class:`edgeweave.bench.tbcluster.BenchCluster`), followers load the checkpoint from disk, and
the planner sees ``edgeweave profile`` lines measured inside capped namespaces and the links'
measured goodput (same harness as ``bench edgeld``).

Summary keys: ``compact_flops_ratio`` (compact VGG16 FLOPs over the original's),
``speedup_vs_bound`` (measured speedup over the bound, original main model, 4 devices),
``compact_speedup_4dev`` (original on the leader alone over compact on 4 devices),
``speedup_4dev_over_ort`` (the 4-device latency against raw ONNX Runtime on the whole model on
the leader alone, ``kernels.raw_ort``, timed in the same rounds as plain torch),
``adapt_frames_to_recover`` (worst of the two cap changes, against a latency measured in the run:
the best plan for the new cap, the steady latency before the drop; ``adapt_not_recovered`` says
why a change has none), ``adapt_replans_steady``;
``work_ratio_4dev`` / ``speedup_ceiling_4dev`` (the CPU the four devices used per frame, from
their cgroups, over one frame on the leader alone, and the bound over it: the most any plan doing
that work could reach, ``tbcluster.cpu_ceiling``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeweave.bench.tbcluster import cpu_ceiling
from edgeweave.jsonio import write_json
from edgeweave.console import console
from edgeweave.errors import EdgeweaveError

NAMES = ("leader", "w1", "w2", "w3")
PREFIX = "ewd-"  # not edgeld's: both benchmarks may be up at once
SUBNET = "10.77.33.0/24"  # not edgeld's (30) nor the CI testbed test's (31)
TARGETS = {"speedup_vs_bound": (">=", 0.9), "adapt_frames_to_recover": ("<=", 5), "adapt_replans_steady": ("<=", 0)}


@dataclass
class EdgediConfig:
    models: tuple[str, ...] = ("vgg16", "resnet18")  # the first is the main model
    variants: tuple[str, ...] = ("original", "compact", "compact_pruned")
    size: int = 200
    in_channels: int = 1
    num_classes: int = 6
    compact_ratio: int = 8
    prune_ratio: float = 0.5
    devices: tuple[int, ...] = (1, 2, 3, 4)
    caps: tuple[float, ...] = (0.25, 0.375, 0.25, 0.375)
    rates: tuple[str, ...] = ("1000mbit", "1000mbit", "100mbit", "100mbit")
    partition: str = "optimal"
    fusion: str = "auto"
    mode: str = "exchange"
    repeat: int = 3
    adapt_model: str = "vgg16"  # the model whose plans the profiles predict well (ResNet18's small layers: not)
    adapt_device: str = "w2"
    adapt_caps: tuple[float, float] = (0.25, 0.1)
    # calibrate, steady, low cap, back; the calibration evaluation comes after warm-up + 8 frames
    # (AdaptPolicy.calibrate_after), inside the first phase
    adapt_frames: tuple[int, int, int, int] = (10, 8, 12, 12)
    adapt_policy: tuple[tuple[str, float], ...] = ()  # AdaptPolicy overrides
    # then a follower dies (SIGKILL) mid-stream: frames served without it, and after it comes back
    failover_device: str = "w1"
    failover_frames: tuple[int, int] = (6, 6)
    failover_join_timeout_s: float = 300.0  # for the restarted follower to boot and register
    profile_quick: bool = True
    model_latency: bool = True
    ort_baseline: bool = True  # raw ONNX Runtime on the leader alone beside plain torch (``*_over_ort``)
    quick: bool = False
    timeout_s: float = 600.0
    prefix: str = PREFIX  # testbed names (tests use their own so they never touch a running bench)
    subnet: str = SUBNET

    @classmethod
    def quick_config(cls) -> "EdgediConfig":
        """A few minutes: ResNet18 only at 96x96, 1/2/4 devices, 2 repeats, shorter stream."""
        return cls(models=("resnet18",), size=96, devices=(1, 2, 4), repeat=2,
                   adapt_model="resnet18", adapt_frames=(5, 5, 8, 8), adapt_policy=(("calibrate_after", 3),), quick=True)


# ------------------------------------------------------------------------------------ models
def build_variant(base: str, variant: str, cfg: EdgediConfig, seed: int = 0) -> Any:
    """The model for ``variant`` (seeded weights). Pruning removes ``prune_ratio`` of every
    prunable conv's filters by L1 norm (structural: the layers really shrink)."""
    import torch

    from edgeweave.models import build_model

    torch.manual_seed(seed)
    if variant == "original":
        m = build_model(base, num_classes=cfg.num_classes, in_channels=cfg.in_channels)
    elif variant in ("compact", "compact_pruned"):
        m = build_model(f"compact_{base}", num_classes=cfg.num_classes, in_channels=cfg.in_channels, ratio=cfg.compact_ratio)
        if variant == "compact_pruned":
            from edgeweave.compress.prune import prune_l1_once

            prune_l1_once(m, (1, cfg.in_channels, cfg.size, cfg.size), cfg.prune_ratio)
    else:
        raise EdgeweaveError(f"unknown variant {variant!r}")
    return m.eval()


def write_variant(base: str, variant: str, cfg: EdgediConfig, path: Path) -> tuple[Path, str, dict[str, Any]]:
    """Save the variant once; returns the path, its weights' hash and its size (params, FLOPs)."""
    from edgeweave.checkpoint import ModelSpec, load_checkpoint, model_hash, save_checkpoint
    from edgeweave.planning.cost import node_flops
    from edgeweave.planning.graph import capture

    path = Path(path)
    if path.is_file():
        m, _s, _ = load_checkpoint(path)
    else:
        m = build_variant(base, variant, cfg)
        name = base if variant == "original" else f"compact_{base}"
        kw = {} if variant == "original" else {"ratio": cfg.compact_ratio}
        spec = ModelSpec(name, cfg.num_classes, cfg.in_channels, (cfg.size, cfg.size), kw)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.safetensors")
        save_checkpoint(tmp, m, spec, extra={"variant": variant})
        tmp.replace(path)
    m.eval()
    gm = capture(m, (1, cfg.in_channels, cfg.size, cfg.size))
    flops = sum(node_flops(gm, n) for n in gm.graph.nodes)
    return path, model_hash(m), {"params": sum(p.numel() for p in m.parameters()), "flops": flops}


# ------------------------------------------------------------------------------------ running
def run_edgedi_bench(cfg: EdgediConfig | None = None, out_dir: Path = Path("results")) -> dict[str, Any]:
    """Bring the testbed up, profile, run every configuration and the adaptive stream; write
    JSON/CSV/PNG/markdown under ``out_dir/edgedi``. Needs root and Linux."""
    import torch

    from edgeweave.bench import tbcluster as T
    from edgeweave.testbed import Testbed, emulation_support

    torch.set_num_threads(1)
    cfg = cfg or EdgediConfig()
    ok, why = emulation_support()
    if not ok:
        raise EdgeweaveError(f"bench edgedi needs the emulated testbed (root, Linux, iproute2, cgroup v1): {why}")
    out = Path(out_dir) / "edgedi"
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    t_start = time.perf_counter()
    state_before = T.machine_state()
    console.print(f"[bold]bench edgedi[/bold] ({'quick' if cfg.quick else 'full'}): load average {state_before['loadavg']}")
    spec = {"prefix": cfg.prefix, "subnet": cfg.subnet,
            "devices": [{"name": n, "cpu": c, "bandwidth": r} for n, c, r in zip(NAMES, cfg.caps, cfg.rates)]}
    rows: list[dict[str, Any]] = []
    models: dict[str, dict[str, Any]] = {}
    adapt: dict[str, Any] = {}
    tb = Testbed.up(spec)
    try:
        caps = sorted({*cfg.caps, *cfg.adapt_caps})
        console.print(f"profiling caps {caps} inside the testbed...")
        profiles = T.profile_caps(tb, caps, quick=cfg.profile_quick, workdir=work / "profiles", timeout_s=cfg.timeout_s)
        goodput = T.measure_rates(tb, sorted(set(cfg.rates), key=lambda r: -float(r.rstrip("mbit"))))
        console.print("links: " + ", ".join(f"{r} -> {v / 1e6:.0f} Mbit/s" for r, v in goodput.items()))
        lat_caps = sorted(set(cfg.caps) | {cfg.adapt_caps[0]})
        latencies, sync = (T.message_latencies(tb, NAMES, lat_caps)
                           if cfg.model_latency else ({}, {}))
        byte_s = T.byte_costs(sync)
        console.print("per-message latency (planner): " + ", ".join(f"{c:g} core {1e3 * v:.2f} ms" for c, v in latencies.items())
                      + "; CPU per MB moved: " + ", ".join(f"{c:g} core {1e9 * v:.1f} ms" for c, v in byte_s.items()))
        for base in cfg.models:
            for variant in cfg.variants:
                key = f"{base}/{variant}"
                ckpt, mhash, size = write_variant(base, variant, cfg, work / f"{base}-{variant}-{cfg.size}.safetensors")
                console.print(f"{key}: {size['flops'] / 1e9:.2f} GFLOPs, {size['params'] / 1e6:.2f} M params")
                with_adapt = cfg.adapt_model == base and variant == "original"
                r, single, a = _run_model(tb, cfg, key, ckpt, mhash, profiles, goodput, latencies, byte_s, work, T, with_adapt)
                models[key] = {"base": base, "variant": variant, "checkpoint": str(ckpt), "hash": mhash, **size,
                               "single_s": {d: statistics.median(v) for d, v in single.items()}, "single_times_s": single}
                rows += r
                if a:
                    adapt = a
    finally:
        torn = tb.down()
    state_after = T.machine_state()
    _speedups(rows, models, cfg)
    result = {
        "config": asdict(cfg) | {"device_names": list(NAMES), "link_goodput_bps": goodput, "testbed_prefix": cfg.prefix,
                                 "message_latency": sync,
                                 "planner_latency_s": {f"{c:g}": v for c, v in latencies.items()},
                                 "planner_byte_s": {f"{c:g}": v for c, v in byte_s.items()}},
        "profiles": {f"{c:g}": {"a": p["profile"]["a"], "b": p["profile"]["b"], "per_kind": p["profile"]["per_kind"],
                                "fits": p["fits"]} for c, p in profiles.items()},
        "models": models,
        "rows": rows,
        "adapt": adapt,
        "machine_before": state_before,
        "machine_after": state_after,
        "loadavg": {"before": state_before["loadavg"], "after": state_after["loadavg"]},
        "testbed_down": {"remaining": torn.get("remaining")},
        "seconds": time.perf_counter() - t_start,
    }
    result["summary"] = summarize(result, cfg)
    result["targets"] = check_targets(result["summary"])
    result["files"] = write_outputs(result, out)
    return result


def _distinct_caps(cfg: EdgediConfig) -> list[int]:
    """Device indices, one per distinct cap (the leader first): whose single latency we need."""
    seen: dict[float, int] = {}
    for i, c in enumerate(cfg.caps):
        seen.setdefault(c, i)
    return sorted(seen.values())


def _run_model(tb: Any, cfg: EdgediConfig, key: str, ckpt: Path, mhash: str, profiles: dict, goodput: dict,
               latencies: dict[float, float], byte_s: dict[float, float], work: Path, T: Any,
               with_adapt: bool) -> tuple[list[dict[str, Any]], dict[str, list[float]], dict[str, Any]]:
    """The model on 1..4 devices and alone on each distinct cap, round-robin (see module doc);
    then the adaptive stream if ``with_adapt``. Returns the rows, the single-device times per
    device and the stream's record."""
    from edgeweave.checkpoint import load_checkpoint
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.runtime.timeline import frame_summary

    net, _spec, _ = load_checkpoint(ckpt)
    net.eval()
    gm = capture(net, (1, cfg.in_channels, cfg.size, cfg.size))
    for n, c, r in zip(NAMES, cfg.caps, cfg.rates):
        tb.set_cpu(n, c)
        tb.set_bandwidth(n, r)
    nominal = T.planner_cluster(NAMES, cfg.caps, cfg.rates, profiles, goodput, latencies, byte_s)
    tag = key.replace("/", "-")
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with T.BenchCluster(tb, ckpt, nominal, work / f"cluster-{tag}", timeout_s=cfg.timeout_s,
                        driver="edgeweave.bench.edgedi_driver") as bc:
        if bc.ready["model_hash"] != mhash:
            raise EdgeweaveError("the leader's weights differ from the checkpoint written")
        console.print(f"  cluster up in {time.perf_counter() - t0:.1f} s")
        live = []
        for k in cfg.devices:
            cl = T.planner_cluster(NAMES[:k], cfg.caps[:k], cfg.rates[:k], profiles, goodput, latencies, byte_s)
            t1 = time.perf_counter()
            plan = make_plan(gm, cl, partition=cfg.partition, fusion=cfg.fusion, mode=cfg.mode, model_name=key, model_hash=mhash)
            plan_s = time.perf_counter() - t1
            pfile = work / "plans" / f"{tag}-{cfg.size}-{k}.json"
            pfile.parent.mkdir(parents=True, exist_ok=True)
            plan.save(pfile)
            rep = bc.call({"op": "plan", "path": str(pfile.resolve())})
            live.append({"k": k, "plan": plan, "plan_s": plan_s, "rep": rep, "lats": [], "best": None})
        single: dict[str, list[float]] = {NAMES[i]: [] for i in _distinct_caps(cfg)}
        meter = T.cpu_meter(tb, NAMES)
        single_cpu: list[float] = []  # the leader's, alone (its cgroup; the cluster idles)
        with contextlib.ExitStack() as stack:
            solos = {d: stack.enter_context(T.SingleDevice(tb, d, str(ckpt), cfg.size, timeout_s=cfg.timeout_s))
                     for d in single}
            # what a user would compare with: raw ONNX Runtime on the whole model on the leader
            ort_solo = (T.ort_baseline(stack, tb, NAMES[0], str(ckpt), cfg.size, cfg.timeout_s)[0]
                        if cfg.ort_baseline else None)
            for e in live:  # one untimed round: a plan's first frame after the others' warm-ups is slow
                bc.call({"op": "infer", "plan_id": e["rep"]["plan_id"], "repeat": 1})
            for rnd in range(cfg.repeat):  # round-robin: host load drifts over every configuration alike
                for e in live:
                    T.timed_frame(bc, e, meter)
                for d in (list(solos) if rnd % 2 == 0 else list(solos)[::-1]):
                    lat, used = T.metered(meter, solos[d].time_once)
                    single[d].append(lat)
                    if used is not None and d == NAMES[0]:
                        single_cpu.append(used[0])
                if ort_solo is not None:
                    single.setdefault("ort", []).append(ort_solo.time_once())
        console.print("  single device: " + ", ".join(f"{d} {statistics.median(v):.3f} s" for d, v in single.items()))
        for e in live:
            med = statistics.median(e["lats"])
            plan = e["plan"]
            rows.append({"model": key, "base": key.split("/")[0], "variant": key.split("/")[1], "devices": e["k"],
                         "caps": list(cfg.caps[: e["k"]]), "rates": list(cfg.rates[: e["k"]]), "latency_s": med,
                         "latencies_s": e["lats"], "predicted_s": plan.predicted_s,
                         "prediction_error": abs(plan.predicted_s - med) / med, "rel_err": e["rep"]["rel_err"],
                         "max_abs_err": e["rep"]["max_abs_err"], "stage_kinds": [s.kind for s in plan.stages],
                         "leader_only": plan.meta.get("leader_only"), "plan_s": e["plan_s"],
                         "timings": frame_summary(e["best"]),
                         "cpu_frames_s": [f[: e["k"]] for f in e.get("cpu", [])], "single_device_cpu_frames_s": single_cpu})
            console.print(f"  {key} k={e['k']}: {med:.3f} s (pred {plan.predicted_s:.3f}, rel_err {e['rep']['rel_err']:.1e})")
        adapt = _adapt(tb, cfg, bc, gm, key, mhash, profiles, goodput, latencies, byte_s, work, T) if with_adapt else {}
        if adapt and cfg.failover_device:
            adapt["failover"] = _failover(cfg, bc, adapt)
    return rows, single, adapt


def _adapt(tb: Any, cfg: EdgediConfig, bc: Any, gm: Any, key: str, mhash: str, profiles: dict, goodput: dict,
           latencies: dict[float, float], byte_s: dict[float, float], work: Path, T: Any) -> dict[str, Any]:
    """The stream with a cap change and back (see module doc).

    Phases: ``calibrate`` (the leader learns how far the profiles are from the real speeds; a
    re-plan here is the estimator converging), ``steady`` (nothing changes: no re-plan
    allowed), ``low`` (the cap drops), ``back`` (the cap is restored). The reference after a
    change is the predicted latency of the best plan for the new caps, planned by the
    orchestrator on the profiles as calibrated in the steady phase (the stream's estimates)
    with the changed device slowed by the cap ratio; that oracle plan is also measured."""
    from edgeweave.planning.adapt import scaled_cluster
    from edgeweave.planning.planner import make_plan

    dev = cfg.adapt_device
    i = NAMES.index(dev)
    hi, lo = cfg.adapt_caps
    caps_nom = list(cfg.caps)
    caps_nom[i] = hi
    tb.set_cpu(dev, hi)
    nominal = T.planner_cluster(NAMES, caps_nom, cfg.rates, profiles, goodput, latencies, byte_s)
    kw = dict(partition=cfg.partition, fusion=cfg.fusion, mode=cfg.mode, model_name=key, model_hash=mhash)
    p_nom = make_plan(gm, nominal, **kw)
    d = work / "adapt"
    d.mkdir(parents=True, exist_ok=True)
    p_nom.save(d / "nominal.json")
    nominal.save(d / "cluster.json")
    console.print(f"adaptive stream: {key} on {len(NAMES)} devices; {dev} {hi:g} -> {lo:g} -> {hi:g} core "
                  f"(nominal plan predicted {p_nom.predicted_s:.3f} s)")
    start = bc.call({"op": "stream_start", "path": str((d / "nominal.json").resolve()),
                     "cluster": str((d / "cluster.json").resolve()), "policy": dict(cfg.adapt_policy)})
    recs: list[dict[str, Any]] = []
    phases: list[dict[str, Any]] = []
    refs: dict[str, Any] = {}
    for ph, (name, cap, n) in enumerate(zip(("calibrate", "steady", "low", "back"), (hi, hi, lo, hi), cfg.adapt_frames)):
        if name == "low":  # references from the calibrated estimates, before the change
            f0 = list(recs[-1]["factors"])
            f_low = list(f0)
            f_low[i] *= hi / lo
            # the best plan the planner finds: its own order search, or the stream's order kept
            order = p_nom.meta["strip_order"]
            refs["cal"], refs["low"] = (min(make_plan(gm, cl, **kw), make_plan(gm, cl, order=order, **kw),
                                            key=lambda p: p.predicted_s)
                                        for cl in (scaled_cluster(nominal, f0), scaled_cluster(nominal, f_low)))
            refs["cal"].save(d / "oracle_calibrated.json")
            refs["low"].save(d / "oracle_low.json")
            refs["steady_measured_s"] = statistics.median(x["latency_s"] for x in recs if x["phase"] == 1)
            # the stream's own calibration of the cost model (measured / estimated latency over
            # steady frames), learnt before the change: predictions are compared calibrated
            refs["ratio"] = float(recs[-1].get("latency_ratio", 1.0))
        tb.set_cpu(dev, cap)
        first = len(recs)
        r = bc.call({"op": "stream", "frames": n}, timeout_s=cfg.timeout_s)["records"]
        for x in r:
            x["phase"], x["phase_name"], x["cap"] = ph, name, cap
        recs += r
        phases.append({"phase": ph, "name": name, "cap": cap, "first_frame": first, "frames": n})
        console.print(f"  {name} ({dev} at {cap:g} core): " + " ".join(
            f"{x['latency_s']:.2f}{_mark(x)}" for x in r))
        if name == "low":  # the oracle plan, measured in the slow phase, for reference
            rep = bc.call({"op": "plan", "path": str((d / "oracle_low.json").resolve())})
            lats = bc.call({"op": "infer", "plan_id": rep["plan_id"], "repeat": 3})["latencies_s"]
            phases[-1]["oracle_measured_s"] = statistics.median(lats)
            phases[-1]["oracle_rel_err"] = rep["rel_err"]
    check = bc.call({"op": "check"})
    tb.set_cpu(dev, hi)
    for ph in phases:
        sel = [x for x in recs if x["phase"] == ph["phase"]]
        ph["replans"] = sum(x["event"] == "replanned" for x in sel)
        ph["reverts"] = sum(bool(x.get("reverted")) for x in sel)  # re-plans that undid the one before
        # re-plans that tried an idle device again (a declined probe is an evaluation that kept the plan)
        ph["probes"] = sum(bool(x.get("probe")) and x["event"] == "replanned" for x in sel)
        ph["evaluations"] = sum(x["event"] != "" for x in sel)
        ph["median_latency_s"] = statistics.median(x["latency_s"] for x in sel)
        if ph["name"] in ("low", "back"):
            # recovery is counted against a latency the stream can reach, measured on this host in this
            # run: after the drop, the best plan for the new cap run in that phase; after the return,
            # the stream's own steady latency before the drop (same cap, same devices). The planner's
            # predictions of those plans are kept beside it: a prediction the host never matches
            # leaves a recovery uncounted for the cost model's error, not for the stream's.
            best = refs["low" if ph["name"] == "low" else "cal"].predicted_s
            ph["reference_kind"] = "best plan, measured" if ph["name"] == "low" else "steady before the change, measured"
            ph["reference_s"] = ph["oracle_measured_s"] if ph["name"] == "low" else refs["steady_measured_s"]
            ph.update(recovery(sel, ph["reference_s"]))
            ph["reference_predicted_s"], ph["latency_ratio"] = best * refs["ratio"], refs["ratio"]
            ph["frames_to_recover_vs_prediction"] = recovery(sel, best * refs["ratio"])["frames_to_recover"]
            ph["frames_to_recover_vs_raw_prediction"] = recovery(sel, best)["frames_to_recover"]
        else:
            ph["reference_s"] = refs["cal"].predicted_s if "cal" in refs else p_nom.predicted_s
    rows_of_dev = lambda p: sum(a.out_rows[1] - a.out_rows[0] for st in p.stages if st.kind == "spatial"  # noqa: E731
                                for a in st.assignments if a.device == i)
    return {"model": key, "device": dev, "caps": [hi, hi, lo, hi], "frames": list(cfg.adapt_frames),
            "start_rel_err": start["rel_err"], "final_rel_err": check["rel_err"], "records": recs, "phases": phases,
            "nominal_predicted_s": p_nom.predicted_s, "calibrated_predicted_s": refs["cal"].predicted_s,
            "oracle_predicted_s": refs["low"].predicted_s, "steady_measured_s": refs["steady_measured_s"],
            "oracle_rows_of_device": {"calibrated": rows_of_dev(refs["cal"]), "low": rows_of_dev(refs["low"])},
            "policy": dict(cfg.adapt_policy)}


def _failover(cfg: EdgediConfig, bc: Any, adapt: dict[str, Any]) -> dict[str, Any]:
    """A follower dies in the middle of the stream and its board comes back (DESIGN: devices come
    and go). ``lost``: the frames after the kill; the first fails, the stream regroups with the
    others, re-plans and runs it again. ``waiting``: frames served while the restarted follower
    boots (one per call, until one is taken in). ``back``: frames after it joined.

    References: the survivors' plan re-priced on the stream's estimates times the latency ratio
    the stream had calibrated before the failure; after the return, the back phase's median
    latency before the failure."""
    dev = cfg.failover_device
    ratio = float(adapt["records"][-1].get("latency_ratio", 1.0))
    before_s = next(p["median_latency_s"] for p in adapt["phases"] if p["name"] == "back")
    bc.kill(dev)
    lost = bc.call({"op": "stream", "frames": cfg.failover_frames[0]}, timeout_s=cfg.timeout_s)["records"]
    console.print(f"failover: {dev} killed: " + " ".join(f"{x['latency_s']:.2f}{'!' if x['lost'] else ''}" for x in lost)
                  + f" (regroup {lost[0]['regroup_s']:.2f} s, lost {lost[0]['lost']})")
    bc.restart(dev)
    t0 = time.perf_counter()
    waiting: list[dict[str, Any]] = []
    while time.perf_counter() - t0 < cfg.failover_join_timeout_s and not (waiting and waiting[-1]["joined"]):
        waiting += bc.call({"op": "stream", "frames": 1}, timeout_s=cfg.timeout_s)["records"]
    rejoin_s = time.perf_counter() - t0
    joined = bool(waiting and waiting[-1]["joined"])
    back = bc.call({"op": "stream", "frames": cfg.failover_frames[1]}, timeout_s=cfg.timeout_s)["records"] if joined else []
    console.print(f"  {dev} back after {rejoin_s:.1f} s ({len(waiting)} frames meanwhile"
                  + (f", regroup {waiting[-1]['regroup_s']:.2f} s): " if joined else ", never joined)")
                  + " ".join(f"{x['latency_s']:.2f}" for x in back))
    check = bc.call({"op": "check"})
    for stage, recs in (("lost", lost), ("waiting", waiting), ("back", back)):
        for x in recs:
            x["stage"] = stage
    reference = lost[0]["estimated_s"] * ratio
    steady = [x["latency_s"] for x in lost[1:] + (waiting[:-1] if joined else waiting)]  # without it, first frame excepted
    return {"device": dev, "records": lost + waiting + back, "lost": lost[0]["lost"],
            "joined": waiting[-1]["joined"] if joined else [], "regroup_s": lost[0]["regroup_s"],
            "first_frame_s": lost[0]["latency_s"], "reference_s": reference, "latency_ratio": ratio,
            "median_without_s": statistics.median(steady) if steady else None,
            "without_over_prediction": statistics.median(steady) / reference if steady else None,
            "rejoin_s": rejoin_s, "join_regroup_s": waiting[-1]["regroup_s"] if joined else None,
            "median_back_s": statistics.median(x["latency_s"] for x in back[1:]) if len(back) > 1 else None,
            "before_s": before_s, "final_rel_err": check["rel_err"],
            "devices_without": len(lost[-1]["factors"]), "devices_back": len(back[-1]["factors"]) if back else None}


def _mark(rec: dict[str, Any]) -> str:
    """A frame's re-plan in the console trace: * new plan, ^ a plan measured before, < undone,
    ? a probe of an idle slow device."""
    if rec["event"] != "replanned":
        return ""
    return "<" if rec.get("reverted") else "?" if rec.get("probe") else "^" if rec.get("reused") else "*"


def recovery(records: list[dict[str, Any]], reference_s: float, tol: float = 0.10, window: int = 3) -> dict[str, Any]:
    """Frames (1 = the first frame after the change) until latency is back within ``tol`` of
    the reference: the first frame that is within it and from which the median of ``window``
    frames (fewer at the end) is too, so one lucky frame on a noisy host does not count."""
    lats = [r["latency_s"] for r in records]
    first = None
    for j in range(len(lats)):
        if max(lats[j], statistics.median(lats[j:j + window])) <= (1 + tol) * reference_s:
            first = j
            break
    later = [x <= (1 + tol) * reference_s for x in lats[first:]] if first is not None else []
    replan = next((j + 1 for j, r in enumerate(records) if r["event"] == "replanned"), None)
    out = {"frames_to_recover": first + 1 if first is not None else None,
           "within_after_recovery": sum(later) / len(later) if later else None,
           "median_after_recovery_over_ref": (statistics.median(lats[first:]) / reference_s) if first is not None else None,
           "first_replan_frame": replan, "not_recovered": None}
    if first is None and lats:  # why not: how close the stream came, and whether it re-planned at all
        tail = lats[-min(window, len(lats)):]
        out["not_recovered"] = (f"the last {len(tail)} frames' median {statistics.median(tail):.3f} s is "
                                f"{statistics.median(tail) / reference_s:.2f}x the reference {reference_s:.3f} s "
                                f"(within {1 + tol:.2f}x counts) after {len(lats)} frames; "
                                + (f"re-planned at frame {replan}" if replan else "no re-plan"))
    return out


def _speedups(rows: list[dict[str, Any]], models: dict[str, dict[str, Any]], cfg: EdgediConfig) -> None:
    """Speedup over the same model on the leader alone, its bound, and over the original model."""
    for r in rows:
        m = models[r["model"]]
        speed = {c: 1.0 / m["single_s"][NAMES[i]] for c, i in ((cfg.caps[i], i) for i in _distinct_caps(cfg))}
        lead = m["single_s"][NAMES[0]]
        r["single_device_s"] = lead
        r["speedup"] = lead / r["latency_s"]
        r["bound"] = sum(speed[c] for c in cfg.caps[: r["devices"]]) / speed[cfg.caps[0]]
        r["speedup_vs_bound"] = r["speedup"] / r["bound"]
        ort = m["single_s"].get("ort")  # raw ONNX Runtime on the leader alone, same rounds
        r["single_device_ort_s"] = ort
        r["speedup_over_ort"] = ort / r["latency_s"] if ort else None
        # the CPU the devices spent per frame against the leader alone: the speedup that work
        # allows at best is the bound over that ratio (tbcluster.cpu_ceiling)
        r.update(cpu_ceiling(r.get("cpu_frames_s") or [], r.get("single_device_cpu_frames_s") or [], r["bound"]))
        orig = models.get(f"{r['base']}/original")
        r["speedup_vs_original"] = orig["single_s"][NAMES[0]] / r["latency_s"] if orig else None


def _row(rows: list[dict[str, Any]], model: str, k: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["model"] == model and r["devices"] == k), None)


def summarize(result: dict[str, Any], cfg: EdgediConfig) -> dict[str, Any]:
    rows, models, adapt = result["rows"], result["models"], result["adapt"]
    main, kmax = cfg.models[0], max(cfg.devices)
    s: dict[str, Any] = {"main_model": main, "devices_max": kmax}
    o, c = models.get(f"{main}/original"), models.get(f"{main}/compact")
    s["compact_flops_ratio"] = c["flops"] / o["flops"] if o and c else None
    s["flops_ratio"] = {k: v["flops"] / models[f"{v['base']}/original"]["flops"] for k, v in models.items()}
    r = _row(rows, f"{main}/original", kmax)
    s["speedup_vs_bound"] = r["speedup_vs_bound"] if r else None
    s["speedup_4dev"], s["bound_4dev"] = (r["speedup"], r["bound"]) if r else (None, None)
    s["speedup_4dev_over_ort"] = r.get("speedup_over_ort") if r else None
    # where that configuration's fastest frame spent its time (runtime/timeline.py)
    s["breakdown_4dev"] = (r.get("timings") or {}).get("breakdown") if r else None
    s["work_ratio_4dev"], s["speedup_ceiling_4dev"] = (r.get("work_ratio"), r.get("speedup_ceiling")) if r else (None, None)
    rc = _row(rows, f"{main}/compact", kmax)
    s["compact_speedup_4dev"] = rc["speedup_vs_original"] if rc else None
    rp = _row(rows, f"{main}/compact_pruned", kmax)
    s["compact_pruned_speedup_4dev"] = rp["speedup_vs_original"] if rp else None
    s["speedup_vs_bound_all"] = {f"{x['model']} k={x['devices']}": x["speedup_vs_bound"] for x in rows}
    s["max_rel_err"] = max((x["rel_err"] for x in rows), default=None)
    errs = [x["prediction_error"] for x in rows]
    s["prediction_error_median"] = statistics.median(errs) if errs else None
    if adapt:
        ph = adapt["phases"]
        by = {p["name"]: p for p in ph}
        changes = [by[n] for n in ("low", "back") if n in by]
        worst = lambda key: (None if not changes or any(p.get(key) is None for p in changes)  # noqa: E731
                             else max(p[key] for p in changes))
        s["adapt_frames_to_recover"] = worst("frames_to_recover")
        s["adapt_frames_to_recover_per_change"] = [p.get("frames_to_recover") for p in changes]
        # a change the stream did not recover from within its frames, and why (recovery())
        s["adapt_not_recovered"] = {p["name"]: p["not_recovered"] for p in changes if p.get("not_recovered")}
        s["adapt_frames_to_recover_vs_prediction"] = worst("frames_to_recover_vs_prediction")
        s["adapt_frames_to_recover_vs_raw_prediction"] = worst("frames_to_recover_vs_raw_prediction")
        s["adapt_latency_ratio"] = by.get("low", {}).get("latency_ratio")
        s["adapt_replans_per_phase"] = {p["name"]: p["replans"] for p in ph}
        # no re-plan while nothing changes: none in the steady phase, at most one per change
        s["adapt_replans_steady"] = by["steady"]["replans"] + sum(max(0, by[n]["replans"] - 1) for n in ("low", "back") if n in by)
        s["adapt_calibration_replans"] = by.get("calibrate", {}).get("replans")
        s["adapt_replan_s_max"] = max((x["replan_s"] for x in adapt["records"]), default=0.0)
        fo = adapt.get("failover")
        if fo:
            s["failover_regroup_s"] = fo["regroup_s"]  # failed attempt + new generation + survivors' plan
            s["failover_without_over_prediction"] = fo["without_over_prediction"]
            s["failover_rejoin_s"] = fo["rejoin_s"]  # restart of the follower (boot included) to taken in
            s["failover_back_over_before"] = (fo["median_back_s"] / fo["before_s"]) if fo["median_back_s"] else None
            s["failover_rel_err"] = fo["final_rel_err"]
    else:
        s["adapt_frames_to_recover"] = None
        s["adapt_replans_steady"] = None
    return s


def check_targets(summary: dict[str, Any]) -> dict[str, Any]:
    from edgeweave.bench.targets import targets_met

    return targets_met(summary, TARGETS)


# ------------------------------------------------------------------------------------ outputs
CSV_KEYS = ("model", "devices", "caps", "rates", "latency_s", "predicted_s", "prediction_error", "single_device_s",
            "speedup", "bound", "speedup_vs_bound", "work_ratio", "speedup_ceiling", "speedup_vs_original", "rel_err")


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, str]:
    files = {"json": str(out / "edgedi.json"), "csv": str(out / "edgedi.csv"), "report": str(out / "report.md")}
    with open(files["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_KEYS)
        for r in result["rows"]:
            w.writerow([";".join(map(str, r[k])) if isinstance(r.get(k), list) else r.get(k) for k in CSV_KEYS])
    if result["adapt"]:
        files["adapt_csv"] = str(out / "adapt.csv")
        with open(files["adapt_csv"], "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["index", "phase", "cap", "latency_s", "plan_version", "predicted_s", "estimated_s", "event", "factors"])
            for x in result["adapt"]["records"]:
                w.writerow([x["index"], x["phase"], x["cap"], x["latency_s"], x["plan_version"], x["predicted_s"],
                            x["estimated_s"], x["event"] + _mark(x), ";".join(f"{f:.3f}" for f in x["factors"])])
    files |= write_plots(result, out)
    Path(files["report"]).write_text(to_markdown(result, files))
    write_json(files["json"], result | {"files": files})  # NaN -> null, like every --json
    return files


def write_plots(result: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    rows = result["rows"]
    if rows:
        bases = list(dict.fromkeys(r["base"] for r in rows))
        fig, axes = plt.subplots(1, len(bases), figsize=(5.5 * len(bases), 4), squeeze=False)
        for ax, b in zip(axes[0], bases):
            for model in dict.fromkeys(r["model"] for r in rows if r["base"] == b):
                pts = sorted((r["devices"], r["speedup_vs_original"], r["bound"]) for r in rows if r["model"] == model)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model.split('/')[1]} measured")
                if model.endswith("/original"):
                    ax.plot([p[0] for p in pts], [p[2] for p in pts], "k:", label="bound (original)")
            ax.set(xlabel="devices", ylabel="speedup over the original on the leader alone", title=b)
            ax.legend(fontsize=7)
        fig.tight_layout()
        files["plot_speedup"] = str(out / "speedup.png")
        fig.savefig(files["plot_speedup"], dpi=110)
        plt.close(fig)
    ad = result["adapt"]
    if ad:
        recs = ad["records"]
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        xs = [r["index"] for r in recs]
        ax.plot(xs, [r["latency_s"] for r in recs], marker="o", ms=3, label="measured latency")
        ax.plot(xs, [r["estimated_s"] for r in recs], ls="--", color="0.5", label="current plan, re-priced on estimates")
        for ph in ad["phases"]:
            x0, x1 = ph["first_frame"] - 0.5, ph["first_frame"] + ph["frames"] - 0.5
            ref = ph["reference_s"]
            ax.hlines(ref, x0, x1, colors="g", label="reference (measured after a change)" if ph["phase"] == 0 else None)
            ax.fill_between([x0, x1], [ref] * 2, [1.1 * ref] * 2, color="g", alpha=0.12, label="+10%" if ph["phase"] == 0 else None)
            if ph["name"] == "calibrate":
                ax.axvspan(x0, x1, color="0.9", zorder=0, label="calibration (estimator converging)")
            if ph["name"] in ("low", "back"):
                ax.axvline(x0, color="r", lw=0.8)
                ax.text(x0 + 0.2, ref, f" {ad['device']} -> {ph['cap']:g} core", color="r", fontsize=8, va="bottom")
            if "reference_predicted_s" in ph:
                ax.hlines(ph["reference_predicted_s"], x0, x1, colors="m", linestyles=":", label="best plan, predicted x ratio")
        rx = [r["index"] for r in recs if r["event"] == "replanned"]
        ax.scatter(rx, [r["latency_s"] for r in recs if r["event"] == "replanned"], marker="*", s=140, color="k", zorder=4, label="re-plan")
        ax.set(ylabel="latency (s)", title=f"adaptive partitioning: {ad['model']}, {ad['device']} " + " -> ".join(f"{c:g}" for c in ad["caps"][1:]) + " core")
        ax.legend(fontsize=7)
        names = result["config"]["device_names"]
        for d in range(len(recs[0]["factors"])):
            ax2.plot(xs, [r["factors"][d] for r in recs], label=names[d])
        ax2.set(xlabel="frame", ylabel="speed factor (1 = profiled)")
        ax2.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        files["plot_adapt"] = str(out / "adapt.png")
        fig.savefig(files["plot_adapt"], dpi=110)
        plt.close(fig)
    fo = (ad or {}).get("failover")
    if fo:
        files["plot_failover"] = _plot_failover(fo, ad["model"], out / "failover.png", plt)
    s = result.get("summary", {})
    r = _row(rows, f"{s.get('main_model')}/original", s.get("devices_max", 0))
    if r and (r.get("timings") or {}).get("stages"):
        from edgeweave.runtime.timeline import plot_timeline

        files["plot_timeline"] = plot_timeline(
            r["timings"], out / "timeline.png",
            f"{r['model']} at {result['config'].get('size')} px on {r['devices']} devices (caps {r['caps']}, links "
            f"{r['rates']}), fastest of {len(r.get('latencies_s', []))} frames")
    return files


def _plot_failover(fo: dict[str, Any], model: str, path: Path, plt: Any) -> str:
    recs = fo["records"]
    xs = list(range(1, len(recs) + 1))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.plot(xs, [r["latency_s"] for r in recs], marker="o", ms=3, label="measured latency")
    ax.bar(xs, [r["regroup_s"] for r in recs], bottom=[r["latency_s"] for r in recs], color="r", alpha=0.35,
           label="regroup before the frame (failed attempt, new group, new plan)")
    n_lost = sum(r["stage"] != "back" for r in recs)
    ax.hlines(fo["reference_s"], 0.5, n_lost + 0.5, colors="g", label=f"survivors' plan, predicted x {fo['latency_ratio']:.2f}")
    ax.hlines(fo["before_s"], 0.5, len(recs) + 0.5, colors="0.5", linestyles=":", label="before the failure (median)")
    ax.axvline(0.6, color="r", lw=0.8)
    ax.text(0.7, fo["reference_s"], f" {fo['device']} killed", color="r", fontsize=8, va="bottom")
    for i, r in enumerate(recs, start=1):
        if r["joined"]:
            ax.axvline(i - 0.4, color="b", lw=0.8)
            ax.text(i - 0.3, fo["before_s"], f" {', '.join(r['joined'])} back ({fo['rejoin_s']:.0f} s after its restart)",
                    color="b", fontsize=8, va="bottom")
    ax.set(xlabel="frame after the failure", ylabel="seconds", title=f"a follower dies and comes back: {model}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _f(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def to_markdown(result: dict[str, Any], files: dict[str, str]) -> str:
    cfg, s, tg = result["config"], result["summary"], result["targets"]
    m0, m1 = result["machine_before"], result["machine_after"]
    L = ["# EdgeDI on the emulated testbed", "",
         f"Mode: {'quick' if cfg['quick'] else 'full'}; {result['seconds'] / 60:.1f} min. Host: {m0['cpus']} CPUs (shared), "
         f"load average {m0['loadavg']} before, {m1['loadavg']} after; torch {m0['torch']}.", "",
         f"- devices {', '.join(f'{n} {c:g} core @ {r}' for n, c, r in zip(cfg['device_names'], cfg['caps'], cfg['rates']))} "
         f"(cgroup v1 quota, 10 ms period; 1 thread per process; leader in its own namespace and cap)",
         f"- models {', '.join(cfg['models'])} at {cfg['size']}x{cfg['size']}, {cfg['in_channels']} channel, {cfg['num_classes']} classes; "
         f"variants {', '.join(cfg['variants'])} (compact ratio {cfg['compact_ratio']}, L1 structural pruning {cfg['prune_ratio']:g})",
         f"- planner: {cfg['partition']} / {cfg['fusion']} / {cfg['mode']}; link goodput "
         + ", ".join(f"{k}: {v / 1e6:.0f} Mbit/s" for k, v in cfg["link_goodput_bps"].items()),
         f"- speedup = the same model on the 0.25-core leader alone (plain torch) / latency on k devices; bound = sum of "
         "the k devices' speeds / the leader's (speed = 1 / measured single-device latency of that model)",
         "", "## Summary and targets", "", "| key | value | target | met |", "|---|---|---|---|"]
    for k, t in tg.items():
        L.append(f"| {k} | {_f(t['value'])} | {t['target']} | {t['met']} |")
    for k in ("compact_flops_ratio", "speedup_4dev", "bound_4dev", "work_ratio_4dev", "speedup_ceiling_4dev",
              "compact_speedup_4dev", "compact_pruned_speedup_4dev",
              "prediction_error_median", "max_rel_err", "adapt_frames_to_recover_per_change",
              "adapt_frames_to_recover_vs_prediction", "adapt_replans_per_phase", "adapt_replan_s_max"):
        if k in s:
            L.append(f"| {k} | {_f(s[k]) if not isinstance(s[k], list) else s[k]} | | |")
    b = s.get("breakdown_4dev")
    if b:
        L += ["", f"Where the fastest frame of {s['main_model']}/original on {s['devices_max']} devices went "
              f"(runtime/timeline.py, `timeline.png`): {b['total_s']:.3f} s = compute {b['compute_s']:.3f} s (the mean "
              f"device's) + imbalance {b['imbalance_s']:.3f} s (per stage, the slowest device over the mean one) + "
              f"transfers/sync {b['other_s']:.3f} s, {b['stages']} stages."]
    if s.get("speedup_4dev_over_ort"):
        L += ["", f"Against raw ONNX Runtime on the whole model on the leader alone (one thread, same rounds): "
              f"{s['speedup_4dev_over_ort']:.2f}x on {s['devices_max']} devices."]
    if s.get("work_ratio_4dev") and s.get("speedup_ceiling_4dev"):
        L += ["", f"The {s['devices_max']} devices used {s['work_ratio_4dev']:.2f}x the CPU of one frame on the leader alone, "
              f"all together (their cgroups): even perfectly balanced and never waiting, that work allows at most "
              f"{s['speedup_ceiling_4dev']:.2f}x, {1 / s['work_ratio_4dev']:.2f} of the bound."]
    L += ["", "## Models", "", "| model | GFLOPs | M params | single s (per cap) |", "|---|---|---|---|"]
    for k, m in result["models"].items():
        L.append(f"| {k} | {m['flops'] / 1e9:.3f} | {m['params'] / 1e6:.3f} | "
                 + ", ".join(f"{d}: {v:.3f}" for d, v in m["single_s"].items()) + " |")
    L += ["", "## Runs", "", "CPU x single: the CPU all k devices used per frame over one frame on the leader alone; "
          "ceiling: the bound over that ratio (the most a plan doing this work could reach).", "",
          "| model | k | latency s | predicted s | speedup | bound | speedup/bound | CPU x single | ceiling | vs original | rel_err |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        L.append(f"| {r['model']} | {r['devices']} | {r['latency_s']:.3f} | {r['predicted_s']:.3f} | {r['speedup']:.2f} | "
                 f"{r['bound']:.2f} | {r['speedup_vs_bound']:.2f} | {_f(r.get('work_ratio'), 2)} | {_f(r.get('speedup_ceiling'), 2)} | "
                 f"{_f(r['speedup_vs_original'], 2)} | {r['rel_err']:.1e} |")
    ad = result["adapt"]
    if ad:
        L += ["", "## Adaptive partitioning", "",
              f"{ad['model']}, {ad['device']} at {ad['caps']} core, {ad['frames']} frames; nominal plan predicted "
              f"{ad['nominal_predicted_s']:.3f} s, best plan at the low cap {ad['oracle_predicted_s']:.3f} s; policy "
              f"{ad['policy'] or 'defaults'}; output rel_err at start {ad['start_rel_err']:.1e}, end {ad['final_rel_err']:.1e}.", "",
              "| phase | cap | frames | re-plans | evaluations | median latency s | reference s | frames to recover | within 10% after |",
              "|---|---|---|---|---|---|---|---|---|"]
        for p in ad["phases"]:
            L.append(f"| {p['name']} | {p['cap']} | {p['frames']} | {p['replans']} | {p['evaluations']} | {p['median_latency_s']:.3f} | "
                     f"{p['reference_s']:.3f} | {_f(p.get('frames_to_recover'))} | {_f(p.get('within_after_recovery'), 2)} |")
        L += ["", "Reference: a latency the stream can reach, measured in this run: after the drop, the best plan for "
              "the low cap run in that phase; after the return, the stream's median before the drop. Frames to recover: "
              "first frame after the change from which the median of 3 frames is within 10% of the reference. The "
              f"planner's predictions (on the profiles the stream calibrated: {ad['calibrated_predicted_s']:.3f} s; "
              f"{ad['device']} slowed by the cap ratio: {ad['oracle_predicted_s']:.3f} s; {ad['device']}'s rows "
              f"{ad['oracle_rows_of_device']}) give frames to recover "
              f"{[p.get('frames_to_recover_vs_prediction') for p in ad['phases'] if p['name'] in ('low', 'back')]}."]
        for name, why in (s.get("adapt_not_recovered") or {}).items():
            L.append(f"- not recovered after `{name}`: {why}")
    fo = (ad or {}).get("failover")
    if fo:
        L += ["", "## A follower dies and comes back", "",
              f"{fo['device']}'s follower killed (SIGKILL) after the adaptation phases. The next frame failed; the stream "
              f"regrouped with {fo['devices_without']} devices (left out: {fo['lost']}) and ran it again: regroup "
              f"{fo['regroup_s']:.2f} s (failed attempt, new generation, survivors' plan), then that frame "
              f"{fo['first_frame_s']:.3f} s. Without it: median {_f(fo['median_without_s'])} s against the survivors' "
              f"plan predicted x ratio {fo['reference_s']:.3f} s ({_f(fo['without_over_prediction'], 2)}x). Restarted, it "
              f"was taken in {fo['rejoin_s']:.1f} s later (boot and registration included; joined {fo['joined']}, regroup "
              f"{_f(fo['join_regroup_s'], 2)} s); then median {_f(fo['median_back_s'])} s against {fo['before_s']:.3f} s "
              f"before the failure. Output rel_err at the end {fo['final_rel_err']:.1e}. Plot: failover.png."]
    L += ["", "Files: " + ", ".join(Path(v).name for v in files.values()), ""]
    return "\n".join(L)
