"""`edgeweave serve` with a multi-exit checkpoint: each request at the operating point it asks for.

The checkpoint is calibrated for real (``exits calibrate``'s library call on generated data);
every answer is compared with ``early_exit`` run directly at the point the policy picks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from edgeweave.checkpoint import ModelSpec, save_checkpoint
from edgeweave.data import load_dataset
from edgeweave.exits.inference import early_exit
from edgeweave.exits.ondemand import OnDemandModel, calibrate_checkpoint
from edgeweave.exits.policy import choose
from edgeweave.models import build_model
from edgeweave.serving.app import create_app
from edgeweave.serving.ondemand import OnDemandServer
from edgeweave.serving.preprocess import NORMALIZATIONS, encode_raw
from edgeweave.serving.server import ServerLimits
from _serving_helpers import png, scrape, serve_command

RAW = {"content-type": "application/octet-stream"}
KW = {"width": 4, "head_hidden": 8}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    bundle = load_dataset("synthetic", input_size=16, in_channels=1, num_classes=4, samples=160, noise=1.0)
    m = build_model("multi_exit_small", num_classes=4, in_channels=1, **KW)
    path = save_checkpoint(tmp_path_factory.mktemp("od") / "m.safetensors", m,
                           ModelSpec("multi_exit_small", 4, 1, (16, 16), KW, bundle.classes))
    calibrate_checkpoint(path, bundle, limit=20)
    return path


@pytest.fixture()
def served(ckpt):
    od = OnDemandModel.load(ckpt)
    od.load_tracker = None  # the point a request gets must not move with this machine's load here
    server = OnDemandServer(od, od.model_spec, "m", ServerLimits(max_waiting=2, wait_timeout_s=0.5))
    server.warm_up()
    with TestClient(create_app(server, NORMALIZATIONS["none"])) as client:
        yield client, server, od


def _expected(od: OnDemandModel, x: torch.Tensor, **slo):
    point = choose(od.points, latency_budget_ms=slo.get("budget_ms"), min_accuracy=slo.get("min_accuracy")).point
    return point, early_exit(od.model, x, point.thresholds, voting_weights=point.voting_weights or None,
                             confidence=point.confidence)


def test_each_request_runs_at_the_point_it_asks_for(served):
    client, server, od = served
    fastest = min(od.points, key=lambda p: p.p95_ms)
    accurate = max(od.points, key=lambda p: p.accuracy)
    asks = [{}, {"budget_ms": fastest.p95_ms * 1.01}, {"budget_ms": 1e-6}, {"min_accuracy": accurate.accuracy},
            {"min_accuracy": 1.0}]
    g = torch.Generator().manual_seed(3)
    unmet = 0
    for slo in asks * 2:
        x = torch.randn(1, 1, 16, 16, generator=g)
        q = "&".join(f"{k}={v!r}" for k, v in slo.items())
        r = client.post(f"/v1/infer?logits=true&top=2&{q}", content=encode_raw(x), headers=RAW)
        assert r.status_code == 200, r.text
        out = r.json()
        point, ref = _expected(od, x, **slo)
        assert out["point"] == point.name and out["exit"] == int(ref.exit_index[0]) and out["exits"] == 3
        assert out["prediction"]["class"] == int(ref.pred[0]) and out["voted"] == bool(ref.voted[0])
        assert torch.allclose(torch.tensor(out["probabilities"]), ref.probs[0], atol=1e-6)
        assert abs(sum(out["probabilities"]) - 1) < 1e-5 and len(out["top"]) == 2
        assert out["prediction"]["label"] == od.model_spec.classes[out["prediction"]["class"]]
        satisfied = slo.get("budget_ms", 1.0) > 1e-3 and slo.get("min_accuracy", 0) <= accurate.accuracy
        assert out["satisfied"] is satisfied and (satisfied or "no operating point" in out["message"]), out
        unmet += not satisfied
        assert out["latency_s"] > 0 and out["queue_s"] >= 0
    s = client.get("/v1/stats").json()
    assert len(s["by_point"]) >= 2 and unmet >= 2 and s["served"] == 10 and s["unsatisfied"] == unmet and sum(s["by_point"].values()) == 10
    assert sum(s["by_exit"].values()) == 10 and s["latency_s"]["p50"] > 0
    metrics = scrape(client)
    assert metrics["edgeweave_served_total"][()] == 10 and metrics["edgeweave_unsatisfied_total"][()] == unmet
    assert {dict(k)["point"]: v for k, v in metrics["edgeweave_answers_by_point_total"].items()} == s["by_point"]
    assert metrics["edgeweave_load_factor"][()] == 1.0 and metrics["edgeweave_devices"][()] == 1
    m = client.get("/v1/model").json()
    assert m["input_shape"] == [1, 16, 16] and m["exits"] == 3 and m["default_point"] == accurate.name
    assert [p["name"] for p in m["operating_points"]] == [p.name for p in od.points]


def test_bad_service_levels_and_a_busy_model_get_clear_errors(served):
    client, server, _ = served
    x = encode_raw(torch.zeros(1, 1, 16, 16))
    for q, word in [("budget_ms=0", "budget_ms"), ("budget_ms=-3", "budget_ms"), ("min_accuracy=0", "min_accuracy"),
                    ("min_accuracy=97", "fraction")]:
        r = client.post(f"/v1/infer?{q}", content=x, headers=RAW)
        assert r.status_code == 400 and word in r.json()["detail"], (q, r.text)
    with server.turns._lock:  # another request is running
        r = client.post("/v1/infer", content=x, headers=RAW)
    assert r.status_code == 503 and "waited" in r.json()["detail"]
    assert client.post("/v1/infer", content=x, headers=RAW).status_code == 200
    s = server.stats()
    assert s["refused"] == 1 and s["served"] == 1


@pytest.mark.timeout(240)
def test_a_multi_exit_checkpoint_served_with_its_trunk_over_workers(ckpt, tmp_path):
    """With --workers the trunk's segments run over the cluster; each request still gets a
    calibrated point, priced for this cluster, and the stats say how much later work was skipped."""
    out = subprocess.run([sys.executable, "-m", "edgeweave", "serve", "--model", str(ckpt), "--workers", "2",
                          "--slo-ms", "100"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "budget_ms" in out.stderr, out.stderr[-2000:]
    names = [p.name for p in OnDemandModel.load(ckpt).points]
    stats_file = tmp_path / "stats.json"
    with serve_command(["--model", str(ckpt), "--workers", "2", "--json", str(stats_file)], up_within_s=180) as (url, end):
        with httpx.Client(base_url=url, timeout=60) as client:
            m = client.get("/v1/model").json()
            assert m["devices"] == ["leader", "worker1", "worker2"]
            x = encode_raw(torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3)))
            for q in ("", "?budget_ms=100000", "?min_accuracy=1", "?budget_ms=0.001"):
                r = client.post(f"/v1/infer{q}", content=x, headers=RAW)
                assert r.status_code == 200 and 0 <= r.json()["exit"] < 3 and r.json()["point"] in names, r.text
            s = client.get("/v1/stats").json()
            assert s["served"] == 4 and 0.0 <= s["followers_skipped_fraction"] <= 1.0
    assert end["returncode"] == 0, end["stderr"][-3000:]
    assert "on leader, worker1, worker2, early exits on demand" in end["stderr"]


def test_variants_combined_and_served_over_workers_each_request_picks_variant_and_point(ckpt, tmp_path):
    """`exits combine` deploys two calibrated checkpoints as one variant set; served over workers,
    a request's budget or accuracy target picks among both variants' points; alone, or with
    checkpoints of different tasks, the user gets a clear error."""
    torch.manual_seed(1)
    bundle = load_dataset("synthetic", input_size=16, in_channels=1, num_classes=4, samples=160, noise=1.0)
    kw = {"width": 2, "head_hidden": 4}
    small = save_checkpoint(tmp_path / "small.safetensors", build_model("multi_exit_small", num_classes=4, in_channels=1, **kw),
                            ModelSpec("multi_exit_small", 4, 1, (16, 16), kw, bundle.classes))
    calibrate_checkpoint(small, bundle, limit=20)
    other = save_checkpoint(tmp_path / "other.safetensors", build_model("multi_exit_small", num_classes=3, in_channels=1, **kw),
                            ModelSpec("multi_exit_small", 3, 1, (16, 16), kw))
    calibrate_checkpoint(other, load_dataset("synthetic", input_size=16, in_channels=1, num_classes=3, samples=60), limit=10)

    def edgeweave(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgeweave", *args], capture_output=True, text=True, timeout=120)

    vset = tmp_path / "set.safetensors"
    out = edgeweave("exits", "combine", f"big={ckpt}", f"small={other}", "--out", str(vset))
    assert out.returncode == 2 and "classifies 3 classes" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = edgeweave("exits", "combine", f"big={ckpt}", f"small={small}", "--out", str(vset))
    assert out.returncode == 0, out.stderr[-2000:]
    out = edgeweave("serve", "--model", str(vset))
    assert out.returncode == 2 and "--workers" in out.stderr, out.stderr[-2000:]
    names = {f"{v}/{p.name}" for v, c in (("big", ckpt), ("small", small)) for p in OnDemandModel.load(c).points}
    with serve_command(["--model", str(vset), "--workers", "2"], up_within_s=180) as (url, end):
        with httpx.Client(base_url=url, timeout=60) as client:
            m = client.get("/v1/model").json()
            assert {p["name"] for p in m["operating_points"]} == names and m["exits"] == 3
            x = encode_raw(torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3)))
            best = max(p["accuracy"] for p in m["operating_points"])
            for q in ("", "?budget_ms=100000", f"?min_accuracy={best}", "?budget_ms=0.001"):
                r = client.post(f"/v1/infer{q}", content=x, headers=RAW)
                assert r.status_code == 200 and r.json()["point"] in names, r.text
                if q == f"?min_accuracy={best}":
                    assert r.json()["point_accuracy"] == best
                if q == "?budget_ms=0.001":
                    assert not r.json()["satisfied"]  # the closest point: the fastest as priced now
            assert client.get("/v1/stats").json()["served"] == 4
    assert end["returncode"] == 0, end["stderr"][-3000:]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_edgeweave_serve_on_demand_answers_until_interrupted(ckpt, tmp_path):
    stats_file = tmp_path / "stats.json"
    with serve_command(["--model", str(ckpt), "--json", str(stats_file)], up_within_s=120) as (url, end):
        img = png(np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8))
        for q in ("", "?budget_ms=1000", "?min_accuracy=1"):
            r = httpx.post(f"{url}/v1/infer{q}", content=img, headers={"content-type": "image/png"}, timeout=30)
            assert r.status_code == 200 and 0 <= r.json()["exit"] < 3, r.text
    assert end["returncode"] == 0, end["stderr"][-3000:]
    assert "early exits on demand" in end["stderr"] and "stopped: 3 served" in end["stderr"]
    stats = json.loads(stats_file.read_text())
    assert stats["served"] == 3 and stats["unsatisfied"] >= 1 and sum(stats["by_point"].values()) == 3
