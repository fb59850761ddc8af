"""`edgeweave run` and `edgeweave worker` as a user runs them: real processes, JSON on stdout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _runtime_helpers import _alive

pytestmark = pytest.mark.timeout(300)

EW = [sys.executable, "-m", "edgeweave"]


def _children_named_worker() -> list[int]:
    """Live `edgeweave worker` processes whose parent is this test process (orphan check)."""
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"worker" in cmd and b"edgeweave" in cmd and ppid in (me, 1) and _alive(int(d.name)):
            out.append(int(d.name))
    return out


def test_run_local_with_cluster_profiles_gather_batch_two(tmp_path: Path):
    cluster = {"devices": [{"name": n, "a": a, "bandwidth_bps": 1e9} for n, a in [("leader", 1e-10), ("fast", 5e-11),
                                                                               ("slow", 4e-10)]]}
    cf = tmp_path / "cluster.json"
    cf.write_text(json.dumps(cluster))
    out = subprocess.run(EW + ["run", "--model", "cifar_resnet18", "--input-size", "32", "--workers", "2", "--cluster",
                               str(cf), "--partition", "ocbp", "--fusion", "pools", "--mode", "gather", "--batch", "2",
                               "--repeat", "2", "--check", "--json", "--timeline", str(tmp_path / "tl.png")],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert (tmp_path / "tl.png").read_bytes()[:4] == b"\x89PNG" and res["timeline_png"] == str(tmp_path / "tl.png")
    b = res["breakdown"]
    assert b["compute_s"] > 0 and b["imbalance_s"] >= 0
    assert abs(b["compute_s"] + b["imbalance_s"] + b["other_s"] - b["total_s"]) < 1e-9
    for key in ("latency_s", "rel_err", "max_abs_err", "max_abs_ref", "plan", "timings", "single_device_s"):
        assert key in res
    assert res["rel_err"] <= 1e-4 and res["max_abs_ref"] > 0
    assert res["plan"]["devices"] == ["leader", "fast", "slow"] and res["plan"]["mode"] == "gather"
    assert res["plan"]["input_shape"][0] == 2 and res["batch"] == 2
    spatial = [s for s in res["plan"]["stages"] if s["kind"] == "spatial"]
    rows = {a["device"]: a["out_rows"][1] - a["out_rows"][0] for a in spatial[0]["assignments"]}
    assert rows[1] > rows[2]  # the fast follower gets more rows than the slow one
    assert len(res["latencies_s"]) == 2 and res["latency_s"] > 0
    assert "plan:" in out.stderr  # the human-readable table goes to stderr
    assert not _children_named_worker()


@pytest.mark.slow
def test_run_with_followers_started_by_hand(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cf = tmp_path / "cluster.json"
    cf.write_text(json.dumps({"devices": [{"name": n, "a": 1e-10, "bandwidth_bps": 1e9} for n in ("gl", "board-a", "board-b")]}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GLOO_SOCKET_IFNAME", None)  # followers find the interface that routes to the leader
    workers = [subprocess.Popen(EW + ["worker", "--leader", f"127.0.0.1:{port}", "--name", n], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for n in ("board-b", "board-a")]  # registration order must not matter
    try:
        out = subprocess.run(EW + ["run", "--model", "cifar_resnet18", "--input-size", "32", "--cluster", str(cf),
                                   "--listen", f"127.0.0.1:{port}", "--check", "--json", "--repeat", "1"],
                             capture_output=True, text=True, timeout=240, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        res = json.loads(out.stdout)
        assert res["rel_err"] <= 1e-4
        assert res["devices"] == ["gl", "board-a", "board-b"]
        for w in workers:  # the leader's shutdown ends the followers it used
            assert w.wait(timeout=30) == 0, w.stderr.read()[-2000:]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()


@pytest.mark.parametrize("args,needle", [
    (["--partition", "best"], "--partition must be one of"),
    (["--mode", "scatter"], "--mode must be one of"),
    ([], "give --workers K"),
])
def test_run_user_errors_are_one_line_exit_2(args, needle):
    out = subprocess.run(EW + ["run", "--model", "small_cnn", "--input-size", "28"] + args,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not ln.startswith("[W")]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], out.stderr


def test_cluster_file_that_does_not_fit_the_worker_count(tmp_path: Path):
    cf = tmp_path / "c.json"
    cf.write_text(json.dumps({"devices": [{"name": n, "a": 1e-10, "bandwidth_bps": 1e9} for n in ("leader", "w")]}))
    out = subprocess.run(EW + ["run", "--model", "small_cnn", "--input-size", "28", "--workers", "3", "--cluster", str(cf)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "needs 4" in out.stderr


def test_worker_without_a_leader_fails_within_its_connect_timeout():
    t0 = time.monotonic()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(EW + ["worker", "--leader", f"127.0.0.1:{port}", "--connect-timeout", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot reach the leader" in out.stderr
    assert time.monotonic() - t0 < 60
    out = subprocess.run(EW + ["worker", "--leader", "nohostport"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "HOST:PORT" in out.stderr


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


@pytest.mark.slow
def test_killed_leader_leaves_no_followers_behind():
    """SIGKILL the leader of `edgeweave run` mid-run: its local followers must not survive it."""
    lead = subprocess.Popen(EW + ["run", "--model", "cifar_resnet18", "--input-size", "32", "--workers", "2",
                                  "--repeat", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        kids: list[int] = []
        while time.monotonic() < deadline and len(kids) < 2:
            kids = _children(lead.pid)
            time.sleep(0.2)
        assert len(kids) == 2, "the leader did not start its followers"
        time.sleep(3)  # let them register and start computing
        assert lead.poll() is None
        lead.kill()
        lead.wait()
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(k) for k in kids)
    finally:
        if lead.poll() is None:
            lead.kill()
            lead.wait()


def test_run_a_checkpoint_at_its_own_input_size(tmp_path: Path):
    from edgeweave.checkpoint import load_model, save_checkpoint

    model, spec = load_model("small_cnn", in_channels=1, input_size=28)
    ck = save_checkpoint(tmp_path / "mnist_cnn.safetensors", model, spec)
    out = subprocess.run(EW + ["run", "--model", str(ck), "--workers", "1", "--check", "--json", "--repeat", "1"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["plan"]["input_shape"] == [1, 1, 28, 28] and res["rel_err"] <= 1e-4


def test_run_adaptive_replans_when_a_profile_is_wrong(tmp_path: Path):
    """`run --adaptive`: the cluster file claims follower `w1` is 20x faster than the others, but
    the three local processes run at the same speed; the stream finds w1 slow relative to the
    leader, re-plans, and gives w1 fewer rows. Outputs stay exact. (Only ratios between devices
    are asserted: how fast this host really is decides the absolute factors; the first CI run of
    this test met a host on which w1's claimed speed was about right and the leader's 2.5x off.)"""
    cluster = {"devices": [{"name": n, "a": a, "bandwidth_bps": 1e9} for n, a in [("leader", 4e-10), ("w1", 2e-11),
                                                                               ("w2", 4e-10)]]}
    cf = tmp_path / "cluster.json"
    cf.write_text(json.dumps(cluster))
    out = subprocess.run(EW + ["run", "--model", "vgg11", "--input-size", "128", "--workers", "2", "--cluster", str(cf),
                               "--repeat", "8", "--adaptive", "--check", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert len(res["frames"]) == 8 == len(res["latencies_s"]) and res["rel_err"] <= 1e-4
    assert res["replans"] >= 1 and "re-plans" in out.stderr
    first = next(f for f in res["frames"] if f["event"] == "replanned")
    factors = first["factors"]
    # w1 found slower than profiled, relative to the leader, when the stream re-planned (after two
    # frames: 2.2-2.8x in five runs), and much slower once the estimate settled (6.4-6.9x)
    assert factors[1] > 1.5 * factors[0], factors
    last = res["frames"][-1]["factors"]
    assert last[1] > 3 * last[0], last
    undone = [f for f in res["frames"] if f.get("reverted")]

    def rows_of_w1(plan: dict) -> float:
        """w1's share of all spatial rows (a re-plan may fuse into a different number of stages)."""
        rows = [(a["device"], a["out_rows"][1] - a["out_rows"][0]) for s in plan["stages"] if s["kind"] == "spatial"
                for a in s["assignments"]]
        return sum(n for d, n in rows if d == 1) / sum(n for _, n in rows)

    initial = json.loads(subprocess.run(EW + ["plan", "--model", "vgg11", "--input-size", "128", "--cluster", str(cf), "--json"],
                                        capture_output=True, text=True, timeout=120).stdout)
    if undone:  # adapt rule 5: the re-plan ran slower here (3 processes on this host's cores): undone
        lat = [f["latency_s"] for f in res["frames"]]
        i, j = first["index"], undone[0]["index"]
        assert min(lat[i + 2:j + 1]) > 1.25 * sorted(lat[i - 1:i + 1])[0]
        assert rows_of_w1(res["plan"]) == rows_of_w1(initial["plan"])
    else:
        assert rows_of_w1(res["plan"]) < rows_of_w1(initial["plan"])
    assert not _children_named_worker()
