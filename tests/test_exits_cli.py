"""The exits / distill / bench exits commands end to end on tiny models and synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from edgeweave.checkpoint import ModelSpec, save_checkpoint
from edgeweave.cli import app
from edgeweave.models import build_model

torch.set_num_threads(1)
KW = '{"width": 4, "head_hidden": 8}'
runner = CliRunner()


def _ok(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads(r.stdout)


def test_exits_train_calibrate_predict(tmp_path):
    out = tmp_path / "run"
    res = _ok(["exits", "train", "--dataset", "synthetic", "--epochs", "1", "--model-kwargs", KW, "--batch-size", "64",
               "--out", str(out), "--threads", "1", "--json", "-"])
    assert len(res["exit_accuracies"]) == 3 and res["strategy"] == "sync"
    ckpt = out / "model.safetensors"
    cal = _ok(["exits", "calibrate", str(ckpt), "--dataset", "synthetic", "--limit", "30",
               "--proportions", "0.5,0.3;0.9,0.05", "--json", "-"])
    names = [p["name"] for p in cal["operating_points"]]
    assert names == ["exit0", "exit1", "exit2", "p=0.50/0.30", "p=0.90/0.05"]
    slowest = max(p["p95_ms"] for p in cal["operating_points"])
    pred = _ok(["exits", "predict", str(ckpt), "--dataset", "synthetic", "--latency-budget-ms", str(slowest * 2),
                "--count", "3", "--json", "-"])
    assert pred["satisfied"] and len(pred["labels"]) == 3
    pred = _ok(["exits", "predict", str(ckpt), "--dataset", "synthetic", "--latency-budget-ms", "0.00001", "--json", "-"])
    assert not pred["satisfied"] and "no operating point meets" in pred["message"]


def test_unsatisfiable_strict_request_is_a_one_line_error(tmp_path):
    torch.manual_seed(0)
    m = build_model("multi_exit_small", num_classes=10, in_channels=3, width=4, head_hidden=8)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", m, ModelSpec("multi_exit_small", 10, 3, (32, 32), {"width": 4, "head_hidden": 8}))
    r = subprocess.run([sys.executable, "-m", "edgeweave", "exits", "predict", str(ckpt), "--dataset", "synthetic",
                        "--min-accuracy", "0.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exits calibrate" in r.stderr  # no operating points yet


def test_distill_command(tmp_path):
    torch.manual_seed(0)
    t = build_model("small_cnn", num_classes=10, in_channels=3, width=2)
    tpath = save_checkpoint(tmp_path / "t.safetensors", t, ModelSpec("small_cnn", 10, 3, (32, 32), {"width": 2}))
    res = _ok(["distill", "--teacher", str(tpath), "--student", "small_cnn", "--model-kwargs", '{"width": 2}',
               "--dataset", "synthetic", "--distance", "ws", "--epochs", "1", "--out", str(tmp_path / "s"), "--json", "-"])
    assert res["distance"] == "ws" and res["checkpoint"].endswith("best.safetensors")


@pytest.mark.slow
def test_bench_exits_tiny(tmp_path):
    """The whole benchmark pipeline on a tiny configuration: keys, files, and sane values."""
    from edgeweave.bench.exits import ExitsBenchConfig, run_exits_bench

    cfg = ExitsBenchConfig(dataset="synthetic", dataset_options={"input_size": 28, "in_channels": 1, "samples": 256},
                           teacher="small_cnn", teacher_kwargs={"width": 4}, student_kwargs={"width": 4, "head_hidden": 8},
                           teacher_epochs=1, student_epochs=1, seeds=2, distances=("kl", "ws"),
                           strategies=("sync", "async_back"), budgets=3, requests_per_budget=5, calib_limit=24, test_limit=24)
    r = run_exits_bench(cfg, out_dir=tmp_path, progress=False)
    s = r["summary"]
    for k in ("teacher_accuracy", "full_accuracy", "speedup_at_1pct_loss", "speedup_vs_student", "kd_gain", "budget_violations"):
        assert k in s
    assert set(s["kd_gain"]) == {"kl", "ws"} and len(r["kd_gain"]["kl"]["per_seed"]) == 2
    assert 0 <= s["budget_violations"] <= 1
    assert s["speedup_vs_student"] >= 1.0  # the full-depth point itself is within tolerance
    assert {(x["strategy"], x["kd"]) for x in r["runs"]} >= {("sync", None), ("sync", "kl"), ("async_back", None)}
    assert (tmp_path / "exits_synthetic.png").stat().st_size > 1000
    assert (tmp_path / "exits_synthetic_points.csv").is_file()
