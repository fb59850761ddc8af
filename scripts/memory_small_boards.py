"""A model on small boards: five devices of the emulated testbed, each with a memory cap (default
VGG16 at 224 px, 1 GB each). The leader runs `edgeweave run --check` on the checkpoint with the
followers started by hand (the model shipped over the links); each device's cgroup is sampled
for its peak memory, anonymous (what the kernel cannot drop) and all (with the file pages of the
mapped model, which it can). Writes JSON (default results/memory/<model>-<memory>.json): the
plan's prediction per device beside what each device used, latency, rel_err, machine state.
Root and Linux only (namespaces, cgroups).

    .venv/bin/python scripts/memory_small_boards.py [--model vgg16] [--memory 1g] [--cpu 0.5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgeweave.bench.tbcluster import machine_state, write_checkpoint
from edgeweave.testbed import Testbed

NAMES = ("leader", "w1", "w2", "w3", "w4")


def sample(tb: Testbed, peaks: dict[str, dict[str, int]], stop: threading.Event) -> None:
    """Every 0.2 s, each device's memory cgroup (v1): peak anonymous bytes and usage, and how
    often it hit its limit (the kernel then dropped file pages; an OOM kill ends the run)."""
    while not stop.is_set():
        for n in NAMES:
            mem = Path(tb.groups[n]["memory"])
            try:
                stat = dict(line.split() for line in (mem / "memory.stat").read_text().splitlines())
                p = peaks[n]
                p["anon_peak_bytes"] = max(p.get("anon_peak_bytes", 0), int(stat["total_rss"]))
                p["usage_peak_bytes"] = int((mem / "memory.max_usage_in_bytes").read_text())
                p["limit_hits"] = int((mem / "memory.failcnt").read_text())
            except (OSError, KeyError, ValueError):
                pass
        stop.wait(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--memory", default="1g", help="each device's memory cap")
    ap.add_argument("--cpu", type=float, default=0.5, help="each device's CPU cap in cores")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = Path(a.json or f"results/memory/{a.model}-{a.memory}.json")
    work = Path(tempfile.mkdtemp(prefix="ew-memory-"))
    ckpt, _ = write_checkpoint(a.model, work / "model.safetensors", a.size)
    key = work / "cluster.key"
    subprocess.run([sys.executable, "-m", "edgeweave", "keygen", str(key)], check=True, capture_output=True)
    spec = {"prefix": "ewm-", "subnet": "10.77.40.0/24",
            "devices": [{"name": n, "cpu": a.cpu, "memory": a.memory, "bandwidth": "1000mbit"} for n in NAMES]}
    cluster = work / "cluster.json"  # placeholder compute lines: this measures memory, not speed
    cluster.write_text(json.dumps({"devices": [{"name": n, "a": 4e-10 / a.cpu, "bandwidth_bps": 9e8} for n in NAMES]}))
    state_before = machine_state()
    peaks: dict[str, dict[str, int]] = {n: {} for n in NAMES}
    stop = threading.Event()
    tb = Testbed.up(spec)
    try:
        threading.Thread(target=sample, args=(tb, peaks, stop), daemon=True).start()
        tb.start_workers(port=29500, extra_args=["--key", str(key)])
        t0 = time.time()
        run_json = work / "run.json"
        p = tb.exec("leader", [sys.executable, "-m", "edgeweave", "run", "--model", str(ckpt), "--cluster", str(cluster),
                               "--listen", f"{tb.address('leader')}:29500", "--key", str(key), "--check", "--repeat", "3",
                               "--timeout", "300", "--json", str(run_json)],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log, _ = p.communicate(timeout=1800)
        wall = time.time() - t0
    finally:
        stop.set()
        tb.down()
    run = json.loads(run_json.read_text()) if p.returncode == 0 and run_json.exists() else {}
    res = {
        "model": a.model, "input_size": a.size, "memory_cap": a.memory, "cpu_cap": a.cpu, "devices": list(NAMES),
        "ok": p.returncode == 0, "returncode": p.returncode, "wall_s": wall,
        "rel_err": run.get("rel_err"), "latency_s": run.get("latency_s"), "backends": run.get("backends"),
        "split": [s.get("split", "rows") if s["kind"] == "spatial" else s["kind"] for s in run.get("plan", {}).get("stages", [])],
        "predicted": run.get("memory"), "measured": peaks,
        "machine": {"before": state_before, "after": machine_state()},
        "log_tail": log[-3000:] if p.returncode != 0 else "",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    mb = 1 << 20
    print(f"{a.model} at {a.size} px on {len(NAMES)} devices of {a.memory}: {'ran' if res['ok'] else 'FAILED'}, "
          f"rel_err {res['rel_err']}, latency {res['latency_s']}")
    for n in NAMES:
        pred = (res["predicted"] or {}).get(n, {}).get("total", 0)
        m = peaks[n]
        print(f"  {n}: predicted {pred / mb:.0f} MB; peak anonymous {m.get('anon_peak_bytes', 0) / mb:.0f} MB, "
              f"with file pages {m.get('usage_peak_bytes', 0) / mb:.0f} MB, limit hit {m.get('limit_hits', 0)} times")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
