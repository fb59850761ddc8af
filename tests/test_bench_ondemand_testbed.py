"""bench ondemand end to end on the emulated testbed, tiny: two variants (a multi-exit ResNet18
and its distilled compact student) trained briefly, every segment of both planned over five
capped devices, every configuration measured there, budgeted requests served by the one policy.

Needs root, iproute2 and the cgroup v1 cpu controller (skipped otherwise). Its own prefix and
subnet (ewq-, 10.77.39.0/24). Briefly trained models and a shared host's timing prove little
about speed, so it asserts what must hold regardless: exact exits, every configuration and
request measured, a choice per request among both variants' configurations, files written."""

from __future__ import annotations

import json

import pytest

from edgeweave.testbed import emulation_support

_OK, _WHY = emulation_support()
pytestmark = [
    pytest.mark.testbed,
    pytest.mark.slow,
    pytest.mark.skipif(not _OK, reason=f"the emulated testbed needs root, iproute2 and cgroup v1 ({_WHY})"),
    pytest.mark.timeout(900),
]


def test_ondemand_bench_tiny(tmp_path):
    from edgeweave.bench.ondemand import OndemandConfig, run_ondemand_bench

    cfg = OndemandConfig(size=48, train_limit=400, full_epochs=1, student_epochs=1, measure_frames=3,
                         baseline_rounds=2, requests=12, budgets=4, model_latency=False, ort_baseline=False, backend="torch",
                         quick=True, prefix="ewq-", subnet="10.77.39.0/24")
    r = run_ondemand_bench(cfg, out_dir=tmp_path, progress=False)
    s = r["summary"]
    assert not s["reference_degenerate"], "a degenerate reference proves nothing"
    assert s["exits_rel_err_max"] <= 1e-5  # every exit of both variants, and the full model planned whole
    assert r["setup"]["devices"] == ["leader", "w1", "w2", "w3", "w4"]
    names = {p["name"] for p in r["setup"]["points"]}
    assert {n.split("/")[0] for n in names} == {"full", "student"} and s["configurations"] == len(names)
    assert all(len(f) == 3 and all(x["latency_ms"] > 0 for x in f) for f in r["configurations"].values())
    assert len(r["requests"]) == 12 and all(q["config"] in names for q in r["requests"])
    assert 0.0 <= s["followers_skipped_fraction"] <= 1.0 and s["budget_violations"] is not None
    assert s["full_single_torch_ms"] > 0 and s["full_cluster_ms"] > 0
    assert not r["testbed_down"]["remaining"]
    out = tmp_path / "ondemand"
    assert json.loads((out / "ondemand.json").read_text())["summary"]["configurations"] == len(names)
    for f in ("configurations.csv", "requests.csv", "ondemand.png", "report.md"):
        assert (out / f).stat().st_size > 0
