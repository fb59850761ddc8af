"""The clients of ``bench stream``'s serve phase: C threads, each posting the seeded input to
``edgeweave serve --slo-ms`` one request after another for a fixed time, as a line's cameras
would; a refused request (503) waits what its ``Retry-After`` says before the next. Every answer's
logits are compared with the whole model's output. Prints one JSON line: the answers (end times,
latencies, errors), the refusals counted here, and the server's own counts (``/v1/stats`` and
``/metrics``) read afterwards, so the orchestrator can check that every refusal was counted.

Run inside the leader's network namespace but outside its CPU cap (the clients stand for other
machines)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any


def _counters(text: str) -> dict[str, float]:
    """The unlabelled samples of a ``/metrics`` scrape, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    return {smp.name: smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
            if not smp.labels}


def run_clients(url: str, clients: int, seconds: float, size: int, ref: list[float], timeout_s: float = 120.0
                ) -> dict[str, Any]:
    import httpx
    import torch

    from edgeweave.bench.leader_driver import bench_input
    from edgeweave.serving.preprocess import encode_raw

    body = encode_raw(bench_input(size))
    reference = torch.tensor(ref, dtype=torch.float32)
    scale = max(float(reference.abs().max()), 1e-30)
    lock = threading.Lock()
    answers: list[dict[str, float]] = []
    counts = {"refused": 0, "refused_slo": 0, "errors": 0}
    t0 = time.perf_counter()
    deadline = t0 + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout_s) as http:
            while time.perf_counter() < deadline:
                t1 = time.perf_counter()
                try:
                    r = http.post("/v1/infer?logits=true", content=body,
                                  headers={"content-type": "application/octet-stream"})
                except httpx.HTTPError:
                    with lock:
                        counts["errors"] += 1
                    time.sleep(1.0)
                    continue
                t2 = time.perf_counter()
                if r.status_code == 200:
                    a = r.json()
                    err = float((torch.tensor(a["logits"]) - reference).abs().max()) / scale
                    with lock:
                        answers.append({"start_s": t1 - t0, "end_s": t2 - t0, "latency_s": t2 - t1,
                                        "queue_s": a["queue_s"], "group": a["group"], "rel_err": err})
                elif r.status_code == 503:
                    with lock:
                        counts["refused"] += 1
                        counts["refused_slo"] += "SLO" in r.json().get("detail", "")
                    time.sleep(float(r.headers.get("retry-after", 1)))
                else:
                    with lock:
                        counts["errors"] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with httpx.Client(base_url=url, timeout=timeout_s) as http:
        stats = http.get("/v1/stats").json()
        text = http.get("/metrics").text
    counters = _counters(text)
    metrics = {k: counters.get(f"edgeweave_{k}_total") for k in ("served", "refused", "refused_slo")}
    return {"answers": answers, **counts, "seconds": time.perf_counter() - t0, "stats": stats, "metrics": metrics}


def summarize_clients(r: dict[str, Any]) -> dict[str, Any]:
    """Frames per second answered once every client is running (from the first answer to the
    last), latency percentiles, and whether the server counted every refusal the clients saw."""
    import statistics

    ends = sorted(a["end_s"] for a in r["answers"])
    lats = sorted(a["latency_s"] for a in r["answers"])
    fps = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else None
    st, m = r["stats"], r["metrics"]
    return {"answered": len(ends), "refused": r["refused"], "refused_slo": r["refused_slo"], "errors": r["errors"],
            "fps": fps, "p50_s": statistics.median(lats) if lats else None,
            "p95_s": lats[min(len(lats) - 1, int(0.95 * len(lats)))] if lats else None,
            "rel_err": max((a["rel_err"] for a in r["answers"]), default=None),
            "stats_refused": st.get("refused"), "stats_refused_slo": st.get("refused_slo"),
            "metrics_refused": m.get("refused"), "metrics_refused_slo": m.get("refused_slo"),
            "refusals_counted": st.get("refused") == m.get("refused") == r["refused"]
            and st.get("refused_slo") == m.get("refused_slo") == r["refused_slo"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="bench stream: concurrent clients of edgeweave serve --slo-ms")
    ap.add_argument("--url", required=True)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ref", required=True, help="JSON file: the whole model's output on the seeded input")
    a = ap.parse_args(argv)
    with open(a.ref) as fh:
        ref = json.load(fh)
    print(json.dumps(run_clients(a.url, a.clients, a.seconds, a.size, ref)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
