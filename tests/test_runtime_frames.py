"""Frames in flight on real processes: groups of devices serve frames at once (Session.open_groups,
runtime/frames.py), each group with an ordinary plan over its own devices, exactly; a follower
killed mid-stream costs no frame."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.planning.graph import capture
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster
from edgeweave.runtime.frames import GroupServer, latency_stats
from edgeweave.runtime.leader import LocalCluster
from edgeweave.runtime.run import compare, load_for_run

pytestmark = pytest.mark.timeout(300)

NAME, SIZE = "small_cnn", 32
SHAPE = (1, 3, SIZE, SIZE)


@pytest.fixture(scope="module")
def model_and_graph():
    model, spec = load_for_run(NAME, SIZE)
    return model, spec, capture(model, SHAPE)


def group_plan(gm, cluster: Cluster, sizes: list[int], model_hash: str, splits: list[str] | None = None):
    """Consecutive devices of ``cluster`` in groups of ``sizes`` (a GroupPlan's shape)."""
    devs, groups, i = cluster.devices, [], 0
    for j, k in enumerate(sizes):
        sub = devs[i:i + k]
        i += k
        plan = make_plan(gm, Cluster(sub), model_name=NAME, model_hash=model_hash,
                         split=(splits or ["auto"] * len(sizes))[j])
        groups.append(SimpleNamespace(devices=[d.name for d in sub], plan=plan))
    return SimpleNamespace(groups=groups)


def frames(n: int) -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.randn(SHAPE) for _ in range(n)]


def assert_exact(model, xs, results) -> None:
    assert [r.index for r in results] == list(range(len(xs)))  # every frame, in arrival order
    with torch.no_grad():
        for r in results:
            ref = model(xs[r.index])
            assert float(ref.abs().max()) > 1e-3 and float(ref.std()) > 1e-4, "degenerate reference proves nothing"
            err = compare(r.output, ref)
            assert err["rel_err"] <= 1e-5, (r.index, r.devices, err)


@pytest.fixture(scope="module")
def cl(model_and_graph):
    model, spec, _gm = model_and_graph
    with LocalCluster(4, timeout_s=60) as session:
        session.load_model(model, spec)
        yield session


def test_groups_serve_frames_at_once_exactly(cl, model_and_graph):
    model, _spec, gm = model_and_graph
    # the leader's group splits rows, a group of two followers (its head a follower: the frame
    # travels leader -> head -> leader) splits output channels, one follower runs whole frames
    gp = group_plan(gm, cl.cluster, [2, 2, 1], cl.model_hash, ["rows", "channels", "auto"])
    assert any(s.split == "channels" for s in gp.groups[1].plan.stages if s.kind == "spatial")
    srv = GroupServer(cl, gp)
    xs = frames(15)
    res = srv.serve(xs)
    srv.close()
    assert_exact(model, xs, res)
    assert {r.group for r in res} == {0, 1, 2}  # every group served frames
    assert {tuple(r.devices) for r in res} == {("leader", "worker1"), ("worker2", "worker3"), ("worker4",)}
    # the groups overlapped: some frame started before an earlier one (of another group) ended
    assert any(b.start_s < a.end_s for a, b in zip(res, res[1:]))
    stats = latency_stats(res)
    assert stats["count"] == 15 and stats["p95_s"] >= stats["p50_s"] > 0
    # the same groups opened again serve a longer stream: the first opening's ends are not theirs
    srv = GroupServer(cl, gp)
    more = frames(24)
    assert_exact(model, more, srv.serve(more))
    srv.close()
    # closed: the cluster runs a whole-cluster plan again, exactly
    x = xs[0]
    y, _ = cl.infer(x, cl.load_plan(make_plan(gm, cl.cluster, model_name=NAME, model_hash=cl.model_hash)))
    with torch.no_grad():
        assert compare(y, model(x))["rel_err"] <= 1e-5


def test_open_groups_refuses_what_it_cannot_run(cl, model_and_graph):
    _model, _spec, gm = model_and_graph
    devs = cl.cluster.devices
    pid = cl.load_plan(make_plan(gm, Cluster([devs[2], devs[3]]), model_name=NAME, model_hash=cl.model_hash),
                       ranks=[2, 3])
    with pytest.raises(EdgeweaveError, match="open_groups"):
        cl.infer(frames(1)[0], pid)  # its group is not open
    with pytest.raises(EdgeweaveError, match="not ranks"):
        cl.load_plan(make_plan(gm, Cluster([devs[2], devs[3]]), model_name=NAME, model_hash=cl.model_hash),
                     ranks=[3, 2])  # names in the wrong order
    for bad in ([[0, 1], [1, 2]], [[1, 0]], [[]], [[7]]):
        with pytest.raises(EdgeweaveError, match="disjoint"):
            cl.open_groups(bad)
    cl.open_groups([[0, 1], [2, 3]])
    try:
        with pytest.raises(EdgeweaveError, match="close_groups"):
            cl.load_plan(make_plan(gm, cl.cluster, model_name=NAME, model_hash=cl.model_hash))
        y, tm = cl.infer(frames(1)[0], pid)
        assert tm.names == ["worker2", "worker3"] and len(tm.per_device) == 2
    finally:
        cl.close_groups()


def test_a_follower_killed_mid_stream_loses_no_frame(model_and_graph):
    model, spec, gm = model_and_graph
    with LocalCluster(4, timeout_s=20) as session:
        session.load_model(model, spec)
        srv = GroupServer(session, group_plan(gm, session.cluster, [2, 2, 1], session.model_hash),
                          replan=lambda c: group_plan(gm, c, [1] * len(c.devices), session.model_hash))
        killed: list[int] = []

        def kill(r) -> None:
            if r.index == 6 and not killed:
                victim = session.followers[2].process  # worker3, in the group headed by worker2
                killed.append(victim.pid)
                os.kill(victim.pid, signal.SIGKILL)

        xs = frames(24)
        res = srv.serve(xs, rate=50.0, on_frame=kill)
        srv.close()
        assert killed
        assert_exact(model, xs, res)
        kinds = [e.kind for e in srv.events]
        assert kinds[:2] == ["failure", "regrouped"], srv.events
        assert "worker3" in srv.events[0].detail
        assert srv.groups == [["leader"], ["worker1"], ["worker2"], ["worker4"]]
        assert sum(r.retries for r in res) >= 1  # the frame in flight on the dead group ran again
        later = [r for r in res if r.start_s > srv.events[1].at_s]
        assert later and all("worker3" not in r.devices for r in later)

        # the board comes back: a new worker3 registers; the next stream (`run --rate --slo-ms`'s)
        # takes it into a group
        back = subprocess.Popen([sys.executable, "-m", "edgeweave", "worker", "--leader", f"127.0.0.1:{session.port}",
                                 "--name", "worker3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OMP_NUM_THREADS="1", EDGEWEAVE_KEY_FILE=session.key_file))
        try:
            deadline = time.monotonic() + 120
            while not session.newcomers():
                assert time.monotonic() < deadline and back.poll() is None, "worker3 did not register again"
                time.sleep(0.5)
            from edgeweave.runtime.run import RunConfig
            from edgeweave.runtime.slo import run_stream

            cfg = RunConfig(repeat=160, rate=40.0, slo_ms=5000.0, check=True, backend="torch")
            out = run_stream(session, NAME, model, spec, frames(1)[0], cfg)
            assert out["lost_frames"] == 0 and out["rel_err"] <= 1e-5, out["rel_err"]
            assert [e["kind"] for e in out["events"]][:2] == ["admitted", "regrouped"], out["events"]
            assert any("worker3" in g for g in out["groups"]) and "worker3" in session.names
            assert any("worker3" in f["devices"] for f in out["frames"])
        finally:
            session.close()
            if back.poll() is None:
                back.kill()
            back.wait(timeout=30)


def test_run_cli_serves_a_stream_under_an_slo(tmp_path):
    """`edgeweave run --rate --slo-ms` as a user runs it: a real process, JSON out, every frame
    answered and exact, the groups the planner chose for the SLO."""
    import json

    out = tmp_path / "stream.json"
    p = subprocess.run([sys.executable, "-m", "edgeweave", "run", "--model", "small_cnn", "--input-size", "32",
                        "--workers", "3", "--repeat", "10", "--rate", "40", "--slo-ms", "500", "--check",
                        "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["count"] == 10 and len(res["frames"]) == 10 and res["lost_frames"] == 0
    assert res["rel_err"] <= 1e-5
    names = sorted(n for g in res["groups"] for n in g)
    assert names == sorted(res["devices"])  # every device in exactly one group
    assert all(lat <= 0.5 for lat in res["predicted"]["group_latency_s"])
    assert res["slo_s"] == 0.5 and isinstance(res["slo_met"], bool)
    assert "frames/s" in p.stderr and "groups" in p.stderr
    bad = subprocess.run([sys.executable, "-m", "edgeweave", "run", "--model", "small_cnn", "--input-size", "32",
                          "--workers", "1", "--rate", "-3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--rate must be > 0" in bad.stderr and "Traceback" not in bad.stderr


def test_frames_in_flight_on_one_group_overlap_and_stay_exact(cl, model_and_graph):
    """Two slots: every device of a group serves two frames at once on two threads; their
    messages are kept apart by tag offsets, so answers stay exact and frames overlap in time."""
    model, _spec, gm = model_and_graph
    gp = group_plan(gm, cl.cluster, [3, 2], cl.model_hash)
    gp.slots = 2
    srv = GroupServer(cl, gp)
    assert cl.slots == 2
    xs = frames(16)
    res = srv.serve(xs)
    srv.close()
    assert_exact(model, xs, res)
    for g in (0, 1):
        mine = sorted((r for r in res if r.group == g), key=lambda r: r.start_s)
        assert any(b.start_s < a.end_s for a, b in zip(mine, mine[1:])), f"group {g} never had two frames at once"
    with pytest.raises(EdgeweaveError, match="slots must be"):
        cl.open_groups([[0, 1]], slots=0)
