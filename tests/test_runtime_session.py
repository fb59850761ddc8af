"""Runtime on real processes over loopback TCP (gloo), with plans written by hand.

Hand-made plans pin down the execution semantics independently of the planner: a one-row strip
on the leader, halo exchange between followers, a device that sits a stage out, leader-gather.
One LocalCluster (2 followers + the leader) is shared by the module to keep start-up cost low.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from edgeweave.checkpoint import load_model, model_hash, save_checkpoint
from edgeweave.errors import EdgeweaveError
from edgeweave.engine import simulate
from edgeweave.planning.graph import capture
from edgeweave.planning.plan import Assignment, Plan, Stage, Transfer
from edgeweave.runtime.leader import LocalCluster
from edgeweave.runtime.wire import PeerError

from _runtime_helpers import _alive, small_model

pytestmark = pytest.mark.timeout(300)

# conv bn relu conv bn relu pool: 28 -> 14 rows, then the same 14 -> 7; the BatchNorms
# (features_1, 4, 8, 11) are folded into their convolutions when the graph is captured
STAGE0 = [f"features_{i}" for i in range(7) if i not in (1, 4)]
STAGE1 = [f"features_{i}" for i in range(7, 14) if i not in (8, 11)]
HEAD = ["avgpool", "flatten", "classifier_0", "classifier_1", "classifier_2"]


def plan_exchange(h: str, batch: int = 1) -> Plan:
    """3 devices; stage 0 split 1/8/5 rows (a one-row strip on the leader), stage 1 on the
    followers only with halo exchange between them, head on the leader."""
    n = batch
    s0 = Stage(0, "spatial", STAGE0, [n, 1, 28, 28], [n, 32, 14, 14],
               [Assignment(0, (0, 4), (0, 1)), Assignment(1, (0, 20), (1, 9)), Assignment(2, (16, 28), (9, 14))],
               [Transfer(0, 1, (0, 20)), Transfer(0, 2, (16, 28))])
    s1 = Stage(1, "spatial", STAGE1, [n, 32, 14, 14], [n, 64, 7, 7],
               [Assignment(1, (0, 10), (0, 4)), Assignment(2, (6, 14), (4, 7))],
               [Transfer(0, 1, (0, 1)), Transfer(2, 1, (9, 10)), Transfer(1, 2, (6, 9))])
    s2 = Stage(2, "leader", HEAD, [n, 64, 7, 7], [n, 10], [Assignment(0, (0, 7), (0, 10))],
               [Transfer(1, 0, (0, 4)), Transfer(2, 0, (4, 7))])
    return Plan("small_cnn", h, [n, 1, 28, 28], ["leader", "worker1", "worker2"], "equal", "pools", "exchange",
                [s0, s1, s2])


def plan_gather(h: str) -> Plan:
    """EdgeLD style: the leader scatters the input with halos and gathers each block's output,
    and splits the last Linear by output features (a 'linear' stage)."""
    s0 = Stage(0, "spatial", STAGE0, [1, 1, 28, 28], [1, 32, 14, 14],
               [Assignment(1, (0, 16), (0, 7)), Assignment(2, (12, 28), (7, 14))],
               [Transfer(0, 1, (0, 16)), Transfer(0, 2, (12, 28))])
    s1 = Stage(1, "spatial", STAGE1, [1, 32, 14, 14], [1, 64, 7, 7],
               [Assignment(0, (0, 5), (0, 1)), Assignment(1, (0, 10), (1, 4)), Assignment(2, (6, 14), (4, 7))],
               [Transfer(1, 0, (0, 7)), Transfer(2, 0, (7, 14)), Transfer(0, 1, (0, 10)), Transfer(0, 2, (6, 14))])
    s2 = Stage(2, "leader", HEAD[:4], [1, 64, 7, 7], [1, 64], [Assignment(0, (0, 7), (0, 64))],
               [Transfer(1, 0, (1, 4)), Transfer(2, 0, (4, 7))])
    s3 = Stage(3, "linear", HEAD[4:], [1, 64], [1, 10],
               [Assignment(0, (0, 64), (0, 3)), Assignment(1, (0, 64), (3, 10))],
               [Transfer(0, 1, (0, 64))])
    return Plan("small_cnn", h, [1, 1, 28, 28], ["leader", "worker1", "worker2"], "equal", "none", "gather",
                [s0, s1, s2, s3], final_transfers=[Transfer(1, 0, (3, 10))])


@pytest.fixture(scope="module")
def cluster():
    model, spec = small_model()
    with LocalCluster(2, timeout_s=30) as cl:
        cl.load_model(model, spec)
        yield cl, model
    for pid in cl.pids:
        assert not _alive(pid)


@pytest.mark.parametrize("batch", [1, 2])
def test_hand_made_exchange_plan_is_exact(cluster, batch):
    cl, model = cluster
    plan = plan_exchange(cl.model_hash, batch)
    x = torch.randn(batch, 1, 28, 28)
    pid = cl.load_plan(plan)
    y, timings = cl.infer(x, pid)
    with torch.no_grad():
        ref = model(x)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5), float((y - ref).abs().max())
    # the in-process reference executor, with the weights the leader computes with (layout.py),
    # agrees bit for bit with the distributed one
    sim = simulate(capture(cl.model, tuple(x.shape)), plan, x)
    assert torch.equal(y, sim)
    d = timings.to_dict()
    assert len(d["stages"]) == 4 and d["total_s"] > 0
    # every device reports; device 2 computed in stages 0 and 1, not in the head
    dev2 = [s["devices"][2] for s in d["stages"]]
    assert dev2[0]["compute_s"] > 0 and dev2[1]["compute_s"] > 0 and dev2[2]["compute_s"] == 0
    # the timeline: one clock on one host; per device, stages follow each other, compute begins
    # once the stage has begun and ends within the inference as the leader timed it
    assert dev2[2]["ready_s"] is None
    for dev in range(3):
        rows = [s["devices"][dev] for s in d["stages"]]
        starts = [r["start_s"] for r in rows]
        assert all(-0.5 < t < d["total_s"] for t in starts) and starts == sorted(starts)
        for r in rows:
            if r["ready_s"] is not None:
                assert r["start_s"] <= r["ready_s"] and r["ready_s"] + r["compute_s"] <= d["total_s"] + 1e-3


def test_the_session_computes_in_the_devices_layout_and_leaves_the_users_model_alone(cluster):
    cl, model = cluster
    mine = [p for p in model.parameters() if p.dim() == 4]
    used = [p for p in cl.model.parameters() if p.dim() == 4]
    assert mine and all(p.is_contiguous() for p in mine)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in used)
    assert any(not p.is_contiguous() for p in used)
    assert cl.model_hash == model_hash(model)  # the hash is of the values, whatever their layout
    x = torch.randn(1, 1, 28, 28)
    assert model.features(x).view(1, -1).shape[1] > 0  # the user's own forward still gives NCHW maps


def test_hand_made_gather_plan_with_linear_split(cluster):
    cl, model = cluster
    plan = plan_gather(cl.model_hash)
    x = torch.randn(1, 1, 28, 28)
    pid = cl.load_plan(plan)
    for _ in range(3):  # several inferences on the same plan: tags and ordering stay straight
        y, _ = cl.infer(x, pid)
        with torch.no_grad():
            assert torch.allclose(y, model(x), rtol=1e-4, atol=1e-5)
    x2 = torch.randn(1, 1, 28, 28)
    y2, _ = cl.infer(x2, pid)
    with torch.no_grad():
        assert torch.allclose(y2, model(x2), rtol=1e-4, atol=1e-5)


def test_a_long_session_does_not_grow_the_store(cluster):
    """A server runs one command per request for weeks, and the store lives in the leader's
    memory: commands (and acknowledgements) are deleted once every follower has read them."""
    cl, model = cluster
    x = torch.randn(1, 1, 28, 28)
    pid = cl.load_plan(plan_exchange(cl.model_hash))
    cl.infer(x, pid)
    before = cl.store.num_keys()
    for _ in range(20):
        cl.infer(x, pid)
    cl.ping()
    pid2 = cl.load_plan(plan_gather(cl.model_hash), drop=[pid])  # and plans a stream no longer needs
    y, _ = cl.infer(x, pid2)
    assert cl.store.num_keys() == before
    with torch.no_grad():
        assert torch.allclose(y, model(x), rtol=1e-4, atol=1e-5)
    assert pid not in cl.plans
    with pytest.raises(EdgeweaveError, match="no plan"):
        cl.infer(x, pid)


def test_plan_for_other_weights_is_refused_by_the_leader(cluster):
    cl, _ = cluster
    with pytest.raises(EdgeweaveError, match="made for weights"):
        cl.load_plan(plan_exchange("0" * 64))


def test_plan_for_other_devices_is_refused(cluster):
    cl, _ = cluster
    plan = plan_exchange(cl.model_hash)
    plan.devices = ["leader", "worker2", "worker1"]  # ranks in the wrong order
    with pytest.raises(EdgeweaveError, match="devices"):
        cl.load_plan(plan)
    plan.devices = ["leader", "worker1", "worker2", "worker3"]  # more devices than the cluster
    with pytest.raises(EdgeweaveError, match="devices"):
        cl.load_plan(plan)


def test_follower_refuses_a_local_model_with_another_hash(tmp_path: Path):
    model, spec = small_model()
    other, _ = load_model("small_cnn", in_channels=1, input_size=28)  # fresh random weights
    assert model_hash(other) != model_hash(model)
    ck = save_checkpoint(tmp_path / "other.safetensors", other, spec)
    extra = {"worker1": ["--model", str(ck)]}
    with LocalCluster(1, timeout_s=30, extra_args=extra) as cl:
        with pytest.raises(EdgeweaveError, match=r"'worker1' \(rank 1\) refuses the model"):
            cl.load_model(model, spec)
        pids = cl.pids
    assert not any(_alive(p) for p in pids)


def test_follower_with_the_right_local_model_gets_nothing_shipped(tmp_path: Path):
    model, spec = small_model()
    ck = save_checkpoint(tmp_path / "same.safetensors", model, spec)
    with LocalCluster(1, timeout_s=30, extra_args={"worker1": ["--model", str(ck)]}) as cl:
        assert cl.followers[0].info["model_tag"] == cl.ctl.tag("model", model_hash(model))  # never the hash itself
        cl.load_model(model, spec)
        plan = plan_exchange(cl.model_hash)
        # two devices: put everything of the 3-device plan's device 2 on device 1
        plan = Plan.from_dict(plan.to_dict())
        plan.devices = ["leader", "worker1"]
        plan.stages = [Stage(0, "spatial", STAGE0 + STAGE1, [1, 1, 28, 28], [1, 64, 7, 7],
                             [Assignment(0, (0, 10), (0, 1)), Assignment(1, (0, 28), (1, 7))],
                             [Transfer(0, 1, (0, 28))]),
                       Stage(1, "leader", HEAD, [1, 64, 7, 7], [1, 10], [Assignment(0, (0, 7), (0, 10))],
                             [Transfer(1, 0, (1, 7))])]
        x = torch.randn(1, 1, 28, 28)
        y, _ = cl.infer(x, cl.load_plan(plan))
        with torch.no_grad():
            assert torch.allclose(y, model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_dead_or_silent_follower_is_named_within_the_time_out(how):
    """SIGKILL: the connection drops and the leader names the device at once. SIGSTOP: the
    process lives but never answers, so the time-out fires. Either way nothing is left behind."""
    model, spec = small_model()
    timeout = 4.0
    cl = LocalCluster(2, timeout_s=timeout)
    pids = cl.pids
    try:
        cl.load_model(model, spec)
        pid = cl.load_plan(plan_exchange(cl.model_hash))
        x = torch.randn(1, 1, 28, 28)
        cl.infer(x, pid)
        victim = cl.followers[1].process
        os.kill(victim.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(PeerError) as info:
            cl.infer(x, pid)
        took = time.monotonic() - t0
        assert "'worker2' (rank 2)" in str(info.value)
        assert took < timeout + 3.0
        if how == "kill":
            assert "exited" in str(info.value) or "closed" in str(info.value)
        else:
            assert "did not answer" in str(info.value)
        with pytest.raises(EdgeweaveError, match="unusable"):
            cl.infer(x, pid)
        if how == "kill":
            # recovery hook: a new generation with the survivors runs a 2-device plan exactly
            cl.regroup()
            assert cl.names == ["leader", "worker1"] and cl.gen == 1
            plan = plan_exchange(cl.model_hash)
            plan.devices = ["leader", "worker1"]
            for st in plan.stages:  # device 2's work and transfers go to device 1
                st.assignments = [Assignment(a.device, a.in_rows, a.out_rows) for a in st.assignments if a.device < 2]
            plan.stages[0].assignments = [Assignment(0, (0, 4), (0, 1)), Assignment(1, (0, 28), (1, 14))]
            plan.stages[0].transfers = [Transfer(0, 1, (0, 28))]
            plan.stages[1].assignments = [Assignment(1, (0, 14), (0, 7))]
            plan.stages[1].transfers = [Transfer(0, 1, (0, 1))]
            plan.stages[2].transfers = [Transfer(1, 0, (0, 7))]
            y, _ = cl.infer(x, cl.load_plan(plan))
            with torch.no_grad():
                assert torch.allclose(y, model(x), rtol=1e-4, atol=1e-5)
    finally:
        cl.close()
        shutil.rmtree(cl.log_dir, ignore_errors=True)  # kept by close() after a failure
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_inconsistent_plans_are_refused_before_anything_runs(cluster):
    cl, model = cluster
    plan = plan_exchange(cl.model_hash)
    plan.stages[1].transfers = [Transfer(0, 1, (0, 2))]  # the leader holds only row 0
    with pytest.raises(EdgeweaveError, match="holds only"):
        cl.load_plan(plan)
    plan = plan_exchange(cl.model_hash)
    plan.stages[2].transfers = plan.stages[2].transfers[:1]  # the leader never gets rows 4..7
    with pytest.raises(EdgeweaveError, match="holds only"):
        cl.load_plan(plan)
    # the cluster is still usable, and a wrong input shape is caught before followers wait
    pid = cl.load_plan(plan_exchange(cl.model_hash))
    with pytest.raises(EdgeweaveError, match="input shape"):
        cl.infer(torch.randn(1, 1, 32, 32), pid)
    x = torch.randn(1, 1, 28, 28)
    y, _ = cl.infer(x, pid)
    with torch.no_grad():
        assert torch.allclose(y, model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_follower_that_joins_later_gets_a_rank_in_the_next_generation():
    """Design for devices that come and go: a board started after the leader registers, waits,
    and joins the next generation; the model is shipped to it and a 3-device plan runs exactly."""
    import subprocess
    import sys

    model, spec = small_model()
    with LocalCluster(1, timeout_s=30) as cl:
        cl.load_model(model, spec)
        late = subprocess.Popen([sys.executable, "-m", "edgeweave", "worker", "--leader", f"127.0.0.1:{cl.port}",
                                 "--name", "worker2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OMP_NUM_THREADS="1", EDGEWEAVE_KEY_FILE=cl.key_file))
        try:
            cl.regroup(join=["worker2"])
            assert cl.names == ["leader", "worker1", "worker2"] and cl.gen == 1
            x = torch.randn(1, 1, 28, 28)
            y, _ = cl.infer(x, cl.load_plan(plan_exchange(cl.model_hash)))
            with torch.no_grad():
                assert torch.allclose(y, model(x), rtol=1e-4, atol=1e-5)
        finally:
            cl.close()
            try:
                assert late.wait(timeout=20) == 0  # the shutdown reaches the newcomer too
            finally:
                if late.poll() is None:
                    late.kill()
                    late.wait()
