"""``edgeweave bench serve``: what the HTTP API costs and what a client sees when a device dies.

Runs on loopback (no root): the leader and K local followers, the API served by uvicorn in this
process on a free port, clients on httpx. Three phases on one cluster:

1. **overhead**: the same inputs, round-robin, as an in-process call of the server, a raw
   float32 request and a PNG request. A request's overhead is its client-side wall time minus
   what the answer accounts for (the inference, its wait in the queue, a regroup before it):
   per request, so the frames' noise cancels. Raw answers are compared with the model on one device.
2. **concurrent**: C clients at once; throughput against the cluster's capacity when busy
   (one frame at a time), and how many requests were refused.
3. **failover**: one client sends requests one after another; after a few, the last follower is
   SIGKILLed. Every request must still be answered (exactly); the one that met the failure
   carries the regroup.
The answers of phases 2 and 3 carry their outputs, compared with the model on one device.
Writes ``serve.json`` (rows, summary, configuration, machine state), ``serve.csv`` and
``serve.png`` under ``results/serve/``.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeweave.bench.tbcluster import machine_state
from edgeweave.console import console, progress_bar
from edgeweave.jsonio import write_json


@dataclass
class ServeBenchConfig:
    model: str = "vgg11"
    size: int = 96
    workers: int = 2
    rounds: int = 30  # overhead phase: requests of each kind
    clients: int = 4
    per_client: int = 8
    failover_requests: int = 16
    kill_after: int = 5

    @classmethod
    def quick_config(cls) -> "ServeBenchConfig":
        return cls(size=64, rounds=8, per_client=3, failover_requests=8, kill_after=3)


def run_serve_bench(cfg: ServeBenchConfig | None = None, *, out_dir: str | Path = "results",
                    progress: bool = True, quick: bool = False) -> dict[str, Any]:
    import httpx

    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.runtime.leader import LocalCluster
    from edgeweave.runtime.run import compare, load_sized
    from edgeweave.runtime.stream import AdaptiveStream
    from edgeweave.serving.app import create_app
    from edgeweave.serving.preprocess import NORMALIZATIONS, encode_raw
    from edgeweave.serving.server import InferenceServer, ServerLimits

    cfg = cfg or ServeBenchConfig()
    out = Path(out_dir) / "serve" / ("quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    before, t_start = machine_state(), time.perf_counter()
    model, spec, size = load_sized(cfg.model, cfg.size)
    shape = (1, spec.in_channels, size, size)
    norm = NORMALIZATIONS["imagenet"] if spec.in_channels == 3 else NORMALIZATIONS["none"]
    rows: list[dict[str, Any]] = []
    with LocalCluster(cfg.workers, timeout_s=20) as cl:
        cl.load_model(model, spec)
        plan = make_plan(capture(model, shape), cl.cluster, model_name=cfg.model, model_hash=cl.model_hash)
        server = InferenceServer(AdaptiveStream(cl, plan, cl.cluster), spec, cfg.model,
                                 ServerLimits(max_waiting=2 * cfg.clients, wait_timeout_s=60))
        server.warm_up()
        with Uvicorn(create_app(server, norm)) as url, httpx.Client(base_url=url, timeout=120) as client:
            rng = np.random.default_rng(0)
            bar = progress_bar(progress)
            bar.start()
            task = bar.add_task("bench serve", total=3 * cfg.rounds + cfg.clients * cfg.per_client
                                + cfg.failover_requests)

            def post(kind: str, phase: str, x: torch.Tensor | None, body: bytes, http: Any = client) -> dict[str, Any]:
                """One request; with ``x``, the answer's outputs are compared with one device's."""
                headers = {"content-type": "image/png" if kind == "image" else "application/octet-stream"}
                t0 = time.perf_counter()
                r = http.post(f"/v1/infer?logits={'true' if x is not None else 'false'}", content=body,
                              headers=headers)
                wall = time.perf_counter() - t0
                row = {"phase": phase, "kind": kind, "status": r.status_code, "wall_s": wall, "t_s": t0 - t_start}
                if r.status_code == 200:
                    a = r.json()
                    row.update(latency_s=a["latency_s"], queue_s=a["queue_s"], regroup_s=a["regroup_s"],
                               event=a["event"], lost=",".join(a["lost"]), devices=len(a["devices"]),
                               overhead_s=wall - a["latency_s"] - a["queue_s"] - a["regroup_s"])
                    if x is not None:
                        with torch.no_grad():
                            row["rel_err"] = compare(torch.tensor(a["logits"]).view(1, -1), model(x))["rel_err"]
                bar.advance(task)
                return row

            # 1. overhead: in-process, raw, image; round-robin so that load drifts hit all three
            for i in range(cfg.rounds):
                img = _png(rng.integers(0, 256, (size + 17, size + 31, 3), dtype=np.uint8))
                x = torch.randn(shape, generator=torch.Generator().manual_seed(i))
                t0 = time.perf_counter()
                _, info = server.infer(x)
                wall = time.perf_counter() - t0
                rows.append({"phase": "overhead", "kind": "direct", "status": 200, "wall_s": wall, "t_s": t0 - t_start,
                             "latency_s": info["latency_s"], "queue_s": info["queue_s"], "regroup_s": 0.0,
                             "event": info["event"], "lost": "", "devices": len(info["devices"]),
                             "overhead_s": wall - info["latency_s"] - info["queue_s"]})
                bar.advance(task)
                # no outputs in the answers here (1000 logits as JSON cost ~1 ms): what a client pays
                rows.append(post("raw", "overhead", None, encode_raw(x)))
                rows.append(post("image", "overhead", None, img))

            # 2. concurrent clients
            lock = threading.Lock()

            def client_loop(c: int) -> None:
                with httpx.Client(base_url=url, timeout=120) as own:
                    for j in range(cfg.per_client):
                        x = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + 100 * c + j))
                        row = post("raw", "concurrent", x, encode_raw(x), own)
                        with lock:
                            rows.append(row)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(cfg.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            concurrent_wall = time.perf_counter() - t0

            # 3. failover: the last follower dies between two requests
            victim = cl.followers[-1]
            for i in range(cfg.failover_requests):
                if i == cfg.kill_after:
                    os.kill(victim.process.pid, signal.SIGKILL)
                    time.sleep(1.0)  # the connection is closed before the next request
                x = torch.randn(shape, generator=torch.Generator().manual_seed(5000 + i))
                rows.append(post("raw", "failover", x, encode_raw(x)))
            bar.stop()
            server.idle(60)  # the last frame's learning done
            stats = client.get("/v1/stats").json()
    after = machine_state()
    summary = _summary(rows, cfg, concurrent_wall, victim.name)
    result = {"config": asdict(cfg), "summary": summary, "rows": rows, "stats": stats, "plan_devices": plan.devices,
              "machine_before": before, "machine_after": after, "seconds": time.perf_counter() - t_start}
    files = {"json": str(out / "serve.json"), "csv": str(out / "serve.csv"), "png": str(out / "serve.png")}
    with open(files["csv"], "w", newline="") as fh:
        keys = sorted({k for r in rows for k in r})
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    _plot(rows, cfg, Path(files["png"]))
    result["files"] = files
    write_json(files["json"], result)
    console.print(f"wrote {out}/serve.json, serve.csv, serve.png")
    return result


def _summary(rows: list[dict[str, Any]], cfg: ServeBenchConfig, concurrent_wall: float, victim: str) -> dict[str, Any]:
    def of(phase: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [r for r in rows if r["phase"] == phase and (kind is None or r["kind"] == kind)]

    def med(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rs if key in r]
        return statistics.median(vals) if vals else None

    s: dict[str, Any] = {}
    for kind in ("direct", "raw", "image"):
        rs = of("overhead", kind)
        s[f"{kind}_latency_s"] = med(rs, "latency_s")
        s[f"{kind}_overhead_s"] = med(rs, "overhead_s")
    lat = s["raw_latency_s"] or 0.0
    s["http_overhead_ratio"] = (s["raw_overhead_s"] / lat) if lat else None  # HTTP cost per inference
    conc = of("concurrent")
    ok = [r for r in conc if r["status"] == 200]
    s["concurrent_throughput_rps"] = len(ok) / concurrent_wall
    busy = statistics.median([r["latency_s"] for r in ok]) if ok else None
    # 1 = the queue kept the cluster busy all the time (a frame ends, the next starts)
    s["concurrent_utilisation"] = (s["concurrent_throughput_rps"] * busy) if busy else None
    s["concurrent_refused"] = len(conc) - len(ok)
    s["concurrent_wall_p50_s"] = med(ok, "wall_s")
    fo = of("failover")
    s["failover_errors"] = sum(r["status"] != 200 for r in fo)
    hit = [r for r in fo if r.get("event") == "regrouped"]
    s["failover_lost"] = sorted({n for r in hit for n in r["lost"].split(",") if n})
    s["failover_victim"] = victim
    s["failover_request_wall_s"] = hit[0]["wall_s"] if hit else None
    s["failover_regroup_s"] = hit[0]["regroup_s"] if hit else None
    s["failover_before_s"] = med(fo[:cfg.kill_after], "latency_s")
    s["failover_after_s"] = med([r for r in fo[cfg.kill_after:] if r.get("event") != "regrouped"], "latency_s")
    errs = [r["rel_err"] for r in rows if "rel_err" in r]
    s["max_rel_err"] = max(errs) if errs else None
    s["answered"] = sum(r["status"] == 200 for r in rows)
    s["requests"] = len(rows)
    return s


def _plot(rows: list[dict[str, Any]], cfg: ServeBenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    kinds = ["direct", "raw", "image"]
    parts = {k: [r for r in rows if r["phase"] == "overhead" and r["kind"] == k] for k in kinds}
    inf = [statistics.median([r["latency_s"] for r in parts[k]]) * 1e3 for k in kinds]
    ovh = [statistics.median([r["overhead_s"] for r in parts[k]]) * 1e3 for k in kinds]
    a.bar(kinds, inf, label="inference (median)", color="tab:blue")
    a.bar(kinds, ovh, bottom=inf, label="overhead: HTTP, JSON, decoding (median)", color="tab:orange")
    a.set_ylabel("ms per request")
    a.set_title(f"{cfg.model} {cfg.size}px, leader + {cfg.workers}: where a request's time goes")
    a.legend()
    fo = [r for r in rows if r["phase"] == "failover"]
    xs = list(range(len(fo)))
    a_lat = [r.get("latency_s", float("nan")) * 1e3 for r in fo]
    a_wall = [r["wall_s"] * 1e3 for r in fo]
    b.plot(xs, a_wall, "o-", label="client wall time")
    b.plot(xs, a_lat, "s--", label="inference")
    b.axvline(cfg.kill_after - 0.5, color="red", ls=":", label="follower SIGKILLed")
    b.set_ylim(bottom=0)
    b.set_xlabel("request")
    b.set_ylabel("ms")
    b.set_title("a follower dies between two requests")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


class Uvicorn:
    """uvicorn in a thread of this process on a free loopback port; the context gives its URL."""

    def __init__(self, app: Any):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
