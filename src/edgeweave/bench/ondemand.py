"""`edgeweave bench ondemand`: every knob at once on the emulated testbed: which variant of the
model, which exit thresholds, over which cluster plans, chosen per request by its latency budget.

What runs (root, Linux; five devices at 0.25 core on 1000 Mbit/s links by default):

1. On the host, before the testbed is up (cached under ``work/`` by configuration):
   - ``full``: a multi-exit torchvision ResNet18 (exits after layer1, layer2 and layer3, then the
     full network) trained on mnist5k resized to ``size`` pixels, all exits together (sync);
   - ``student``: its EdgeDI compact form (every 3x3 convolution a compact block, ratio 4),
     distilled from the full model's last exit (KL, T=4) with the same exits;
   - both calibrated on the validation split: forced exits plus threshold settings for exit
     proportions (``exits.calibrate.sweep_settings``); every (variant, setting) is one
     *configuration*, its accuracy known from the host's exact forward pass (distributed
     inference gives the same answers: the exactness check below);
   - all stored as one variant set (models/variants.py), so the cluster holds both variants.
2. On the testbed: the devices' compute profiled at their cap (torch and the devices' backend,
   ONNX Runtime by default), the links' goodput and the
   per-message cost measured; the leader (``bench.ondemand_driver``) plans every segment of both
   variants over the five devices, checks every exit's output against the variant run whole on
   the leader, and prices every configuration for the cluster from measured segment times.
3. Measured on the cluster: every configuration on ``measure_frames`` test frames; the full
   model planned whole over the cluster (the reference: what the cluster did before exits and
   variants were chosen together), plain torch and raw ONNX Runtime running the full model on one
   0.25-core device, interleaved round by round.
4. ``requests`` test frames, each with a latency budget spread between the fastest and the
   slowest configuration's p95 measured in step 3 (x1.2), served through the one policy
   (``runtime.variants.VariantsOnDemand``).

Summary keys: ``budget_violations`` (of the requests the policy expected to meet, the share
whose measured latency exceeded the budget; the "cannot" answers apart, as
``budget_unsatisfied``), ``speedup_at_1pct_loss_cluster`` (the full model planned whole over the
cluster, mean latency, over the lowest measured mean latency among configurations whose test
accuracy is within 1 point of the full model's), ``followers_skipped_fraction`` (of the
later-segment work the budgeted requests' variants would have asked of the cluster, the share
their exits left undone), ``exits_rel_err_max`` (every exit of every variant over the cluster
against the same variant on one device), the single-device speedups, and the machine's state.
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeweave.console import console
from edgeweave.errors import EdgeweaveError
from edgeweave.jsonio import write_json

NAMES = ("leader", "w1", "w2", "w3", "w4")
PREFIX = "ewo-"  # not another bench's: benches and their tests may be up at once
SUBNET = "10.77.38.0/24"
TARGETS = {"budget_violations": ("<", 0.05), "speedup_at_1pct_loss_cluster": (">=", 2.0),
           "exits_rel_err_max": ("<=", 1e-5)}


@dataclass
class OndemandConfig:
    size: int = 112
    arch: str = "resnet18"
    exit_after: tuple[str, ...] = ("layer1", "layer2", "layer3")
    head_pool: int = 2  # early heads keep a 2x2 grid: a global average loses where a digit's strokes are
    student_ratio: int = 4
    full_epochs: int = 4
    student_epochs: int = 4
    lr: float = 0.05
    batch_size: int = 64
    train_limit: int | None = None  # training samples (None: all 4,000)
    devices: int = 5
    cpu: float = 0.25
    bandwidth: str = "1000mbit"
    measure_frames: int = 20  # per configuration, on the cluster
    baseline_rounds: int = 15  # full model whole over the cluster / one device (torch, ONNX Runtime), interleaved
    requests: int = 200
    budgets: int = 20
    backend: str = "auto"  # what the devices compute with (engine/backends.py): per device the fastest
    model_latency: bool = True
    ort_baseline: bool = True
    quick: bool = False
    timeout_s: float = 600.0
    prefix: str = PREFIX
    subnet: str = SUBNET

    @classmethod
    def quick_config(cls) -> "OndemandConfig":
        """A few minutes: 64 px, one epoch each, fewer frames and requests."""
        return cls(size=64, full_epochs=1, student_epochs=1, measure_frames=8, baseline_rounds=6, requests=60,
                   budgets=12, quick=True)


# ------------------------------------------------------------------------------------ variants
def _full_kwargs(cfg: OndemandConfig) -> dict[str, Any]:
    return {"arch": cfg.arch, "exit_after": list(cfg.exit_after), "head_pool": cfg.head_pool}


def _spec(cfg: OndemandConfig) -> Any:
    from edgeweave.checkpoint import ModelSpec
    from edgeweave.models.variants import variant_entry

    full = _full_kwargs(cfg)
    return ModelSpec("variant_set", 10, 1, (cfg.size, cfg.size), {"variants": [
        variant_entry("full", "multi_exit_tv_resnet", **full),
        variant_entry("student", "compact", base="multi_exit_tv_resnet", ratio=cfg.student_ratio, base_kwargs=full)]})


def train_variants(cfg: OndemandConfig, bundle: Any, work: Path, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """The full multi-exit model and its distilled compact student as one variant set (reused
    from ``work`` when a run with the same configuration trained them)."""
    import torch
    from torch.utils.data import Subset

    from edgeweave.checkpoint import load_checkpoint, save_checkpoint
    from edgeweave.compress.distill import CachedTeacher
    from edgeweave.exits.train import train_multi_exit

    key = (f"{cfg.arch}-{cfg.size}px-{'-'.join(cfg.exit_after)}-p{cfg.head_pool}-r{cfg.student_ratio}-e{cfg.full_epochs}"
           f"-{cfg.student_epochs}-n{cfg.train_limit or 'all'}-lr{cfg.lr:g}-b{cfg.batch_size}")
    path = work / f"variants-{key}.safetensors"
    if path.is_file():
        vset, _spec_, extra = load_checkpoint(path)
        console.print(f"variants reused from {path.name}")
        return vset, dict(extra.get("training", {}))
    if cfg.train_limit:
        from dataclasses import replace

        idx = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(0))[: cfg.train_limit]
        bundle = replace(bundle, train=Subset(bundle.train, idx.tolist()))
    spec = _spec(cfg)
    torch.manual_seed(0)
    vset = spec.build()
    fit = dict(lr=cfg.lr, batch_size=cfg.batch_size, seed=0, progress=progress)
    console.print(f"training the full model ({cfg.full_epochs} epochs at {cfg.size} px)...")
    full = train_multi_exit(vset.variant("full"), bundle, strategy="sync", epochs=cfg.full_epochs, **fit)
    console.print(f"  exit accuracies (test) {[round(a, 4) for a in full.exit_accuracies]} ({full.seconds:.0f} s)")
    console.print(f"distilling the compact student ({cfg.student_epochs} epochs)...")
    student = train_multi_exit(vset.variant("student"), bundle, strategy="sync", epochs=cfg.student_epochs,
                               teacher=CachedTeacher(vset.variant("full")), distance="kl", temperature=4.0, beta=0.5,
                               **fit)
    console.print(f"  exit accuracies (test) {[round(a, 4) for a in student.exit_accuracies]} ({student.seconds:.0f} s)")
    info = {"full": full.to_dict(), "student": student.to_dict()}
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    save_checkpoint(tmp, vset.eval(), spec, {"training": info})
    tmp.replace(path)
    return vset.eval(), info


def configurations(vset: Any, bundle: Any) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]]]:
    """Every variant's settings calibrated on the validation split: the points the policy gets
    (validation accuracy, no latency yet), and per configuration its test accuracy and exit
    proportions, from each variant's exact forward pass on the host."""
    from torch.utils.data import DataLoader

    from edgeweave.exits.calibrate import accuracy_points, sweep_settings
    from edgeweave.exits.inference import all_exit_probs

    points: dict[str, list[Any]] = {}
    test: dict[str, dict[str, Any]] = {}
    for name in vset.names:
        model = vset.variant(name)
        val_p, val_y = all_exit_probs(model, DataLoader(bundle.val, batch_size=128))
        test_p, test_y = all_exit_probs(model, DataLoader(bundle.test, batch_size=128))
        settings = sweep_settings(model, val_p)
        points[name] = accuracy_points(settings, val_p, val_y)
        for p in accuracy_points(settings, test_p, test_y):
            test[f"{name}/{p.name}"] = {"accuracy": p.accuracy, "exit_proportions": p.exit_proportions}
    return points, test


# ------------------------------------------------------------------------------------ the run
def run_ondemand_bench(cfg: OndemandConfig | None = None, out_dir: Path = Path("results"),
                       progress: bool = True) -> dict[str, Any]:
    """Train (or reuse) the variants, bring the testbed up, measure; write JSON/CSV/PNG/markdown
    under ``out_dir/ondemand``. Needs root and Linux."""
    import torch
    from safetensors.torch import save_file

    from edgeweave.bench import tbcluster as T
    from edgeweave.checkpoint import save_checkpoint
    from edgeweave.data import load_dataset
    from edgeweave.exits.calibrate import dataset_tensors
    from edgeweave.runtime.variants import EXTRA_KEY, variants_extra
    from edgeweave.testbed import Testbed, emulation_support

    cfg = cfg or OndemandConfig()
    ok, why = emulation_support()
    if not ok:
        raise EdgeweaveError(f"bench ondemand needs the emulated testbed (root, Linux, iproute2, cgroup v1): {why}")
    out = Path(out_dir) / "ondemand"
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    state_before = T.machine_state()
    console.print(f"[bold]bench ondemand[/bold] ({'quick' if cfg.quick else 'full'}): load average {state_before['loadavg']}")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))  # training uses the host's cores
    bundle = load_dataset("mnist5k", input_size=cfg.size)
    vset, training = train_variants(cfg, bundle, work, progress)
    points, test_acc = configurations(vset, bundle)
    ckpt = save_checkpoint(work / "deployed.safetensors", vset, _spec(cfg), {EXTRA_KEY: variants_extra(points)})
    xs, ys = dataset_tensors(bundle.test)
    data = work / "test.safetensors"
    save_file({"x": xs.contiguous()}, str(data))
    full_single = save_checkpoint(work / "full-alone.safetensors", vset.variant("full"), _full_spec(cfg))
    torch.set_num_threads(1)

    caps, rates = (cfg.cpu,) * cfg.devices, (cfg.bandwidth,) * cfg.devices
    names = NAMES[: cfg.devices]
    spec = {"prefix": cfg.prefix, "subnet": cfg.subnet,
            "devices": [{"name": n, "cpu": c, "bandwidth": r} for n, c, r in zip(names, caps, rates)]}
    tb = Testbed.up(spec)
    try:
        console.print(f"profiling {cfg.cpu:g} core inside the testbed...")
        # the devices' backend measured too: priced on torch's lines, ONNX Runtime's stages look
        # slower than they run, and splitting looks better than it is
        profiles = T.profile_caps(tb, [cfg.cpu], quick=True, workdir=work / "profiles", timeout_s=cfg.timeout_s,
                                  backends="torch" if cfg.backend == "torch" else "auto")
        goodput = T.measure_rates(tb, [cfg.bandwidth])
        latencies, sync = T.message_latencies(tb, names, [cfg.cpu]) if cfg.model_latency else ({}, {})
        cluster = T.planner_cluster(names, caps, rates, profiles, goodput, latencies, T.byte_costs(sync))
        with T.BenchCluster(tb, ckpt, cluster, work / "cluster", timeout_s=cfg.timeout_s,
                            driver="edgeweave.bench.ondemand_driver") as bc:
            measured = _on_cluster(cfg, tb, bc, points, data, len(xs), str(full_single), T)
    finally:
        torn = tb.down()
    state_after = T.machine_state()
    labels = ys.tolist()
    result = {
        "config": asdict(cfg) | {"device_names": list(names), "link_goodput_bps": goodput,
                                 "planner_latency_s": {f"{c:g}": v for c, v in latencies.items()}},
        "training": training,
        "test_accuracy": test_acc,
        **measured,
        "machine_before": state_before,
        "machine_after": state_after,
        "testbed_down": {"remaining": torn.get("remaining")},
        "seconds": time.perf_counter() - t_start,
    }
    for f in result["requests"]:
        f["correct"] = f["label"] == labels[f["index"]]
    result["summary"] = summarize(result)
    result["targets"] = check_targets(result["summary"])
    result["files"] = write_outputs(result, out)
    return result


def _full_spec(cfg: OndemandConfig) -> Any:
    from edgeweave.checkpoint import ModelSpec

    return ModelSpec("multi_exit_tv_resnet", 10, 1, (cfg.size, cfg.size), _full_kwargs(cfg))


def _on_cluster(cfg: OndemandConfig, tb: Any, bc: Any, points: dict[str, list[Any]], data: Path, n_test: int,
                full_single: str, T: Any) -> dict[str, Any]:
    """Everything measured with the cluster up (see the module docstring, steps 2-4)."""
    import contextlib

    t0 = time.perf_counter()
    setup = bc.call({"op": "setup", "points": {v: [p.to_dict() for p in pts] for v, pts in points.items()},
                     "data": str(data.resolve()), "plan": {"backend": cfg.backend}})
    console.print(f"  segments planned and checked in {time.perf_counter() - t0:.1f} s on {', '.join(setup['devices'])}")
    rng = np.random.default_rng(0)
    frames = rng.permutation(n_test)[: cfg.measure_frames].tolist()
    configs = [p["name"] for p in setup["points"]]
    per_config: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for c in configs:  # every configuration on the same frames
        per_config[c] = bc.call({"op": "measure", "config": c, "indices": frames})["frames"]
    console.print(f"  {len(configs)} configurations measured on {len(frames)} frames each")
    whole = bc.call({"op": "whole_plan", "variant": "full", "plan": {"backend": cfg.backend}})
    base: dict[str, list[float]] = {"full_cluster": [], "single_torch": [], "single_ort": []}
    ort_why = None
    with contextlib.ExitStack() as stack:
        solo = stack.enter_context(T.SingleDevice(tb, NAMES[0], full_single, cfg.size, timeout_s=cfg.timeout_s))
        ort = None
        if cfg.ort_baseline:
            ort, ort_why = T.ort_baseline(stack, tb, NAMES[0], full_single, cfg.size, cfg.timeout_s)
        for rnd in range(cfg.baseline_rounds):  # interleaved: host load drifts over all alike
            i = frames[rnd % len(frames)]
            base["full_cluster"] += bc.call({"op": "frames", "plan_id": whole["plan_id"], "indices": [i]})["latencies_ms"]
            base["single_torch"].append(1e3 * solo.time_once())
            if ort is not None:
                base["single_ort"].append(1e3 * ort.time_once())
    console.print("  full model: " + ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in base.items() if v))
    # budgets from the fastest configuration's measured p95 to 1.2x the slowest's
    p95 = [float(np.percentile([f["latency_ms"] for f in fs], 95)) for fs in per_config.values()]
    budgets = [float(v) for v in np.linspace(min(p95), 1.2 * max(p95), cfg.budgets)]
    items = [[int(rng.integers(n_test)), budgets[r % len(budgets)]] for r in range(cfg.requests)]
    req = bc.call({"op": "requests", "items": items})
    console.print(f"  {len(items)} budgeted requests served")
    return {"setup": setup, "configurations": per_config, "whole_full": whole, "baselines_ms": base,
            "ort_missing": ort_why, "budgets_ms": budgets, "requests": req["requests"],
            "followers_skipped_fraction": req["followers_skipped_fraction"], "lost": req["lost"]}


# ------------------------------------------------------------------------------------ summary
def config_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configuration: test accuracy, predicted and measured cluster latency."""
    rows = []
    priced = {p["name"]: p for p in result["setup"]["points"]}
    for name, frames in result["configurations"].items():
        lat = [f["latency_ms"] for f in frames]
        acc = result["test_accuracy"][name]
        rows.append({"config": name, "variant": name.split("/")[0], "test_accuracy": acc["accuracy"],
                     "val_accuracy": priced[name]["accuracy"], "predicted_mean_ms": priced[name]["mean_ms"],
                     "predicted_p95_ms": priced[name]["p95_ms"], "mean_ms": float(np.mean(lat)),
                     "p95_ms": float(np.percentile(lat, 95)), "exit_proportions": acc["exit_proportions"]})
    return rows


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    rows = config_rows(result)
    k_full = len(result["setup"]["plans"]["full"])
    full_acc = result["test_accuracy"][f"full/exit{k_full - 1}"]["accuracy"]
    base = {k: float(np.mean(v)) if v else None for k, v in result["baselines_ms"].items()}
    ok = [r for r in rows if r["test_accuracy"] >= full_acc - 0.01 - 1e-9]
    best = min(ok, key=lambda r: r["mean_ms"]) if ok else None
    reqs = result["requests"]
    met = [r for r in reqs if r["satisfied"]]
    checks = [c for cs in result["setup"]["checks"].values() for c in cs]
    whole_check = result["whole_full"]["check"]
    s = {
        "full_accuracy": full_acc,
        "full_cluster_ms": base["full_cluster"],
        "full_single_torch_ms": base["single_torch"],
        "full_single_ort_ms": base["single_ort"],
        "cluster_speedup_over_torch": base["single_torch"] / base["full_cluster"],
        "cluster_speedup_over_ort": (base["single_ort"] / base["full_cluster"]) if base["single_ort"] else None,
        "speedup_at_1pct_loss_cluster": (base["full_cluster"] / best["mean_ms"]) if best else 0.0,
        "config_at_1pct_loss": best["config"] if best else None,
        "config_at_1pct_loss_accuracy": best["test_accuracy"] if best else None,
        "speedup_at_1pct_loss_over_single_torch": (base["single_torch"] / best["mean_ms"]) if best else None,
        "speedup_at_1pct_loss_over_single_ort": (base["single_ort"] / best["mean_ms"]) if best and base["single_ort"] else None,
        "budget_violations": (sum(r["latency_ms"] > r["budget_ms"] for r in met) / len(met)) if met else None,
        "budget_unsatisfied": (len(reqs) - len(met)) / len(reqs) if reqs else None,
        "requests_accuracy": float(np.mean([r["correct"] for r in reqs])) if reqs else None,
        "requests_by_variant": {v: sum(r["config"].startswith(v + "/") for r in reqs) for v in result["setup"]["plans"]},
        "followers_skipped_fraction": result["followers_skipped_fraction"],
        "exits_rel_err_max": max([c["rel_err"] for c in checks] + [whole_check["rel_err"]]),
        "reference_degenerate": any(c["ref_std"] <= 1e-6 for c in [*checks, whole_check]),
        "prediction_error_median": float(np.median([abs(r["predicted_mean_ms"] - r["mean_ms"]) / r["mean_ms"] for r in rows])),
        "configurations": len(rows),
    }
    return s


def check_targets(summary: dict[str, Any]) -> dict[str, Any]:
    from edgeweave.bench.targets import targets_met

    return targets_met(summary, TARGETS)


# ------------------------------------------------------------------------------------ outputs
def write_outputs(result: dict[str, Any], out: Path) -> dict[str, str]:
    files = {"json": str(write_json(out / "ondemand.json", result))}
    rows = config_rows(result)
    with open(out / "configurations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "requests.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result["requests"][0]))
        w.writeheader()
        w.writerows(result["requests"])
    files |= {"configurations": str(out / "configurations.csv"), "requests": str(out / "requests.csv")}
    files["plot"] = _plot(result, rows, out / "ondemand.png")
    (out / "report.md").write_text(to_markdown(result, rows))
    files["report"] = str(out / "report.md")
    return files


def _plot(result: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, v in enumerate(sorted({r["variant"] for r in rows})):
        rs = [r for r in rows if r["variant"] == v]
        a.scatter([r["mean_ms"] for r in rs], [100 * r["test_accuracy"] for r in rs], s=18, c=f"C{i}",
                  label=f"{v}: exits and thresholds over 5 devices")
    a.scatter([s["full_cluster_ms"]], [100 * s["full_accuracy"]], marker="*", s=150, c="C3",
              label="full model, one plan (the planner's choice of devices)")
    a.axvline(s["full_single_torch_ms"], ls="--", c="grey", lw=1, label="full model on one device (torch)")
    if s["full_single_ort_ms"]:
        a.axvline(s["full_single_ort_ms"], ls=":", c="k", lw=1, label="full model on one device (ONNX Runtime)")
    a.axhline(100 * (s["full_accuracy"] - 0.01), ls=":", c="C3", lw=1, label="full model - 1 point")
    a.set_xlabel("mean latency per frame on the testbed (ms)")
    a.set_ylabel("test accuracy (%)")
    a.set_title("configurations (variant, exit thresholds) on the cluster")
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    reqs = result["requests"]
    col = ["C2" if r["satisfied"] and r["latency_ms"] <= r["budget_ms"] else "C3" if r["satisfied"] else "grey"
           for r in reqs]
    b.scatter([r["budget_ms"] for r in reqs], [r["latency_ms"] for r in reqs], s=10, c=col)
    lim = max(max(r["budget_ms"] for r in reqs), max(r["latency_ms"] for r in reqs))
    b.plot([0, lim], [0, lim], "-", c="k", lw=1)
    b.set_xlabel("latency budget (ms)")
    b.set_ylabel("measured latency (ms)")
    b.set_title(f"budgeted requests: violations {s['budget_violations']:.3f}, 'cannot' {s['budget_unsatisfied']:.3f}")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def to_markdown(result: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    s, t = result["summary"], result["targets"]
    lines = ["# bench ondemand", "",
             f"{result['config']['devices']} devices at {result['config']['cpu']:g} core, {result['config']['bandwidth']}; "
             f"mnist5k at {result['config']['size']} px; {s['configurations']} configurations; "
             f"{len(result['requests'])} budgeted requests; {result['seconds']:.0f} s; "
             f"load average {result['machine_before']['loadavg']} -> {result['machine_after']['loadavg']}.", "",
             "| target | value | wanted | met |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['value']} | {v['target']} | {v['met']} |" for k, v in t.items()]
    lines += ["", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s.items()]
    lines += ["", "| configuration | test accuracy | mean ms (predicted) | p95 ms (predicted) |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["mean_ms"]):
        lines.append(f"| {r['config']} | {r['test_accuracy']:.4f} | {r['mean_ms']:.1f} ({r['predicted_mean_ms']:.1f}) | "
                     f"{r['p95_ms']:.1f} ({r['predicted_p95_ms']:.1f}) |")
    return "\n".join(lines) + "\n"
