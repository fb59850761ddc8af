"""`edgeweave demo`: its pieces (fast: the summary and report, the plan, the plots, the command
around stubbed steps; slow: the exits step on a tiny budget of epochs, the fallback without the
testbed), the emulated-cluster step on a small model (testbed), and the whole command (slow, opt-in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeweave import demo as D
from edgeweave.runtime import demo as RD
from edgeweave.testbed import emulation_support

_OK, _WHY = emulation_support()


def _steps(emulated: bool) -> dict:
    train = {"model": "small_resnet8", "kwargs": {"width": 16}, "accuracy": 0.988, "val_accuracy": 0.982, "epochs": 10,
             "seconds": 90.0, "checkpoint": "x"}
    exits = {"teacher_accuracy": 0.988, "teacher_mean_ms": 1.9, "student_accuracy": 0.98, "student_full_mean_ms": 1.1,
             "exit_accuracies": [0.98, 0.982, 0.98], "epochs": 6, "operating_points": 19, "test_samples": 500,
             "speedup_at_1pct_loss": 3.1, "speedup_point": "forced exit 0", "budget_violations": 0.01,
             "budget_requests": 300, "budget_served": 250, "budget_unsatisfied": 50, "plot": "exits.png"}
    if emulated:
        dist = {"emulated": True, "model": "torchvision:vgg16", "input_size": 224, "devices": ["leader", "f1", "f2", "f3"],
                "cpu": 0.25, "bandwidth": "1000mbit", "partition": "optimal", "fusion": "auto", "mode": "exchange",
                "backends": {"leader": "ort", "f1": "ort", "f2": "ort", "f3": "ort"}, "predicted_s": 0.45,
                "latency_s": 0.8, "latencies_s": [0.8, 0.7, 0.9], "single_device_torch_s": 2.8,
                "single_device_torch_times_s": [2.8, 2.9, 2.7], "single_device_ort_s": 2.1,
                "single_device_ort_times_s": [2.1, 2.0, 2.2], "speedup": 3.5, "speedup_over_ort": 2.6, "rel_err": 2e-6,
                "timeline": "timeline.png"}
    else:
        dist = {"emulated": False, "reason": "not root", "model": "torchvision:resnet18", "devices": ["leader", "worker1"],
                "rel_err": 1e-6}
    return {"train": train, "exits": exits, "distributed": dist}


@pytest.mark.parametrize("emulated", [True, False])
def test_headline_has_the_contract_keys_and_the_report_says_what_ran(emulated):
    steps = _steps(emulated)
    h = D.headline(steps)
    for k in ("mnist_accuracy", "teacher_accuracy", "distributed_speedup", "distributed_speedup_over_ort",
              "distributed_rel_err", "exits_speedup_at_1pt", "budget_violations"):
        assert k in h and k in D.HEADLINE
    assert h["mnist_accuracy"] == 0.988 and h["teacher_accuracy"] >= h["student_accuracy"]
    assert h["distributed_rel_err"] == steps["distributed"]["rel_err"]
    if emulated:
        assert h["distributed_speedup"] == 3.5 and h["distributed_speedup_over_ort"] == 2.6
    else:  # no cluster, no speedup claimed
        assert h["distributed_speedup"] is None and h["distributed_speedup_over_ort"] is None
    s = {**h, "seconds": 200.0, "steps": steps,
         "machine_before": {"time_utc": "t", "cpus": 2, "platform": "p", "torch": "2", "loadavg": [0.1, 0.2, 0.3]},
         "machine_after": {"loadavg": [0.5, 0.4, 0.3]}}
    md = D.report(s)
    assert md.startswith("# edgeweave demo") and "`budget_violations`" in md and "load average" in md
    if emulated:
        assert "untrained" in md and "ONNX Runtime" in md and "timeline.png" in md and "3.50x" in md
    else:
        assert "cannot be emulated" in md and "No speedup is claimed" in md and "n/a" in md


def test_the_demo_plan_splits_vgg16_over_the_four_nominal_devices():
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.runtime.run import load_for_run

    cfg = RD.TestbedDemoConfig()
    cl = RD.nominal_cluster(cfg.names, cfg.cpu, 1e9)
    assert [d.name for d in cl.devices] == ["leader", "f1", "f2", "f3"]
    assert cl.devices[0].a == pytest.approx(RD.NOMINAL_A / cfg.cpu)  # a nominal full core slowed by the cap
    model, _ = load_for_run("vgg16", 224)
    gm = capture(model, (1, 3, 224, 224))
    plan = make_plan(gm, cl, partition=cfg.partition, fusion=cfg.fusion, mode=cfg.mode, backend="torch")
    one = make_plan(gm, RD.nominal_cluster(["leader"], cfg.cpu, 1e9), backend="torch")
    spatial = [s for s in plan.stages if s.kind == "spatial"]
    assert spatial and all(len([a for a in s.assignments if a.out_rows[1] > a.out_rows[0]]) == 4 for s in spatial)
    assert plan.predicted_s < one.predicted_s / 2


def test_plot_latencies_writes_a_png(tmp_path):
    res = _steps(True)["distributed"]
    path = RD.plot_latencies(res, tmp_path / "d.png")
    assert Path(path).stat().st_size > 1000


@pytest.mark.slow  # training (one epoch each), 20-40 s
def test_exits_step_on_a_tiny_budget_of_epochs(tmp_path):
    from edgeweave.exits.demo import exits_demo_step

    threads = torch.get_num_threads()

    res = exits_demo_step(tmp_path, teacher_path=tmp_path / "none.safetensors", epochs=1, teacher_epochs=1,
                          calibration_samples=40, test_samples=60, budgets=3, requests_per_budget=5)
    assert torch.get_num_threads() == threads
    for k in ("teacher_accuracy", "student_accuracy", "speedup_at_1pct_loss", "budget_violations", "exit_accuracies"):
        assert k in res
    assert 0 <= res["budget_violations"] <= 1 and res["budget_requests"] == 15
    assert res["test_samples"] == 60 and len(res["exit_accuracies"]) == 3
    assert Path(res["plot"]).is_file() and Path(res["checkpoint"]).is_file()
    assert [a["satisfied"] for a in res["requests"]][-1] is False  # the impossible budget says so


@pytest.mark.slow  # real worker processes
def test_without_the_testbed_the_step_shows_exactness_only(tmp_path, monkeypatch):
    from edgeweave import testbed

    monkeypatch.setattr(testbed, "emulation_support", lambda: (False, "not root"))
    res = D.distributed_step(tmp_path, fallback={"workers": 1, "model_name": "cifar_resnet18", "size": 32, "repeat": 1})
    assert res["emulated"] is False and res["reason"] == "not root"
    assert res["rel_err"] <= 1e-4 and "speedup" not in res
    h = D.headline({"distributed": res})
    assert h["distributed_speedup"] is None and h["distributed_rel_err"] == res["rel_err"]


def test_demo_help_promises_what_it_does():
    out = subprocess.run([sys.executable, "-m", "edgeweave", "demo", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for words in ("5,000 real MNIST digits", "multi-exit student", "latency budgets", "As root on Linux", "untrained VGG16",
                  "ONNX Runtime", "cannot be emulated", "summary.json", "report.md"):
        assert words in text, words


@pytest.mark.testbed
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not _OK, reason=f"the emulated testbed needs root, iproute2 and cgroup v1 ({_WHY})")
def test_testbed_step_small_model(tmp_path):
    """A small model over leader + 1 follower (its own prefix and subnet): exact, both baselines
    measured, the timeline drawn, nothing left behind."""
    from edgeweave.testbed import leftovers

    cfg = RD.TestbedDemoConfig(model="resnet18", size=64, followers=1, cpu=0.5, rounds=2, prefix="ewg-",
                               subnet="10.77.51.0/24", timeout_s=240)
    res = RD.testbed_demo_step(tmp_path, cfg)
    assert res["rel_err"] <= 1e-4 and res["devices"] == ["leader", "f1"]
    assert len(res["latencies_s"]) == len(res["single_device_torch_times_s"]) == len(res["single_device_ort_times_s"]) == 2
    assert res["speedup"] > 0 and res["speedup_over_ort"] > 0
    assert Path(res["timeline"]).stat().st_size > 1000
    assert not res["testbed_left"] and not any(leftovers("ewg-").values())


def test_demo_command_writes_summary_report_and_json(tmp_path, monkeypatch):
    """The command around the steps (stubbed here): the summary table, summary.json, report.md and --json."""
    from typer.testing import CliRunner

    from edgeweave.cli import app

    canned = _steps(True)
    monkeypatch.setattr(D, "steps", lambda: [(k, (lambda out, k=k: dict(canned[k]))) for k in ("train", "exits", "distributed")])
    js = tmp_path / "out.json"
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--json", str(js)])
    assert r.exit_code == 0, r.output
    s = json.loads(js.read_text())
    assert s["distributed_speedup"] == 3.5 and s["budget_violations"] == 0.01 and s["emulated"] is True
    assert s["steps"]["train"]["epochs"] == 10 and len(s["machine_before"]["loadavg"]) == 3
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["mnist_accuracy"] == 0.988
    assert "## 3. Distributed inference" in (tmp_path / "demo" / "report.md").read_text()


FULL = os.environ.get("EDGEWEAVE_TEST_FULL_DEMO") == "1"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not FULL, reason="the whole demo took 6 minutes on a 2-core machine at load average 8 (longer on a "
                    "busier one), too long for the suite: set EDGEWEAVE_TEST_FULL_DEMO=1 to run it (its pieces are tested above)")
def test_full_demo_meets_its_targets(tmp_path):
    """The whole command as a user runs it: the summary's keys and targets."""
    js = tmp_path / "summary.json"
    out = subprocess.run([sys.executable, "-m", "edgeweave", "demo", "--out", str(tmp_path / "demo"), "--json", str(js)],
                         capture_output=True, text=True, timeout=1400)
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads(js.read_text())
    assert s["mnist_accuracy"] >= 0.95 and s["teacher_accuracy"] >= s["student_accuracy"]
    assert s["distributed_rel_err"] <= 1e-4 and s["exits_speedup_at_1pt"] > 1
    assert s["budget_violations"] is not None and s["budget_violations"] < 0.1  # < 0.05 is the target on an idle machine
    if s["emulated"]:
        assert s["distributed_speedup"] > 1.5 and s["distributed_speedup_over_ort"] > 1  # >= 2 on an idle machine
    for f in ("report.md", "summary.json", "exits.png"):
        assert (tmp_path / "demo" / f).is_file()
