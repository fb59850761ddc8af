"""Link probe over a real gloo process group: real processes, real TCP on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from edgeweave.profiling.link import fit_link

pytestmark = pytest.mark.timeout(120)


def test_fit_link_recovers_a_line():
    bw, lat = 80e6, 0.002
    sizes = [64, 65536, 1 << 20, 4 << 20]
    t = [8 * n / bw + lat for n in sizes]
    got_bw, got_lat = fit_link(sizes, t)
    assert got_bw == pytest.approx(bw, rel=1e-9) and got_lat == pytest.approx(lat, rel=1e-9)
    # times that do not grow with size: bandwidth from the largest message, latency >= 0
    got_bw, got_lat = fit_link([100, 1000], [0.001, 0.0009])
    assert got_bw == pytest.approx(8 * 1000 / 0.0009) and got_lat >= 0
    # a shaper's bucket passes small messages at line rate: the line's intercept would be
    # negative, the latency is the small message's own time (less its transfer time)
    sizes = [64, 65536, 1 << 20]
    t = [0.0003, 8 * 65536 / 50e6 - 0.004, 8 * (1 << 20) / 50e6 - 0.004]
    got_bw, got_lat = fit_link(sizes, t)
    assert got_bw == pytest.approx(50e6, rel=0.05) and got_lat == pytest.approx(0.0003 - 8 * 64 / got_bw)
    with pytest.raises(ValueError):
        fit_link([64, 64], [0.1, 0.1])


PAIR = textwrap.dedent(
    """
    import json, sys, time
    import torch, torch.distributed as dist
    from edgeweave.profiling.link import probe_link, respond_link
    torch.set_num_threads(1)
    from datetime import timedelta
    rank, port, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode == "probe":
        # a group built directly, as the runtime does, unknown to torch.distributed's globals
        store = dist.TCPStore("127.0.0.1", int(port), 2, rank == 0, timedelta(seconds=30))
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        group = dist.ProcessGroupGloo(store, rank, 2, opts)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        group = None
    if rank == 0 and mode == "probe":
        t0 = time.perf_counter()
        bw, lat = probe_link(1, sizes=(64, 65536, 1 << 20), repeats=3, group=group)
        print(json.dumps({"bw": bw, "lat": lat, "probe_s": time.perf_counter() - t0}), flush=True)
    elif rank == 0:
        # the peer never answers: the probe must give up after its timeout, not hang
        t0 = time.perf_counter()
        try:
            probe_link(1, timeout_s=1.5)
            print(json.dumps({"timeout": None}), flush=True)
        except TimeoutError as e:
            print(json.dumps({"timeout": {"after_s": time.perf_counter() - t0, "msg": str(e)}}), flush=True)
    elif mode == "probe":
        respond_link(0, timeout_s=30, group=group)
    else:
        time.sleep(6)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(tmp_path, mode: str) -> dict:
    script = tmp_path / "pair.py"
    script.write_text(PAIR)
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=100) for p in procs]
    assert procs[0].returncode == 0, outs[0][1][-2000:]
    if mode == "probe":
        assert procs[1].returncode == 0, outs[1][1][-2000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


def test_probe_link_between_two_processes(tmp_path):
    r = _pair(tmp_path, "probe")
    # loopback: far faster than any emulated link, latency well under 50 ms
    assert r["bw"] > 2e8, r["bw"]
    assert 0 <= r["lat"] < 0.05, r["lat"]
    assert r["probe_s"] < 10


def test_probe_link_times_out_on_a_silent_peer(tmp_path):
    r = _pair(tmp_path, "silent")
    assert r["timeout"] is not None and 1.4 <= r["timeout"]["after_s"] < 5, r
    assert "rank 1" in r["timeout"]["msg"]


def test_byte_cost_on_loopback_is_measured_in_the_device_s_time() -> None:
    """Two ranks of one process echo a message; the CPU per byte sent or received is positive
    and far below what would make a 1 MB strip cost a core 100 ms."""
    from edgeweave.profiling.link import measure_byte_s

    vals = [measure_byte_s(nbytes=1 << 18, rounds=8, busy_s=0.05) for _ in range(2)]
    assert all(0.0 < v < 1e-7 for v in vals), vals
