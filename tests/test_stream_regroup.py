"""A device that dies or hangs in the middle of an adaptive stream (real processes, gloo on loopback).

The stream must go on with the devices still there: the failed frame runs again on a plan for the
survivors, its output equals the single-device result, and nothing is left running afterwards.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from edgeweave.runtime.leader import LocalCluster
from edgeweave.runtime.stream import AdaptiveStream
from _runtime_helpers import _alive, equal_stream, small_cluster, small_model as _model

pytestmark = pytest.mark.timeout(300)


def _check(s: AdaptiveStream, model: torch.nn.Module, frames: int):
    recs = []
    for i in range(frames):
        x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(i))
        y, rec = s.step(x)
        with torch.no_grad():
            assert torch.allclose(y, model(x), rtol=1e-4, atol=1e-5)
        recs.append(rec)
    return recs


def _until_joined(s: AdaptiveStream, model: torch.nn.Module, within_s: float):
    """Serve checked frames until one reports a device taken in; that frame's record, or None."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        (rec,) = _check(s, model, 1)
        if rec.joined:
            return rec
        time.sleep(0.2)
    return None


@pytest.mark.slow
def test_the_stream_goes_on_when_followers_die_down_to_the_leader_alone():
    with small_cluster(3, timeout_s=10) as (cl, model, _spec):
        s = equal_stream(cl, model)
        assert all(r.event != "regrouped" for r in _check(s, model, 2))
        os.kill(cl.followers[1].process.pid, signal.SIGKILL)  # worker2, between worker1 and worker3
        # let gloo see the connection close first: it then refuses to even post an operation
        # with worker2 (a RuntimeError at once, which must count as worker2's failure too)
        time.sleep(1.0)
        t0 = time.monotonic()
        recs = _check(s, model, 3)
        assert time.monotonic() - t0 < 10  # the connection drops: no time-out to wait for
        assert recs[0].event == "regrouped" and recs[0].lost == ["worker2"] and recs[0].regroup_s > 0
        assert cl.names == ["leader", "worker1", "worker3"] and s.plan.devices == cl.names
        assert all(len(r.compute_s) == 3 and r.event != "regrouped" for r in recs[1:])
        assert {r.plan_version for r in recs[1:]} == {recs[0].plan_version}
        # the work moved: every survivor computes, the leader included
        assert all(c > 0 for c in recs[-1].compute_s)
        for f in list(cl.followers):
            os.kill(f.process.pid, signal.SIGKILL)
        recs = _check(s, model, 2)
        assert recs[0].event == "regrouped" and sorted(recs[0].lost) == ["worker1", "worker3"]
        assert cl.names == ["leader"] and s.plan.devices == ["leader"] and len(recs[1].compute_s) == 1


@pytest.mark.slow
def test_a_hung_follower_is_left_out_after_the_time_out_and_reaped_at_the_end():
    timeout = 3.0
    # the stopped process is reaped at the end too, though it left the cluster
    with small_cluster(2, timeout_s=timeout, grace_s=5) as (cl, model, _spec):
        s = equal_stream(cl, model)
        _check(s, model, 1)
        os.kill(cl.followers[0].process.pid, signal.SIGSTOP)  # alive, never answers
        t0 = time.monotonic()
        (rec,) = _check(s, model, 1)
        took = time.monotonic() - t0
        assert rec.event == "regrouped" and rec.lost == ["worker1"]
        # found silent within the time-out, then left out after one more time-out of roll call
        assert took < 2 * timeout + 8.0
        assert cl.names == ["leader", "worker2"]
        _check(s, model, 2)


@pytest.mark.slow
def test_a_follower_left_out_while_alive_offers_itself_again_and_is_taken_back():
    """A board that hung (SIGSTOP) long enough to be left out wakes up (SIGCONT): it sees the
    next generation without it, registers again, and the stream takes it in by itself."""
    with small_cluster(2, timeout_s=3.0, grace_s=5) as (cl, model, _spec):
        s = equal_stream(cl, model, admit_every_s=0.0)
        _check(s, model, 1)
        pid = cl.followers[0].process.pid
        os.kill(pid, signal.SIGSTOP)
        (rec,) = _check(s, model, 1)
        assert rec.lost == ["worker1"] and cl.names == ["leader", "worker2"]
        os.kill(pid, signal.SIGCONT)
        joined = _until_joined(s, model, within_s=60)
        assert joined is not None and joined.joined == ["worker1"], "the woken follower was not taken back"
        assert cl.names == ["leader", "worker2", "worker1"]
        assert cl.followers[-1].info["pid"] == pid  # the same process, registered again
        recs = _check(s, model, 2)
        assert len(recs[-1].compute_s) == 3 and recs[-1].compute_s[2] > 0


@pytest.mark.slow
def test_a_registration_whose_board_died_before_it_was_taken_in_costs_no_time_out():
    """A board registers (and proves it holds the key) and dies before the stream takes it in: its
    beat never moves, so it is not offered (taking it in would wait a whole group time-out), and it
    is dropped for good."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from edgeweave.runtime import auth
    from edgeweave.runtime import rendezvous as rv

    model, spec = _model()
    timeout = 20.0
    cl = LocalCluster(1, timeout_s=timeout)
    try:
        cl.load_model(model, spec)
        s = equal_stream(cl, model, admit_every_s=0.0)
        _check(s, model, 1)
        def ghost() -> None:  # answers the challenge once the stream looks for newcomers, then never beats
            st = dist.TCPStore("127.0.0.1", cl.port, None, False, timedelta(seconds=30), wait_for_workers=False)
            rv.join(st, auth.Control(auth.load_key(cl.key_file)), "ghost",
                    {"name": "ghost", "pid": 0, "profile": {"name": "ghost"}})

        threading.Thread(target=ghost, daemon=True).start()
        t0 = time.monotonic()
        recs = _check(s, model, 3)
        assert time.monotonic() - t0 < timeout / 4
        assert all(not r.joined and not r.lost for r in recs) and cl.names == ["leader", "worker1"]
        t0 = time.monotonic()
        assert cl.newcomers() == [] and time.monotonic() - t0 < 0.5  # remembered as dead
    finally:
        cl.close()


@pytest.mark.slow
def test_a_board_that_comes_back_is_taken_in_again():
    """A follower dies; a new process registers under its name (the board rebooted). The stream
    takes it in before a later frame: the model is shipped to it and it gets rows again."""
    import json
    import subprocess
    import sys

    model, spec = _model()
    cl = LocalCluster(2, timeout_s=10)
    pids = cl.pids
    back = None
    try:
        cl.load_model(model, spec)
        s = equal_stream(cl, model, admit_every_s=0.0)
        _check(s, model, 1)
        os.kill(cl.followers[0].process.pid, signal.SIGKILL)
        (rec,) = _check(s, model, 1)
        assert rec.lost == ["worker1"] and cl.names == ["leader", "worker2"]
        assert cl.newcomers() == []  # the dead registration is not offered again
        prof = json.dumps(s.profiles["worker1"].to_dict())
        back = subprocess.Popen([sys.executable, "-m", "edgeweave", "worker", "--leader", f"127.0.0.1:{cl.port}",
                                 "--name", "worker1", "--profile-json", prof], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OMP_NUM_THREADS="1", EDGEWEAVE_KEY_FILE=cl.key_file))
        joined = _until_joined(s, model, within_s=120)
        assert joined is not None and joined.joined == ["worker1"] and joined.lost == []
        assert cl.names == ["leader", "worker2", "worker1"] and s.plan.devices == cl.names
        recs = _check(s, model, 2)
        assert len(recs[-1].compute_s) == 3 and recs[-1].compute_s[2] > 0
    finally:
        cl.close()
        if back is not None:
            try:
                assert back.wait(timeout=20) == 0  # the shutdown reaches the newcomer too
            finally:
                if back.poll() is None:
                    back.kill()
                    back.wait()
    assert not any(_alive(p) for p in pids)


@pytest.mark.slow
def test_hand_started_followers_a_dead_one_costs_no_time_out():
    """Followers started by hand (no process handle at the leader): the survivors mark the broken
    generation as left, the dead one never does, and since the failure named it the leader does
    not wait the time-out for it."""
    import subprocess
    import sys

    from edgeweave.profiling.profile import Cluster
    from edgeweave.runtime.leader import RemoteCluster

    model, spec = _model()
    timeout = 30.0
    port = 29800 + os.getpid() % 150
    prof = Cluster.uniform(3)
    procs = [subprocess.Popen([sys.executable, "-m", "edgeweave", "worker", "--leader", f"127.0.0.1:{port}",
                               "--name", d.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for d in prof.devices[1:]]
    try:
        with RemoteCluster(prof, f"127.0.0.1:{port}", timeout_s=timeout, start_timeout_s=120) as cl:
            cl.load_model(model, spec)
            s = equal_stream(cl, model)
            _check(s, model, 1)
            procs[0].kill()
            procs[0].wait()
            time.sleep(1.0)
            (rec,) = _check(s, model, 1)
            assert rec.lost == [prof.devices[1].name] and cl.names == ["leader", prof.devices[2].name]
            assert rec.regroup_s < timeout / 3, rec.regroup_s
            _check(s, model, 1)
        assert procs[1].wait(timeout=20) == 0  # the survivor got the shutdown
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
