"""The CI testbed test of issue 3: 2 devices with CPU caps on shaped links, the leader itself in
its capped namespace (the bench harness), and a distributed result that is exact.

Needs root, iproute2 and the cgroup v1 cpu controller: skipped with the reason otherwise. Its own
prefix and subnet (ewe-, 10.77.31.0/24) keep it apart from a developer's testbed and the other
testbed tests.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeweave.testbed import Testbed, emulation_support

_OK, _WHY = emulation_support()
pytestmark = [
    pytest.mark.testbed,
    pytest.mark.slow,
    pytest.mark.skipif(not _OK, reason=f"the emulated testbed needs root, iproute2 and cgroup v1 ({_WHY})"),
    pytest.mark.timeout(240),
]

SPEC = {"prefix": "ewe-", "subnet": "10.77.31.0/24",
        "devices": [{"name": "leader", "cpu": 0.25, "bandwidth": "50mbit"}, {"name": "w1", "cpu": 0.25, "bandwidth": "50mbit"}]}

BUSY = "import time\nt0, c0 = time.perf_counter(), time.process_time()\nwhile time.perf_counter() - t0 < 1.0: pass\nprint((time.process_time() - c0) / (time.perf_counter() - t0))"


@pytest.fixture(scope="module")
def tb():
    t = Testbed.up(SPEC)
    yield t
    r = t.down()
    assert not r["remaining"], r


def test_caps_and_bandwidth_in_force(tb):
    assert tb.cpu_cap("leader") == pytest.approx(0.25) and tb.cpu_cap("w1") == pytest.approx(0.25)
    p = tb.exec("w1", [sys.executable, "-I", "-c", BUSY], stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=60)
    share = float(out)
    assert share <= 0.32, f"a busy loop under a 0.25-core cap got {share:.2f} of a core"
    bw = tb.measure_bandwidth("leader", "w1", seconds=1.0)
    assert 35e6 <= bw <= 55e6, f"50mbit link measured {bw / 1e6:.1f} Mbit/s"


def test_distributed_result_is_exact_with_the_leader_in_its_namespace(tb, tmp_path):
    """Leader driver inside the leader's namespace and cap, a follower that loads the same
    checkpoint from disk, a plan made outside: output equals the single-device output."""
    from edgeweave.bench.tbcluster import BenchCluster, write_checkpoint
    from edgeweave.checkpoint import load_checkpoint
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.profiling.profile import Cluster, DeviceProfile

    ckpt, h = write_checkpoint("small_cnn", tmp_path / "m.safetensors", input_size=32)
    model, _spec, _ = load_checkpoint(ckpt)
    cl = Cluster([DeviceProfile(name=n, a=4e-10, b=1e-4, bandwidth_bps=48e6) for n in ("leader", "w1")])
    t0 = time.perf_counter()
    with BenchCluster(tb, ckpt, cl, tmp_path / "cluster", timeout_s=120) as bc:
        assert bc.ready["names"] == ["leader", "w1"] and bc.ready["model_hash"] == h
        # the leader process really runs in the leader's namespace and cpu cgroup
        pid = bc.leader.pid
        ns = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout.strip()
        cg = Path(f"/proc/{pid}/cgroup").read_text()
        assert ns == "ewe-leader" and "/ewe-leader" in cg, (ns, cg)
        gm = capture(model, (1, 3, 32, 32))
        for mode in ("gather", "exchange"):
            plan = make_plan(gm, cl, partition="optimal", fusion="auto", mode=mode, model_name="small_cnn", model_hash=h)
            assert any(len([a for a in s.assignments if a.out_rows[1] > a.out_rows[0]]) == 2 for s in plan.stages), \
                "the plan should split some stage over both devices"
            path = tmp_path / f"plan-{mode}.json"
            plan.save(path)
            rep = bc.call({"op": "plan", "path": str(path)})
            assert rep["rel_err"] < 1e-5 and rep["max_abs_ref"] > 0, rep
            res = bc.call({"op": "infer", "plan_id": rep["plan_id"], "repeat": 2})
            assert len(res["latencies_s"]) == 2 and all(t > 0 for t in res["latencies_s"])
    assert time.perf_counter() - t0 < 200


def test_probes_used_by_the_planner_and_the_baseline(tb):
    """The synchronisation probe sees the capped devices' rounds (4 ms of CPU at 0.25 core take
    at least ~12 ms of wall time) and returns a finite overhead; the single-device baseline runs
    plain torchvision inside the cap and reports a median per size."""
    from edgeweave.bench.tbcluster import single_device_latency, sync_latency

    s = sync_latency(tb, ["leader", "w1"], rounds=12, work_ms=4.0)
    assert s["busy_round_s"] >= 0.012, s
    assert s["synced_round_s"] > 0 and abs(s["overhead_s"]) < 0.2, s
    b = single_device_latency(tb, "w1", "mobilenet_v3_small", [32, 64], repeat=2, timeout_s=180)
    assert set(b) == {32, 64} and all(v["median_s"] > 0 and len(v["times_s"]) == 2 for v in b.values())


def test_warm_single_device_and_per_cap_latencies(tb):
    """The warm baseline process times one inference per request inside the device's cgroup
    (its CPU use shows there); the per-cap probe measures each cap (synchronisation and CPU per
    byte moved) and gives the caps back."""
    from edgeweave.bench.tbcluster import SingleDevice, byte_costs, message_latencies

    # 160 px: each inference spans several 10 ms quota periods (at 64 px one took 2 ms on a fast
    # host, inside a single period's quota, and ran unthrottled)
    with SingleDevice(tb, "w1", "mobilenet_v3_small", 160, timeout_s=180) as solo:
        u0 = tb.cpu_usage_s("w1")
        times = [solo.time_once() for _ in range(3)]
        used = tb.cpu_usage_s("w1") - u0
    assert all(t > 0 for t in times)
    # at 0.25 core the timed inferences used about a quarter of their wall time in the cgroup
    assert 0.1 * sum(times) < used < 0.6 * sum(times), (times, used)
    # the ONNX Runtime baseline (the whole model exported once, one session) runs the same way
    with SingleDevice(tb, "w1", "mobilenet_v3_small", 160, timeout_s=180, runtime="ort") as solo_ort:
        u0 = tb.cpu_usage_s("w1")
        ort_times = [solo_ort.time_once() for _ in range(3)]
        ort_used = tb.cpu_usage_s("w1") - u0
    assert all(t > 0 for t in ort_times) and 0.1 * sum(ort_times) < ort_used < 0.6 * sum(ort_times), (ort_times, ort_used)
    lat, probes = message_latencies(tb, ["leader", "w1"], [0.5, 0.25])
    assert set(lat) == {0.25, 0.5} and set(probes) == {"0.25", "0.5"}
    assert all(0.0 <= v < 0.1 for v in lat.values()), lat
    # CPU per byte moved, in the device's own time: positive, below 100 ms per MB, and
    # costlier at the smaller cap (measured 4.6-5.0 ms/MB at 0.25 core, 2.3-2.8 at 0.5)
    byte_s = byte_costs(probes)
    assert set(byte_s) == {0.25, 0.5} and all(0.0 < v < 1e-7 for v in byte_s.values()), byte_s
    assert byte_s[0.25] > 1.2 * byte_s[0.5], byte_s
    assert tb.cpu_cap("leader") == pytest.approx(0.25) and tb.cpu_cap("w1") == pytest.approx(0.25)
