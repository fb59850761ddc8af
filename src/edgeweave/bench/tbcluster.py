"""A benchmark harness over the emulated testbed: one cluster up, many plans, caps changed live.

Why this shape (reusable by every distributed benchmark):

- The leader is a device like the others (a CPU-capped board), so the leader process runs
  *inside* its namespace and cgroup (:mod:`edgeweave.bench.leader_driver`); the orchestrator
  (this process, outside the testbed) only plans and talks to it through JSON lines on a pipe.
  Planning is pure and cheap, so it is done here at full speed and shipped as a plan file.
- Big weights never cross the shaped links: the model is written once to a checkpoint on disk
  and every follower starts with ``edgeweave worker --model PATH`` (the leader still checks the
  sha256 each follower reports).
- One process group serves every configuration: a plan may use only the first k+1 devices,
  and links (tc) and CPU caps (cgroups) are changed between configurations with
  :meth:`Testbed.set_bandwidth` / :meth:`Testbed.set_cpu` while the processes keep running.
- Device profiles for the planner come from ``edgeweave profile`` run inside a capped namespace,
  once per distinct CPU cap (in parallel on different devices), and links from the measured TCP
  goodput of each distinct rate (the tc rate is a ceiling, not what gloo gets).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeweave.errors import EdgeweaveError
from edgeweave.profiling.profile import Cluster, DeviceProfile
from edgeweave.testbed import Testbed

BENCH_PREFIX = "ewb-"
BENCH_SUBNET = "10.77.30.0/24"


def machine_state() -> dict[str, Any]:
    """Cores and load average, recorded before and after a benchmark (the host is shared)."""
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    import platform

    import torch

    return {"cpus": os.cpu_count(), "loadavg": [float(x) for x in load], "torch": torch.__version__,
            "python": platform.python_version(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def bench_spec(n_devices: int, cpu: float = 0.25, bandwidth: str = "1000mbit", prefix: str = BENCH_PREFIX,
               subnet: str = BENCH_SUBNET) -> dict[str, Any]:
    """A testbed spec: ``leader`` plus ``w1..w{n-1}``, all with the same cap and link at first."""
    names = ["leader"] + [f"w{i}" for i in range(1, n_devices)]
    return {"prefix": prefix, "subnet": subnet, "devices": [{"name": n, "cpu": cpu, "bandwidth": bandwidth} for n in names]}


def write_checkpoint(model_name: str, path: Path, input_size: int = 224, seed: int = 0) -> tuple[Path, str]:
    """Build ``model_name`` with seeded weights and save it once (reused when present).
    Returns the path and the weights' sha256."""
    import torch

    from edgeweave.checkpoint import load_checkpoint, model_hash, save_checkpoint
    from edgeweave.runtime.run import load_for_run

    path = Path(path)
    if path.is_file():
        model, _spec, _ = load_checkpoint(path)
        return path, model_hash(model)
    torch.manual_seed(seed)
    model, spec = load_for_run(model_name, input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    save_checkpoint(tmp, model, spec)
    tmp.replace(path)
    return path, model_hash(model)


# ------------------------------------------------------------------------------------ profiling
def profile_caps(tb: Testbed, caps: Sequence[float], quick: bool = True, workdir: Path | None = None,
                 timeout_s: float = 600.0, backends: str = "torch") -> dict[float, dict[str, Any]]:
    """Run ``edgeweave profile`` inside a capped device for every distinct cap, in parallel on
    different devices (their caps are restored afterwards). Returns cap -> {"profile": dict,
    "fits": dict, "seconds": s}. Needs as many devices as distinct caps. ``backends``: what
    ``edgeweave profile --backend`` measures besides torch (``torch``: nothing else)."""
    caps = sorted(set(float(c) for c in caps))
    if len(caps) > len(tb.devices):
        raise EdgeweaveError(f"profile_caps: {len(caps)} caps but only {len(tb.devices)} devices")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ewb-profile-"))
    workdir.mkdir(parents=True, exist_ok=True)
    before = {d: tb.cpu_cap(d) for d in tb.devices}
    procs = []
    try:
        for dev, cap in zip(tb.devices, caps):
            tb.set_cpu(dev, cap)
            out = workdir / f"profile-{cap:g}.json"
            rep = workdir / f"report-{cap:g}.json"
            # torch only by default: the bench clusters compute with torch, and every other backend's lines
            # multiply the profiling time (at 0.05 core each compiled layer costs seconds); no
            # plot: drawing it took 3 of a quick profile's 7.5 minutes at 0.05 core
            argv = [sys.executable, "-m", "edgeweave", "profile", "--name", f"cap{cap:g}", "--out", str(out),
                    "--json", str(rep), "--backend", backends, "--no-plot"]
            if quick:
                argv.append("--quick")
            procs.append((cap, rep, tb.exec(dev, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        res: dict[float, dict[str, Any]] = {}
        for cap, rep, p in procs:
            _o, err = p.communicate(timeout=timeout_s)
            if p.returncode != 0:
                raise EdgeweaveError(f"profiling at {cap:g} core failed: {err.strip()[-300:]}")
            r = json.loads(rep.read_text())
            res[cap] = {"profile": r["profile"], "fits": r["fits"], "seconds": r["seconds"], "settings": r["settings"]}
        return res
    finally:
        for _c, _r, p in procs:
            if p.poll() is None:
                p.kill()
        for d, c in before.items():
            tb.set_cpu(d, c)


def measure_rates(tb: Testbed, rates: Sequence[str], seconds: float = 1.0) -> dict[str, float]:
    """Measured TCP goodput (bits/s) leader -> first follower for each tc rate (links restored)."""
    src, dst = tb.devices[0], tb.devices[1]
    before = {d: tb._bw.get(d) for d in (src, dst)}  # noqa: SLF001 - read-only view of the spec rates
    out: dict[str, float] = {}
    try:
        for r in rates:
            tb.set_bandwidth(src, r)
            tb.set_bandwidth(dst, r)
            out[r] = tb.measure_bandwidth(src, dst, seconds=seconds)
    finally:
        for d, bps in before.items():
            tb.set_bandwidth(d, bps)
    return out


def planner_cluster(names: Sequence[str], caps: Sequence[float], rates: Sequence[str],
                    profiles: dict[float, dict[str, Any]], goodput: dict[str, float],
                    latencies: Mapping[float, float] | None = None,
                    byte_s: Mapping[float, float] | None = None) -> Cluster:
    """Device profiles for the planner: each device's measured compute line at its cap, its
    link's measured goodput, and the per-message latency and per-byte CPU time measured at its
    cap (``latencies``, ``byte_s``, see :func:`message_latencies`; none: 0)."""
    devs = []
    for n, c, r in zip(names, caps, rates):
        p = dict(profiles[float(c)]["profile"])
        lat = (latencies or {}).get(float(c), 0.0)
        p.update(name=n, bandwidth_bps=goodput[r], latency_s=lat, byte_s=(byte_s or {}).get(float(c), 0.0),
                 meta={"cpu": c, "rate": r})
        devs.append(DeviceProfile.from_dict(p))
    return Cluster(devs)


SYNC = textwrap.dedent(
    """
    # what one synchronisation costs busy CPU-capped devices, waited for as the runtime waits
    import json, statistics, sys, time, torch, torch.distributed as dist
    from edgeweave.runtime.wire import wait_work
    torch.set_num_threads(1)
    rank, n, addr, port, rounds, work_ms = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
    bulk_bytes, bulk_rounds = int(sys.argv[7]), int(sys.argv[8])
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=n)
    peers = [p for p in (rank - 1, rank + 1) if 0 <= p < n]  # strips lie in a line: one or two neighbours
    a = torch.randn(64, 64)
    def busy():
        c0 = time.process_time()
        while time.process_time() - c0 < work_ms / 1e3:
            a @ a
    def wait(w):
        wait_work(w, timeout_s=30.0, probe=None, describe=lambda: "peer")
    def timed(exchange):
        out = []
        dist.barrier()
        for r in range(rounds):
            t0 = time.monotonic()
            busy()
            if exchange:   # like a stage boundary: each sends a halo-sized message to its neighbours, then waits
                sends = [dist.isend(torch.zeros(256), p) for p in peers]
                for p in peers:
                    wait(dist.irecv(torch.empty(256), p))
                for w in sends:
                    wait(w)
            out.append(time.monotonic() - t0)
        return out[2:]
    alone, synced = timed(False), timed(True)
    # CPU per byte moved (ranks 0 and 1): both ends echo a strip-sized message, received as the
    # runtime receives (into a new buffer, then copied once into place); process CPU (every
    # thread, gloo's included) per byte sent plus received, in this device's time (wall per CPU
    # second when busy, from the rounds alone)
    buf, held = torch.zeros(bulk_bytes // 4), torch.zeros(bulk_bytes // 4)
    def recv(src):
        got = torch.empty_like(buf)
        wait(dist.irecv(got, src))
        held.copy_(got)
    dist.barrier()
    c0 = time.process_time()
    for r in range(bulk_rounds if rank < 2 else 0):
        if rank == 0:
            wait(dist.isend(buf, 1)); recv(1)
        else:
            recv(0); wait(dist.isend(buf, 0))
    cpu_per_byte = (time.process_time() - c0) / (2.0 * bulk_rounds * buf.numel() * 4)
    byte_s = cpu_per_byte * statistics.fmean(alone) / (work_ms / 1e3) if rank < 2 else 0.0
    res = torch.tensor([statistics.fmean(alone), statistics.fmean(synced), statistics.median(alone), statistics.median(synced), byte_s], dtype=torch.float64)
    dist.all_reduce(res)
    if rank == 0:
        m = (res / torch.tensor([n, n, n, n, 2], dtype=torch.float64)).tolist()
        print(json.dumps({"busy_round_s": m[0], "synced_round_s": m[1], "overhead_s": m[1] - m[0],
                          "overhead_median_s": m[3] - m[2], "rounds": rounds, "work_ms": work_ms, "devices": n,
                          "byte_s": m[4], "bulk_bytes": bulk_bytes, "bulk_rounds": bulk_rounds}))
    dist.destroy_process_group()
    """
)


def sync_latency(tb: Testbed, devices: Sequence[str], rounds: int = 40, work_ms: float = 4.0, timeout_s: float = 120.0,
                 bulk_bytes: int = 1 << 19, bulk_rounds: int = 16) -> dict[str, Any]:
    """What one synchronisation costs busy devices: rounds of ``work_ms`` CPU seconds each,
    alone and then ending with a small message exchange between neighbours of the line
    ``devices`` (as at a stage boundary), waited for the way the runtime waits; ``overhead_s``
    = mean synced round - mean busy round (over the devices). Under a CPU quota this is far
    more than the wire latency: a device that used up its quota sleeps until the next period,
    and the devices finish their work out of phase. The planner's per-message ``latency_s``
    (added once at each end of a transfer) comes from this.

    Then the first two echo ``bulk_bytes`` ``bulk_rounds`` times: ``byte_s`` is the CPU time
    per byte sent or received, in the device's own time (the planner's ``DeviceProfile.byte_s``)."""
    port = str(random.randint(40000, 49999))
    n = len(devices)
    procs = [tb.exec(d, [sys.executable, "-c", SYNC, str(i), str(n), tb.address(devices[0]), port, str(rounds),
                         str(work_ms), str(bulk_bytes), str(bulk_rounds)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, d in enumerate(devices)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=timeout_s)
        if p.returncode != 0:
            raise EdgeweaveError(f"sync latency probe failed: {e.strip()[-300:]}")
        outs.append(o)
    return json.loads(outs[0].strip().splitlines()[-1])


def message_latencies(tb: Testbed, devices: Sequence[str], caps: Sequence[float]
                      ) -> tuple[dict[float, float], dict[str, dict[str, Any]]]:
    """The planner's per-message latency at each CPU cap: :func:`sync_latency` over the line of
    ``devices`` (the cluster the plans run on), all capped at it, half the overhead to each end
    of a message; the caps are given back afterwards.

    Why per cap: the overhead is mostly CPU time and quota waits, so it grows as the cap
    shrinks; one value measured at 0.25 core made a 0.5-core device look as slow to synchronise
    as a 0.125-core one. Why the whole line and not a pair: a stage boundary waits for the
    slowest of its devices to wake, so it costs more the more devices share it (measured on the
    testbed at 0.25 core: 2.2-2.7 ms per round for 2 devices, 4.5-4.8 ms for 4; at 0.375 core
    1.4-1.8 and 4.1-4.5 ms). Priced from a pair, VGG16's 4-device plan in bench edgedi predicted 0.208 s and
    ran 0.301 s; priced 3x higher the planner chose 8 stages instead of 10, predicted 0.242 s and
    ran 4 % faster (median of 10 interleaved rounds). Returns ({cap: latency_s}, {cap: probe})."""
    before = {d: tb.cpu_cap(d) for d in devices}
    lat: dict[float, float] = {}
    probes: dict[str, dict[str, Any]] = {}
    try:
        for c in sorted(set(float(c) for c in caps)):
            for d in devices:
                tb.set_cpu(d, c)
            probes[f"{c:g}"] = sync_latency(tb, devices)
            lat[c] = max(0.0, float(probes[f"{c:g}"]["overhead_s"])) / 2
    finally:
        for d, c in before.items():
            tb.set_cpu(d, c)
    return lat, probes


def byte_costs(probes: Mapping[str, Mapping[str, Any]]) -> dict[float, float]:
    """The planner's per-byte CPU time at each cap, from :func:`message_latencies`' probes."""
    return {float(c): float(p["byte_s"]) for c, p in probes.items() if "byte_s" in p}


# ------------------------------------------------------------------------------------ baseline
BASELINE = textwrap.dedent(
    """
    # the whole model on one device: plain torch, or (argv[5] "ort") a raw ONNX Runtime session
    # on the whole exported model, one thread; no network, no partitioning (a torchvision name,
    # or a checkpoint file read with edgeweave's loader: its weights)
    import json, os, statistics, sys, time, torch, torchvision
    torch.set_num_threads(1)
    name, sizes, repeat = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
    warmup = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    runtime = sys.argv[5] if len(sys.argv) > 5 else "torch"
    if os.path.isfile(name):
        from edgeweave.checkpoint import load_checkpoint
        m, spec, _ = load_checkpoint(name)
        ch = spec.in_channels
    else:
        m, ch = getattr(torchvision.models, name)(weights=None), 3
    m.eval()
    out = {}
    with torch.inference_mode():
        for s in sizes:
            x = torch.randn(1, ch, s, s)
            if runtime == "ort":
                from edgeweave.bench.kernels import raw_ort
                try:
                    f = raw_ort(m, x)
                except Exception as e:  # not every model exports whole: said on stdout, exit 3
                    print(json.dumps({"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}),
                          flush=True)
                    sys.exit(3)
            else:
                f = lambda: m(x)
            for _ in range(warmup):
                f()
            if repeat == 0:  # serve: one timed inference per line on stdin
                print(json.dumps({"ready": True}), flush=True)
                for _line in sys.stdin:
                    t0 = time.perf_counter(); f()
                    print(json.dumps({"s": time.perf_counter() - t0}), flush=True)
                sys.exit(0)
            t = []
            for _ in range(repeat):
                t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
            out[str(s)] = {"median_s": statistics.median(t), "times_s": t}
    print(json.dumps(out))
    """
)


def single_device_latency(tb: Testbed, device: str, model: str, sizes: Sequence[int], repeat: int,
                          timeout_s: float = 900.0) -> dict[int, dict[str, Any]]:
    """Latency of the whole ``model`` (a torchvision name or a checkpoint path) on ``device``
    alone (inside its cap)."""
    p = tb.exec(device, [sys.executable, "-c", BASELINE, model, ",".join(map(str, sizes)), str(repeat)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout_s)
    if p.returncode != 0:
        raise EdgeweaveError(f"single-device baseline failed: {err.strip()[-300:]}")
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def _read_line(proc: subprocess.Popen, timeout_s: float, prefix: str = "") -> str | None:
    """The next stdout line of ``proc`` starting with ``prefix`` (prefix removed), or None if
    none came within ``timeout_s`` (a reader thread: a pipe read cannot time out)."""
    box: dict[str, str] = {}

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                box["r"] = line[len(prefix):]
                return

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    th.join(timeout_s)
    return box.get("r")


BOOT_CORES = 1.0  # a device's cap while the processes a benchmark starts on it boot


@contextlib.contextmanager
def booting(tb: Testbed, devices: Sequence[str]) -> Any:
    """Raise ``devices``' CPU caps to ``BOOT_CORES`` while processes started on them boot, then
    give the caps back. Booting (imports, loading weights) is not what the benchmarks time, and
    at a fraction of a core it took tens of seconds per process (importing torch costs about 4 s
    of CPU: 16 s at 0.25 core). What they time runs at the caps, after a warm-up there (the CPU
    time a boosted process was granted and has not used stays with it for a moment: up to about
    10 ms measured); a board coming back after a failure (``BenchCluster.restart``) boots at its
    cap, since its rejoin time is measured."""
    before = {d: tb.cpu_cap(d) for d in devices}
    try:
        for d, c in before.items():
            if c is not None and c < BOOT_CORES:
                tb.set_cpu(d, BOOT_CORES)
        yield
    finally:
        for d, c in before.items():
            tb.set_cpu(d, c)


class SingleDevice:
    """The whole model on one device alone, kept warm between samples.

    Why a process that stays: the distributed side is measured on warm processes that served
    many frames, and one timed inference in a fresh process after a single warm-up ran 5-47 %
    (median 12 %) slower than a warm one on this host (bench edgeld run J: interleaved fresh
    samples 1.80-2.74 s against 1.60-1.66 s in one process), which inflated the speedups."""

    def __init__(self, tb: Testbed, device: str, model: str, size: int, warmup: int = 2, timeout_s: float = 600.0,
                 runtime: str = "torch"):
        # model: a torchvision name or a checkpoint path; runtime: torch, or ort (raw ONNX Runtime)
        self.timeout_s = timeout_s
        with booting(tb, [device]):  # up to its warm-up's end; timed at the cap
            self.p = tb.exec(device, [sys.executable, "-c", BASELINE, model, str(size), "0", str(warmup), runtime],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
            # its JSON lines only: an exporter may print a graph on stdout before it fails
            started = _read_line(self.p, timeout_s, '{"')
        why = json.loads('{"' + started).get("error") if started is not None else None
        if started is None or why:
            self.close()
            raise EdgeweaveError(f"single-device {runtime} baseline on {device} did not start: "
                                 + (why or f"no answer within {timeout_s:g} s (exit {self.p.poll()})"))
        # one more warm-up at the cap: CPU time the boost granted and the process has not used yet
        # stays with it after the cap is back (a 4 ms ONNX Runtime inference then ran unthrottled)
        self.time_once()

    def time_once(self) -> float:
        assert self.p.stdin is not None
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        line = _read_line(self.p, self.timeout_s, '{"s": ')
        if line is None:
            raise EdgeweaveError(f"single-device baseline gave no time within {self.timeout_s:g} s (exit {self.p.poll()})")
        return float(json.loads('{"s": ' + line)["s"])

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=30)

    def __enter__(self) -> "SingleDevice":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ort_baseline(stack: contextlib.ExitStack, tb: Testbed, device: str, model: str, size: int,
                 timeout_s: float) -> tuple[SingleDevice | None, str | None]:
    """Raw ONNX Runtime on the whole model on ``device``, kept warm in ``stack``; or None and why
    (not every model exports whole: VGG16 at 200 px pools 6x6 maps to 7x7, which the exporter
    refuses), so that the benchmark goes on and reports its speedups over torch alone."""
    try:
        return stack.enter_context(SingleDevice(tb, device, model, size, timeout_s=timeout_s, runtime="ort")), None
    except EdgeweaveError as e:
        from edgeweave.console import console

        console.print(f"[yellow]no ONNX Runtime baseline: {e}[/yellow]")
        return None, str(e)


# ------------------------------------------------------------------------------------ CPU
CpuMeter = Callable[[], list[float]]


def cpu_meter(tb: Testbed, devices: Sequence[str]) -> CpuMeter | None:
    """CPU seconds each device's cgroup has used so far (cpuacct), in ``devices`` order; None
    where the testbed does not account CPU (the loopback fallback without root)."""
    if any(tb.cpu_usage_s(d) is None for d in devices):
        return None
    return lambda: [float(tb.cpu_usage_s(d) or 0.0) for d in devices]


def metered(meter: CpuMeter | None, fn: Callable[[], Any]) -> tuple[Any, list[float] | None]:
    """``fn()`` and the CPU seconds each metered device used meanwhile (None without a meter)."""
    if meter is None:
        return fn(), None
    before = meter()
    out = fn()
    return out, [b - a for a, b in zip(before, meter())]


def cpu_ceiling(frames_cpu: Sequence[Sequence[float]], single_cpu: Sequence[float], bound: float) -> dict[str, Any]:
    """What the CPU a cluster spends per frame allows, against one device alone.

    ``work_ratio`` is the median over frames of the CPU all devices used together, over the
    median CPU of one frame of the model on the baseline device alone. A device cannot finish
    its share faster than its cap lets it use CPU, so even perfectly balanced and never waiting
    the frame takes at least the total CPU over the total cap; over the single device's latency
    that is ``bound / work_ratio`` (``bound``: the devices' speeds summed, over the baseline
    device's speed, as the benches define it). Why it is reported: it separates what a better
    plan could still win (the gap between the speedup and this ceiling: waiting, imbalance) from
    what it could not (the extra work of splitting: halos, every device reading every layer's
    weights for its few rows, the runtime's per-stage work, the leader's bookkeeping)."""
    if not frames_cpu or not single_cpu or statistics.median(single_cpu) <= 0:
        return {}
    per_device = [statistics.median(f[d] for f in frames_cpu) for d in range(len(frames_cpu[0]))]
    ratio = statistics.median(sum(f) for f in frames_cpu) / statistics.median(single_cpu)
    return {"cpu_s": per_device, "single_device_cpu_s": statistics.median(single_cpu), "work_ratio": ratio,
            "speedup_ceiling": bound / ratio}


# ------------------------------------------------------------------------------------ cluster
def timed_frame(bc: "BenchCluster", entry: dict[str, Any], meter: CpuMeter | None = None) -> None:
    """One timed inference of ``entry``'s loaded plan (``entry["rep"]["plan_id"]``): its latency
    goes to ``entry["lats"]``, and its timings to ``entry["best"]`` while it is the fastest; with
    a ``meter``, each device's CPU for the frame to ``entry["cpu"]``."""
    res, used = metered(meter, lambda: bc.call({"op": "infer", "plan_id": entry["rep"]["plan_id"], "repeat": 1}))
    if not entry["lats"] or res["latencies_s"][0] <= min(entry["lats"]):
        entry["best"] = res["timings"]
    entry["lats"].extend(res["latencies_s"])
    if used is not None:
        entry.setdefault("cpu", []).append(used)


@dataclass
class DriverReply:
    data: dict[str, Any]

    def __getitem__(self, k: str) -> Any:
        return self.data[k]


class BenchCluster:
    """The leader driver in the leader's namespace plus a follower on every other device, all
    holding the checkpoint ``ckpt``. Use as a context manager; :meth:`call` sends one command.
    ``driver`` is the leader's module (same command line and JSON-lines protocol; another
    benchmark may add commands, e.g. ``edgeweave.bench.edgedi_driver``)."""

    def __init__(self, tb: Testbed, ckpt: Path, cluster: Cluster, workdir: Path, port: int | None = None,
                 timeout_s: float = 300.0, driver: str = "edgeweave.bench.leader_driver"):
        self.tb, self.ckpt, self.workdir = tb, Path(ckpt), Path(workdir)
        self.port = port or random.randint(30000, 39999)
        self.timeout_s = timeout_s
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfile = self.workdir / "cluster.json"
        cluster.save(cfile)
        self.log = open(self.workdir / "leader.log", "ab")
        argv = [sys.executable, "-m", driver, "--listen", f"0.0.0.0:{self.port}",
                "--model", str(self.ckpt), "--cluster", str(cfile), "--timeout", str(timeout_s)]
        from edgeweave.runtime.auth import KEY_ENV, write_key

        key_file = write_key(self.workdir / "cluster.key", force=True)  # the leader listens beyond loopback
        env = {"TORCH_CPP_LOG_LEVEL": "ERROR", KEY_ENV: str(key_file)}
        self.workers = {}
        self.worker_args = ["--model", str(self.ckpt), "--connect-timeout", str(int(timeout_s)), "--key", str(key_file)]
        with booting(tb, tb.devices):  # until every follower joined the leader
            self.leader = tb.exec(tb.leader, argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.log, text=True, bufsize=1)
            try:
                self.workers = tb.start_workers(port=self.port, extra_args=self.worker_args)
                self.ready = self._read(timeout_s * 2)
                if self.ready.get("op") != "ready":
                    raise EdgeweaveError(f"bench leader did not start: {self.ready}")
            except BaseException:
                self.close()
                raise

    def kill(self, device: str) -> None:
        """The follower on ``device`` dies (SIGKILL: no goodbye, its sockets just close)."""
        p = self.workers[device]
        p.kill()
        p.wait(timeout=10)

    def restart(self, device: str) -> None:
        """The board comes back: a new follower process on ``device`` registers with the leader."""
        self.workers |= self.tb.start_workers(port=self.port, extra_args=self.worker_args, devices=[device])

    def _read(self, timeout_s: float) -> dict[str, Any]:
        from edgeweave.bench.leader_driver import PREFIX

        line = _read_line(self.leader, timeout_s, PREFIX)
        if line is None:
            tail = (self.workdir / "leader.log").read_text(errors="replace")[-1500:]
            raise EdgeweaveError(f"bench leader gave no reply within {timeout_s:g} s (exit {self.leader.poll()}): {tail}")
        return json.loads(line)

    def call(self, cmd: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        assert self.leader.stdin is not None
        self.leader.stdin.write(json.dumps(cmd) + "\n")
        self.leader.stdin.flush()
        r = self._read(timeout_s or self.timeout_s)
        if not r.get("ok", True):
            raise EdgeweaveError(f"bench leader: {cmd.get('op')} failed: {r.get('error')}")
        return r

    def close(self) -> None:
        try:
            if self.leader.poll() is None:
                self.call({"op": "quit"}, timeout_s=30)
                self.leader.wait(timeout=30)
        except Exception:  # noqa: BLE001 - killed below
            pass
        for p in [self.leader, *self.workers.values()]:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()

    def __enter__(self) -> "BenchCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
