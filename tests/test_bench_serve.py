"""`bench serve` end to end on a tiny configuration: real followers, uvicorn, httpx clients."""

from __future__ import annotations

import json

import pytest

from edgeweave.bench.serve import ServeBenchConfig, run_serve_bench


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_serve_measures_overhead_and_survives_the_failover(tmp_path):
    cfg = ServeBenchConfig(model="small_cnn", size=32, workers=2, rounds=3, clients=2, per_client=2,
                           failover_requests=4, kill_after=2)
    res = run_serve_bench(cfg, out_dir=tmp_path, progress=False)
    s = res["summary"]
    assert s["requests"] == 3 * 3 + 2 * 2 + 4 and s["answered"] == s["requests"]
    assert s["failover_errors"] == 0 and s["failover_lost"] == [s["failover_victim"]] == ["worker2"]
    assert s["failover_regroup_s"] > 0 and s["failover_request_wall_s"] > s["failover_regroup_s"]
    assert s["max_rel_err"] is not None and s["max_rel_err"] <= 1e-4
    # each request's overhead is its wall time minus what the server accounted for: never negative
    assert all(r["overhead_s"] >= 0 for r in res["rows"])
    assert 0 < s["concurrent_utilisation"] <= 1.05 and s["concurrent_refused"] == 0
    assert res["stats"]["devices"] == ["leader", "worker1"] and res["stats"]["regroups"] == 1
    on_disk = json.loads((tmp_path / "serve" / "serve.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(s))
    assert (tmp_path / "serve" / "serve.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "serve" / "serve.csv").read_text().count("\n") == s["requests"] + 1
