"""What a plan asks of each device's memory (planning/memory.py), and memory as a hard limit
for the planner."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.models import build_model
from edgeweave.planning.graph import capture
from edgeweave.planning.halo import is_empty
from edgeweave.planning.memory import RUNTIME_BYTES, node_weight_bytes, plan_memory
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster, DeviceProfile
from edgeweave import resident

MB = 1 << 20


@functools.lru_cache(maxsize=None)
def _vgg():
    torch.manual_seed(0)
    return capture(build_model("vgg11", num_classes=10).eval(), (1, 3, 64, 64))


def _model_bytes(gm) -> int:
    return sum(t.numel() * t.element_size() for t in (*gm.parameters(), *gm.buffers()))


def _with_limits(k: int, follower_bytes: int) -> Cluster:
    c = Cluster.uniform(k)
    return Cluster([c.devices[0]] + [replace(d, memory_bytes=follower_bytes) for d in c.devices[1:]])


def test_the_leader_keeps_the_model_and_a_strip_holds_its_layers_whole():
    gm = _vgg()
    plan = make_plan(gm, Cluster.uniform(4), split="rows", backend="torch")
    mem = plan_memory(gm, plan)
    assert mem[0].weights == _model_bytes(gm)
    convs = sum(node_weight_bytes(gm, n) for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), torch.nn.Conv2d))
    for d in range(1, 4):
        rows_everywhere = all(st.assignment(d) and st.assignment(d).out_rows[1] > st.assignment(d).out_rows[0]
                              for st in plan.stages if st.kind == "spatial")
        if rows_everywhere:  # every filter of every convolution, whatever its rows
            assert mem[d].weights >= convs
        assert mem[d].weights < mem[0].weights and mem[d].runtime == RUNTIME_BYTES
        assert mem[d].total == mem[d].weights + mem[d].activations + mem[d].runtime
    assert plan.meta["memory"] == [m.to_dict() for m in mem]
    ort_plan = make_plan(gm, Cluster.uniform(4), split="rows", backend="ort")
    ort = plan_memory(gm, ort_plan)
    assert ort_plan.meta["memory"] == [m.to_dict() for m in ort]  # what the planner checked counts the copies
    same_on_torch = plan_memory(gm, replace(ort_plan, backends=["torch"] * 4))
    for d in range(1, 4):  # a session copies what it compiles: every filter of the device's strips
        strips = [st for st in ort_plan.stages if st.kind == "spatial" and not is_empty(st.assignment(d).out_rows)]
        assert ort[d].weights >= same_on_torch[d].weights + (convs if len(strips) == len(
            [st for st in ort_plan.stages if st.kind == "spatial"]) else 1)


def test_channel_slices_hold_a_share_of_the_weights():
    gm = _vgg()
    p_rows = make_plan(gm, Cluster.uniform(5), split="rows")
    p_chans = make_plan(gm, Cluster.uniform(5), split="channels")
    assert not p_rows.meta["leader_only"]  # the reference plan is a real split, not the leader alone
    assert any(st.split == "channels" for st in p_chans.stages)
    rows, chans = plan_memory(gm, p_rows), plan_memory(gm, p_chans)
    assert max(m.weights for m in chans[1:]) < max(m.weights for m in rows[1:])


def test_a_device_without_work_holds_nothing():
    def skip_device_1(costs, total, capabilities=None):
        counts = [0] * len(costs)
        counts[0], counts[-1] = total // 2, total - total // 2
        return counts

    gm = _vgg()
    plan = make_plan(gm, Cluster.uniform(3), partition=skip_device_1, split="rows")
    mem = plan_memory(gm, plan, runtime=[0, 123, 0])
    layout = sum(t.numel() * t.element_size() for t in gm.parameters() if t.dim() == 4)
    # the model's 4-D weights in the devices' layout, nothing of any stage
    assert mem[1].weights == layout and mem[1].activations == 0 and mem[1].total == 123 + layout
    assert mem[2].weights > layout


def test_memory_is_a_hard_limit_the_planner_plans_around_or_names():
    gm = _vgg()
    rows = make_plan(gm, Cluster.uniform(5), split="rows")
    chans = make_plan(gm, Cluster.uniform(5), split="channels")
    need_rows = max(m["total"] for m in rows.meta["memory"][1:])
    need_chans = max(m["total"] for m in chans.meta["memory"][1:])
    assert need_chans < need_rows
    between = (need_rows + need_chans) // 2
    fit = make_plan(gm, _with_limits(5, between), split="rows")
    assert fit.meta.get("memory_bound") and max(m["total"] for m in fit.meta["memory"][1:]) <= between
    assert any(st.split == "channels" for st in fit.stages)
    with pytest.raises(EdgeweaveError, match=r"no plan fits the devices' memory; the closest needs: worker\d needs \d+ MB"):
        make_plan(gm, _with_limits(5, RUNTIME_BYTES), split="rows")
    # unknown limits (0) are not checked
    assert not make_plan(gm, _with_limits(5, 0), split="rows").meta.get("memory_bound")


def test_a_follower_too_small_for_any_share_is_left_out_and_the_plan_stays_exact():
    from edgeweave.engine.simulate import simulate

    gm = _vgg()
    layout = sum(t.numel() * t.element_size() for t in gm.parameters() if t.dim() == 4)
    base = Cluster.uniform(4)
    # room for the process and the model's layout copy, not for any share of a stage
    small = RUNTIME_BYTES + layout + MB
    c = Cluster([*base.devices[:2], replace(base.devices[2], memory_bytes=small), base.devices[3]])
    for split in ("rows", "auto"):
        plan = make_plan(gm, c, split=split)
        name = c.devices[2].name
        assert plan.meta["left_out"] == [name] and plan.meta["memory_bound"], plan.meta.get("left_out")
        m = plan.meta["memory"][2]
        assert m["activations"] == 0 and m["weights"] == layout and m["total"] <= small
        for st in plan.stages:  # no rows, channels or features of any stage
            a = st.assignment(2)
            assert a is None or is_empty(a.out_rows), (st.index, a)
        # the other three share the work, and the plan computes what the model computes
        assert sum(1 for d in (1, 3) if plan.meta["memory"][d]["activations"] > 0) == 2
        x = torch.randn(1, 3, 64, 64)
        ref = gm(x)
        assert ref.abs().max() > 0 and ref.std() > 0  # not a degenerate reference
        out = simulate(gm, plan, x)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (out - ref).abs().max()
    # too small even with no work: named, with what it needs
    tiny = Cluster([*base.devices[:2], replace(base.devices[2], memory_bytes=RUNTIME_BYTES), base.devices[3]])
    with pytest.raises(EdgeweaveError, match=rf"{c.devices[2].name} needs \d+ MB \(with no work\)"):
        make_plan(gm, tiny, split="rows")
    # the leader keeps the whole model: it is never left out
    lead = Cluster([replace(base.devices[0], memory_bytes=RUNTIME_BYTES), *base.devices[1:]])
    with pytest.raises(EdgeweaveError, match=r"needs \d+ MB \(the leader keeps the whole model\)"):
        make_plan(gm, lead, split="rows")


def test_a_profile_says_its_memory_and_refuses_a_negative_one():
    assert DeviceProfile.from_dict({"name": "w", "memory_bytes": 1 << 30}).memory_bytes == 1 << 30
    with pytest.raises(EdgeweaveError, match="memory_bytes"):
        DeviceProfile.from_dict({"name": "w", "memory_bytes": -1})


def test_a_process_knows_its_own_memory_and_its_limit():
    facts = resident.facts()
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < facts["memory_bytes"] <= total
    assert 10 * MB < facts["runtime_bytes"] < facts["memory_bytes"]  # torch alone holds more than 10 MB


def test_a_follower_s_measured_memory_fills_what_its_profile_leaves_open():
    from edgeweave.runtime.leader import _with_memory

    facts = {"memory_bytes": 1 << 30, "runtime_bytes": 300 * MB}
    got = _with_memory({"name": "w"}, facts)
    assert got.memory_bytes == 1 << 30 and got.meta["runtime_bytes"] == 300 * MB
    given = _with_memory({"name": "w", "memory_bytes": 512 * MB, "meta": {"runtime_bytes": 1}}, facts)
    assert given.memory_bytes == 512 * MB and given.meta["runtime_bytes"] == 1  # the profile wins
    assert _with_memory({"name": "w"}, "garbage").memory_bytes == 0
