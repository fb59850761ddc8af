"""The distributed step of ``edgeweave demo``: a real photo through a 224x224 model.

* :func:`testbed_demo_step` (root on Linux): an emulated cluster of CPU-capped devices with
  shaped links (``edgeweave.testbed``), the model run over it and, interleaved, on one equally
  capped device with plain torch and with ONNX Runtime; speedups, exactness, the plan and the
  fastest frame's timeline.
* :func:`distributed_demo_step` (anywhere): the model over local worker processes plus the
  leader, checked against one device. On one machine's shared cores its times are no cluster's,
  so the demo uses it to show exactness only.

Why a real photo: the demo should show the engine on data a user recognises, and sklearn ships
two photos (no download). The model is randomly initialised (no pretrained weights can be
fetched), which does not matter for what is shown: that the distributed result equals the
single-device one, which device computed which rows of which block, and the measured times.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgeweave.errors import EdgeweaveError
from edgeweave.runtime.leader import LocalCluster
from edgeweave.runtime.run import RunConfig, load_for_run, plan_table, result_table, run_on_session, summary_line
from edgeweave.testbed.spec import parse_rate

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_photo(size: int = 224, index: int = 0) -> torch.Tensor:
    """One of sklearn's sample photos (china.jpg, flower.jpg), centre-cropped, resized and
    normalised like ImageNet inputs: a (1, 3, size, size) float tensor."""
    from sklearn.datasets import load_sample_images

    img = torch.from_numpy(load_sample_images().images[index].copy()).permute(2, 0, 1).float() / 255.0
    _, h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[:, top:top + side, left:left + side].unsqueeze(0)
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (img - mean) / std


def distributed_demo_step(workers: int = 2, model_name: str = "torchvision:resnet18", size: int = 224,
                          repeat: int = 3, partition: str = "optimal", fusion: str = "auto",
                          mode: str = "exchange", console: Any = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Run ``model_name`` on a real photo over ``workers`` local followers plus the leader,
    check it against one device, print the plan and times on stderr, and return the summary
    (``rel_err``, ``latency_s``, ``single_device_s``, ``speedup``, ``plan``, ...)."""
    if console is None:
        from edgeweave.console import console
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per process, like the followers: a fair comparison
    t0 = time.perf_counter()
    try:
        model, spec = load_for_run(model_name, size)
        x = sample_photo(size)
        cfg = RunConfig(partition=partition, fusion=fusion, mode=mode, repeat=repeat, check=True)
        cfg.validate()
        console.print(f"[bold]distributed inference[/bold]: {model_name} on a {size}x{size} photo, "
                      f"{workers} local worker{'s' if workers != 1 else ''} + the leader (gloo over loopback, 1 thread each)")
        with LocalCluster(workers, timeout_s=timeout_s) as cl:
            res = run_on_session(cl, model_name, model, spec, x, cfg)
        with torch.no_grad():
            res["top1_class"] = int(model(x).argmax(1)[0])  # random weights: a label, not a claim
        console.print(result_table(res))
        # local processes share this machine's cores: their times are no cluster's, so no speedup is printed
        console.print(summary_line(res))
        res["seconds"] = time.perf_counter() - t0
        return res
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ testbed
DEMO_PREFIX = "ewd-"  # every namespace, link and cgroup of the demo's cluster
DEMO_SUBNET = "10.77.50.0/24"

# The whole model on one device with ONNX Runtime (what a user compares with on one board): the
# same stdin protocol as the plain-torch baseline of bench/tbcluster.py (one timed inference per
# line), one intra-op thread, every graph optimisation on, the same session options as the
# engine's ort backend.
ORT_BASELINE = """
import json, sys, time
import numpy as np, onnxruntime as ort
path, size, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
so = ort.SessionOptions()
so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.log_severity_level = 3
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
feed = {s.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)}
for _ in range(warmup):
    s.run(None, feed)
print(json.dumps({"ready": True}), flush=True)
for _line in sys.stdin:
    t0 = time.perf_counter(); s.run(None, feed)
    print(json.dumps({"s": time.perf_counter() - t0}), flush=True)
"""


@dataclass
class TestbedDemoConfig:
    """The demo's emulated cluster: ``followers`` + the leader, every device capped at ``cpu``
    cores on a ``bandwidth`` link; ``model`` (a torchvision name, seeded random weights) at
    ``size``; ``rounds`` timed rounds, each one inference on the cluster and one on a single
    capped device with plain torch and with ONNX Runtime."""

    __test__ = False

    model: str = "vgg16"
    size: int = 224
    followers: int = 3
    cpu: float = 0.25
    bandwidth: str = "1000mbit"
    rounds: int = 5
    backend: str = "auto"
    partition: str = "optimal"
    fusion: str = "auto"
    mode: str = "exchange"
    timeout_s: float = 300.0
    prefix: str = DEMO_PREFIX
    subnet: str = DEMO_SUBNET

    @property
    def names(self) -> list[str]:
        return ["leader"] + [f"f{i}" for i in range(1, self.followers + 1)]

    def spec(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "subnet": self.subnet,
                "devices": [{"name": n, "cpu": self.cpu, "bandwidth": self.bandwidth} for n in self.names]}


class WarmProcess:
    """A process on one emulated device that answers one timed inference per line on stdin
    (``{"s": seconds}``), kept warm between samples (as the cluster's processes are). It starts
    when built; :meth:`wait_ready` waits for its warm-up. Its stderr goes to ``log``."""

    def __init__(self, tb: Any, device: str, argv: list[str], timeout_s: float, log: Path) -> None:
        self.timeout_s, self.log_path = timeout_s, Path(log)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "wb")
        self.p = tb.exec(device, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                         text=True, bufsize=1)

    def wait_ready(self) -> None:
        from edgeweave.bench.tbcluster import _read_line

        if _read_line(self.p, self.timeout_s) is None:
            err = self._stderr_tail()
            raise EdgeweaveError(f"single-device baseline did not start (exit {self.p.poll()}): {err}")

    def time_once(self) -> float:
        from edgeweave.bench.tbcluster import _read_line

        assert self.p.stdin is not None
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        line = _read_line(self.p, self.timeout_s)
        if line is None:
            raise EdgeweaveError(f"single-device baseline gave no time within {self.timeout_s:g} s (exit {self.p.poll()})")
        return float(json.loads(line)["s"])

    def _stderr_tail(self) -> str:
        self.close()
        return self.log_path.read_text(errors="replace").strip()[-300:]

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


def export_onnx(model: torch.nn.Module, size: int, path: Path) -> Path:
    """The whole model as one ONNX graph (opset 17, NCHW input), written once and reused."""
    import warnings

    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(tmp), dynamo=False, opset_version=17,
                          input_names=["x"], do_constant_folding=True)
    tmp.replace(path)
    return path


# A full x86 server core as the testbed benchmarks measured it (bench edgeld, docs/bench-edgeld.md):
# VGG16's convolutions at about 1.2e-11 s per FLOP, one synchronisation of four busy 0.25-core
# devices about 4.5 ms (0.55 ms per message and end at full core, scaled by 1/cap), 4.6-6.1 ms of
# CPU per MB moved at 0.25 core. Fixed numbers, so the demo's plan does not depend on the load.
NOMINAL_A, NOMINAL_LATENCY_S, NOMINAL_BYTE_S = 1.2e-11, 0.55e-3, 1.3e-9


def nominal_cluster(names: list[str], cpu: float, bandwidth_bps: float) -> Any:
    """Profiles for the planner without profiling each device (``edgeweave profile`` inside each
    cap takes minutes): every device a nominal full core slowed by its cap, on its link rate.
    They decide how the plan is cut (equal devices get equal strips whatever the numbers);
    the predicted time is a nominal estimate, the measured one is what the demo reports."""
    from dataclasses import replace

    from edgeweave.profiling.profile import Cluster, DeviceProfile

    base = DeviceProfile(name="nominal", a=NOMINAL_A, latency_s=NOMINAL_LATENCY_S, byte_s=NOMINAL_BYTE_S,
                         meta={"nominal": True, "cpu": cpu})
    return Cluster([replace(base.slowed(1.0 / cpu), name=n, bandwidth_bps=bandwidth_bps) for n in names])


def testbed_demo_step(out: Path, cfg: TestbedDemoConfig | None = None, console: Any = None) -> dict[str, Any]:
    """Build an emulated cluster (root, Linux: namespaces, tc-shaped links, cgroup CPU caps), run
    ``cfg.model`` on a real photo over it, and compare with the whole model on one equally capped
    device, with plain torch and with ONNX Runtime. Interleaved rounds; medians. Writes the plan,
    the fastest frame's timeline (PNG) and the result under ``out``. The testbed is torn down
    before this returns, also on failure.

    Returns ``latency_s`` (cluster), ``single_device_torch_s``, ``single_device_ort_s``,
    ``speedup`` (over torch), ``speedup_over_ort``, ``rel_err``, ``timeline``, ``plan``, ..."""
    from edgeweave.bench import tbcluster as T
    from edgeweave.checkpoint import load_checkpoint
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.runtime.timeline import breakdown, plot_timeline
    from edgeweave.testbed import Testbed, emulation_support

    if console is None:
        from edgeweave.console import console
    cfg = cfg or TestbedDemoConfig()
    ok, why = emulation_support()
    if not ok:
        raise EdgeweaveError(f"the emulated cluster needs root on Linux with iproute2 and cgroup v1: {why}")
    t0 = time.perf_counter()
    out = Path(out)
    work = out / "work"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with console.status(f"writing {cfg.model} at {cfg.size} (seeded random weights) as a checkpoint and as ONNX..."):
            ckpt, mhash = T.write_checkpoint(f"torchvision:{cfg.model}", work / f"{cfg.model}-{cfg.size}.safetensors",
                                             input_size=cfg.size, seed=0)
            model, _spec, _ = load_checkpoint(ckpt)
            model.eval()
            onnx_path = export_onnx(model, cfg.size, work / f"{cfg.model}-{cfg.size}.onnx")
            gm = capture(model, (1, 3, cfg.size, cfg.size))
            cluster = nominal_cluster(cfg.names, cfg.cpu, float(parse_rate(cfg.bandwidth)))
            plan = make_plan(gm, cluster, partition=cfg.partition,
                             fusion=cfg.fusion, mode=cfg.mode, backend=cfg.backend,
                             model_name=f"torchvision:{cfg.model}", model_hash=mhash)
            plan_file = work / "plan.json"
            plan.save(plan_file)
            model = gm = None  # the devices load their own copies; this process needs the plan only
        phases = {"files_and_plan_s": time.perf_counter() - t0}
        console.print(f"plan: {len(plan.stages)} stages over {len(cfg.names)} devices, backends "
                      f"{', '.join(sorted(set(plan.backends)))}; planned with nominal profiles (a reference core slowed "
                      f"to {cfg.cpu:g}, not measured here): predicted {1e3 * plan.predicted_s:.0f} ms")
        tb = Testbed.up(cfg.spec(), emulate=True)
        procs: list[Any] = []
        bc = None
        try:
            for d in tb.devices:  # boot uncapped (imports, weights, compiling graphs); caps go on before timing
                tb.set_cpu(d, None)
            with console.status(f"starting the leader and {cfg.followers} followers in their namespaces, "
                                "and the single-device baselines..."):
                solo_torch = WarmProcess(tb, tb.leader, [sys.executable, "-c", T.BASELINE, str(Path(ckpt).resolve()), str(cfg.size), "0", "2"],
                                         cfg.timeout_s, work / "solo-torch.log")
                procs.append(solo_torch)
                solo_ort = WarmProcess(tb, tb.leader, [sys.executable, "-c", ORT_BASELINE, str(Path(onnx_path).resolve()), str(cfg.size), "2"],
                                       cfg.timeout_s, work / "solo-ort.log")
                procs.append(solo_ort)
                bc = T.BenchCluster(tb, Path(ckpt).resolve(), cluster, (work / "cluster").resolve(), timeout_s=cfg.timeout_s,
                                    driver="edgeweave.runtime.demo_driver")
                if bc.ready["model_hash"] != mhash:
                    raise EdgeweaveError("the leader's weights differ from the checkpoint written")
                rep = bc.call({"op": "plan", "path": str(plan_file.resolve())})
                solo_torch.wait_ready()
                solo_ort.wait_ready()
            for d in tb.devices:
                tb.set_cpu(d, cfg.cpu)
            phases["boot_s"] = time.perf_counter() - t0 - phases["files_and_plan_s"]
            console.print(f"cluster up in {phases['boot_s']:.0f} s; every device now capped at {cfg.cpu:g} core, "
                          f"links {cfg.bandwidth}; rel_err against the whole model on the leader: {rep['rel_err']:.1e}")
            entry: dict[str, Any] = {"rep": rep, "lats": [], "best": None}
            torch_s: list[float] = []
            ort_s: list[float] = []
            from edgeweave.console import progress_bar

            with progress_bar() as bar:
                task = bar.add_task("rounds: cluster, one device torch, one device ORT", total=cfg.rounds + 1)
                # a first round warms every process up under the caps, untimed
                bc.call({"op": "infer", "plan_id": rep["plan_id"], "repeat": 1})
                solo_torch.time_once()
                solo_ort.time_once()
                bar.advance(task)
                for _ in range(cfg.rounds):
                    T.timed_frame(bc, entry, None)
                    torch_s.append(solo_torch.time_once())
                    ort_s.append(solo_ort.time_once())
                    bar.advance(task)
        finally:
            if bc is not None:
                bc.close()
            for p in procs:
                p.close()
            torn = tb.down()
        lat_s = statistics.median(entry["lats"])
        t_torch, t_ort = statistics.median(torch_s), statistics.median(ort_s)
        timings = entry["best"]
        png = plot_timeline(timings, out / "timeline.png",
                            title=f"{cfg.model} {cfg.size}x{cfg.size} (untrained) on leader + {cfg.followers} followers, "
                                  f"{cfg.cpu:g} core each, {cfg.bandwidth}")
        res: dict[str, Any] = {
            "model": f"torchvision:{cfg.model}", "weights": "untrained (seeded random)", "input": "photo",
            "input_size": cfg.size, "batch": 1, "devices": cfg.names, "cpu": cfg.cpu, "bandwidth": cfg.bandwidth,
            "partition": cfg.partition, "fusion": cfg.fusion, "mode": cfg.mode, "backend": cfg.backend,
            "backends": dict(zip(cfg.names, plan.backends)), "profiles": "nominal",
            "latency_s": lat_s, "latencies_s": entry["lats"], "predicted_s": plan.predicted_s,
            "single_device_torch_s": t_torch, "single_device_torch_times_s": torch_s,
            "single_device_ort_s": t_ort, "single_device_ort_times_s": ort_s,
            "speedup": t_torch / lat_s, "speedup_over_ort": t_ort / lat_s,
            "rel_err": rep["rel_err"], "max_abs_err": rep["max_abs_err"],
            "timings": timings, "breakdown": breakdown(timings), "plan": plan.to_dict(), "timeline": png,
            "testbed_left": torn.get("remaining") or {}, "phases": phases, "seconds": time.perf_counter() - t0,
        }
        console.print(plan_table(res, measured_s=[st["wall_s"] for st in timings["stages"] if st["index"] != "final"]))
        return res
    finally:
        torch.set_num_threads(threads)


def plot_latencies(res: dict[str, Any], path: Path) -> str:
    """Bars: the model on one capped device (plain torch, ONNX Runtime) and on the cluster, each
    with its rounds as dots. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpu = res["cpu"]
    rows = [(f"one {cpu:g}-core device\nplain torch", res["single_device_torch_s"], res["single_device_torch_times_s"], "0.55"),
            (f"one {cpu:g}-core device\nONNX Runtime", res["single_device_ort_s"], res["single_device_ort_times_s"], "0.35"),
            (f"{len(res['devices'])} devices ({cpu:g} core each)\nedgeweave, {'/'.join(sorted(set(res['backends'].values())))}",
             res["latency_s"], res["latencies_s"], "C0")]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, (label, med, times, colour) in enumerate(rows):
        ax.barh(i, 1e3 * med, color=colour, height=0.6)
        ax.plot([1e3 * t for t in times], [i] * len(times), "k.", ms=4)
        ax.text(1e3 * max(times), i, f"  {1e3 * med:.0f} ms", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("latency per image, ms (bar: median; dots: each round)")
    ax.set_xlim(0, 1e3 * max(max(r[2]) for r in rows) * 1.25)
    ax.set_title(f"{res['model']} {res['input_size']}x{res['input_size']} (untrained), {res['bandwidth']} links\n"
                 f"the cluster is {res['speedup']:.2f}x faster than plain torch, {res['speedup_over_ort']:.2f}x than "
                 "ONNX Runtime on one device", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
