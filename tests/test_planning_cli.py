"""`edgeweave plan` and the cost model's transfer schedule."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from edgeweave.cli import app
from edgeweave.errors import EdgeweaveError
from edgeweave.planning.cost import schedule_transfers, transfer_s
from edgeweave.planning.plan import Plan
from edgeweave.profiling.profile import Cluster, DeviceProfile

torch.set_num_threads(1)


def test_plan_command_prints_json_plan(tmp_path) -> None:
    res = CliRunner().invoke(app, ["plan", "--model", "small_cnn", "--workers", "2", "--input-size", "28",
                                   "--in-channels", "1", "--batch", "2", "--fusion", "none", "--mode", "gather",
                                   "--json", "-"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["devices"] == ["leader", "worker1", "worker2"]
    assert out["plan"]["input_shape"] == [2, 1, 28, 28]
    assert out["predicted_s"] > 0 and out["mode"] == "gather" and out["fusion"] == "none"
    plan = Plan.from_dict(out["plan"])
    assert any(s.kind == "spatial" for s in plan.stages)


def test_plan_command_reads_a_cluster_file(tmp_path) -> None:
    cl = Cluster([DeviceProfile("pi4", a=2e-10, bandwidth_bps=1e8), DeviceProfile("pi3", a=4e-10, bandwidth_bps=1e8)])
    path = tmp_path / "cluster.json"
    cl.save(path)
    target = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", "--model", "cifar_resnet18", "--cluster", str(path), "--input-size", "32",
                                   "--partition", "ocbp", "--json", str(target)])
    assert res.exit_code == 0, res.output
    out = json.loads(target.read_text())
    assert out["devices"] == ["pi4", "pi3"] and out["partition"] == "ocbp"
    assert out["strip_order"] == ["pi4", "pi3"]


def test_plan_command_names_the_strip_order_when_it_is_not_device_order(tmp_path) -> None:
    cl = Cluster([DeviceProfile(n, a=2e-10, latency_s=1e-4, bandwidth_bps=bw)
                  for n, bw in [("lead", 1e9), ("slow", 1e8), ("f1", 1e9), ("f2", 1e9)]])
    path = tmp_path / "cluster.json"
    cl.save(path)
    target = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", "--model", "vgg11", "--cluster", str(path), "--input-size", "64",
                                   "--in-channels", "1", "--fusion", "none", "--json", str(target)])
    assert res.exit_code == 0, res.output
    order = json.loads(target.read_text())["strip_order"]
    assert order[0] == "slow" or order[-1] == "slow", order
    assert "strips top to bottom: " + ", ".join(order) in " ".join(res.output.split())


def test_plan_command_shows_each_device_s_memory_and_refuses_devices_too_small(tmp_path) -> None:
    mb = 1 << 20
    roomy = Cluster([DeviceProfile("pi4", a=2e-10, bandwidth_bps=1e8, memory_bytes=4096 * mb),
                     DeviceProfile("pi3", a=4e-10, bandwidth_bps=1e8, memory_bytes=2048 * mb)])
    path = tmp_path / "cluster.json"
    roomy.save(path)
    res = CliRunner().invoke(app, ["plan", "--model", "cifar_resnet18", "--cluster", str(path), "--input-size", "32",
                                   "--json", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    assert "memory (MB; weights + activations + runtime = total / limit): pi4" in " ".join(res.output.split())
    mem = json.loads((tmp_path / "plan.json").read_text())["memory"]
    assert mem["pi3"]["limit"] == 2048 * mb and 0 < mem["pi3"]["total"] < mem["pi3"]["limit"]
    small = Cluster([roomy.devices[0], DeviceProfile("pi3", a=4e-10, bandwidth_bps=1e8, memory_bytes=64 * mb)])
    small.save(path)
    res = CliRunner().invoke(app, ["plan", "--model", "cifar_resnet18", "--cluster", str(path), "--input-size", "32"])
    assert isinstance(res.exception, EdgeweaveError)  # the CLI's main() prints it on one line, exit 2
    assert "pi3 needs" in str(res.exception) and "it has 64 MB" in str(res.exception)
    # a third board with room for the process and the model's layout copy only: left out, said so
    from edgeweave.models import build_model
    from edgeweave.planning.memory import RUNTIME_BYTES

    layout = sum(t.numel() * t.element_size() for t in build_model("cifar_resnet18").parameters() if t.dim() == 4)
    Cluster([*roomy.devices, DeviceProfile("zero", a=2e-10, bandwidth_bps=1e8,
                                           memory_bytes=RUNTIME_BYTES + layout + 2 * mb)]).save(path)
    res = CliRunner().invoke(app, ["plan", "--model", "cifar_resnet18", "--cluster", str(path), "--input-size", "32",
                                   "--json", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    assert "left out: zero (too little memory for any share" in " ".join(res.output.split())
    out = json.loads((tmp_path / "plan.json").read_text())
    assert out["plan"]["meta"]["left_out"] == ["zero"] and out["memory"]["zero"]["activations"] == 0


def test_plan_command_needs_exactly_one_cluster_source() -> None:
    res = CliRunner().invoke(app, ["plan", "--model", "small_cnn"])
    assert isinstance(res.exception, EdgeweaveError)
    res = CliRunner().invoke(app, ["plan", "--model", "small_cnn", "--workers", "1", "--partition", "nope",
                                   "--in-channels", "1", "--input-size", "28"])
    assert isinstance(res.exception, EdgeweaveError) and "partitioner" in str(res.exception)


def test_leader_link_is_the_bottleneck_of_a_gather() -> None:
    devs = [DeviceProfile(f"d{i}", bandwidth_bps=8e6, latency_s=0.0) for i in range(4)]  # 1 MB/s
    # three followers send 1 MB each to the leader: its downlink serialises them
    ready, end = schedule_transfers([(d, 0, 1e6, False) for d in (1, 2, 3)], devs)
    assert end == pytest.approx(3.0) and ready[0] == pytest.approx(3.0)
    # followers exchanging with neighbours use disjoint links: in parallel
    ready, end = schedule_transfers([(1, 2, 1e6, False), (3, 0, 1e6, False)], devs)
    assert end == pytest.approx(1.0)
    # forwarding gathered rows waits for them
    ready, end = schedule_transfers([(1, 0, 1e6, False), (0, 2, 1e6, True)], devs)
    assert ready[2] == pytest.approx(2.0)
    assert transfer_s(1e6, devs[0], DeviceProfile("slow", bandwidth_bps=4e6, latency_s=0.5)) == pytest.approx(2.5)
    # a fast leader sending to followers on slower links serves them side by side: its uplink
    # is busy 1 s per MB, each transfer lasts 4 s (the follower's link)
    slow = [devs[0]] + [DeviceProfile(f"s{i}", bandwidth_bps=2e6, latency_s=0.0) for i in (1, 2, 3)]
    ready, end = schedule_transfers([(0, d, 1e6, False) for d in (1, 2, 3)], slow)
    assert [ready[d] for d in (1, 2, 3)] == pytest.approx([4.0, 5.0, 6.0]) and end == pytest.approx(6.0)
    # two transfers into one slow link still queue behind each other
    ready, end = schedule_transfers([(0, 1, 1e6, False), (2, 1, 1e6, False)], slow)
    assert ready[1] == pytest.approx(8.0)
