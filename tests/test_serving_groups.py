"""`serve --slo-ms`: concurrent requests on groups of devices (serving/groups.py) with real
follower processes: answers exact, the groups used at once, a request predicted past its SLO
refused at once and counted, a follower's death absorbed."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from _serving_helpers import scrape
from edgeweave.planning.graph import capture
from edgeweave.planning.throughput import plan_groups
from edgeweave.runtime.leader import LocalCluster
from edgeweave.runtime.run import compare, load_for_run
from edgeweave.serving.app import create_app
from edgeweave.serving.groups import GroupInferenceServer
from edgeweave.serving.preprocess import NORMALIZATIONS, encode_raw
from edgeweave.serving.server import Busy, ServerLimits

pytestmark = pytest.mark.timeout(300)

NAME, SIZE = "small_cnn", 32
GROUPING = [[[0, 1], [2], [3]]]


@pytest.fixture(scope="module")
def setup():
    model, spec = load_for_run(NAME, SIZE)
    gm = capture(model, (1, 3, SIZE, SIZE))
    with LocalCluster(3, timeout_s=20) as cl:
        cl.load_model(model, spec)

        def replan(cluster, slo=10.0):
            n = len(cluster.devices)
            return plan_groups(gm, cluster, slo_s=slo, model_name=NAME, model_hash=cl.model_hash,
                               groupings=GROUPING if n == 4 else [[[i] for i in range(n)]])

        yield cl, model, spec, replan


def _inputs(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(1, 3, SIZE, SIZE, generator=g) for _ in range(n)]


def _exact(model, x, y) -> None:
    with torch.no_grad():
        ref = model(x)
    assert float(ref.abs().max()) > 1e-3 and float(ref.std()) > 1e-4, "degenerate reference proves nothing"
    assert compare(y, ref)["rel_err"] <= 1e-5


def test_concurrent_requests_run_on_the_groups_at_once_exactly(setup):
    cl, model, spec, replan = setup
    server = GroupInferenceServer(cl, replan(cl.cluster), replan, spec, NAME, slo_s=10.0, limits=ServerLimits(max_waiting=16))
    try:
        assert server.warm_up() > 0
        xs = _inputs(12)
        out: dict[int, tuple] = {}

        def call(i: int) -> None:
            out[i] = server.infer(xs[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(out) == len(xs)
        for i, (y, info) in out.items():
            _exact(model, xs[i], y)
            assert info["latency_s"] >= info["service_s"] > 0 and info["slo_s"] == 10.0
        used = {tuple(info["devices"]) for _y, info in out.values()}
        assert len(used) >= 2, used  # requests ran on more than one group
        s = server.stats()
        assert sum(g["served"] for g in s["groups"]) == 12 and s["served"] == 12 and s["refused_slo"] == 0
        assert [g["devices"] for g in s["groups"]] == [["leader", "worker1"], ["worker2"], ["worker3"]]

        # over HTTP: the answer names its group; /v1/stats and /metrics report every group
        client = TestClient(create_app(server, NORMALIZATIONS["none"]))
        r = client.post("/v1/infer", content=encode_raw(xs[0]), headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert r.json()["devices"] in (["leader", "worker1"], ["worker2"], ["worker3"])
        assert len(client.get("/v1/stats").json()["groups"]) == 3
        m = scrape(client)
        assert sum(m["edgeweave_group_served_total"].values()) == 13
        assert client.get("/v1/model").json()["groups"] == [["leader", "worker1"], ["worker2"], ["worker3"]]

        # a request predicted past its SLO is refused at once, and counted
        server.slo_s = 0.5 * min(server._service)
        with pytest.raises(Busy, match="beyond the SLO"):
            server.infer(xs[1])
        r = client.post("/v1/infer", content=encode_raw(xs[1]), headers={"content-type": "application/octet-stream"})
        assert r.status_code == 503 and "SLO" in r.json()["detail"]
        # when to try again: whole seconds, at least one, at least the fastest group's service time
        assert int(r.headers["retry-after"]) >= max(1.0, min(server._service))
        s = server.stats()
        assert s["refused_slo"] == 2 and s["refused"] == 2
        assert scrape(client)["edgeweave_refused_slo_total"][()] == 2
    finally:
        server.close()


def test_many_http_clients_refusals_all_counted(setup):
    """bench stream's serve clients on loopback: more clients than groups under an SLO that
    admits about one request per group; the refused ones wait their Retry-After, every answer
    is exact, and /v1/stats and /metrics count exactly the refusals the clients saw."""
    from edgeweave.bench.leader_driver import bench_input
    from edgeweave.bench.serve import Uvicorn
    from edgeweave.bench.stream_clients import run_clients, summarize_clients

    cl, model, spec, replan = setup
    gplan = replan(cl.cluster)
    server = GroupInferenceServer(cl, gplan, replan, spec, NAME, slo_s=10.0, limits=ServerLimits(max_waiting=32))
    try:
        server.warm_up()
        server.slo_s = 1.05 * max(server._service)  # a request is admitted only while a group is free
        with torch.no_grad():
            ref = model(bench_input(SIZE))
        assert float(ref.std()) > 1e-4, "degenerate reference proves nothing"
        with Uvicorn(create_app(server, NORMALIZATIONS["none"])) as url:
            raw = run_clients(url, clients=8, seconds=3.0, size=SIZE, ref=ref.flatten().tolist(), timeout_s=60)
        r = summarize_clients(raw)
        assert r["answered"] >= 3 and r["errors"] == 0 and r["rel_err"] <= 1e-5, r
        assert r["refused"] >= 1 and r["refused_slo"] == r["refused"], r  # 8 clients, 3 groups: some refused
        assert r["refusals_counted"], r
        assert r["fps"] and r["fps"] > 0
    finally:
        server.close()


def test_a_follower_dying_under_load_costs_no_request(setup):
    cl, model, spec, replan = setup
    server = GroupInferenceServer(cl, replan(cl.cluster), replan, spec, NAME, slo_s=30.0,
                                  limits=ServerLimits(max_waiting=16))
    try:
        server.warm_up()
        xs = _inputs(10)
        os.kill(cl.followers[1].process.pid, signal.SIGKILL)  # worker2: a group of its own
        out: dict[int, tuple] = {}

        def call(i: int) -> None:
            out[i] = server.infer(xs[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(out) == len(xs)  # every request answered, none failed
        for i, (y, _info) in out.items():
            _exact(model, xs[i], y)
        s = server.stats()
        assert s["lost"] == ["worker2"] and s["failed"] == 0 and s["regroups"] >= 1
        assert all("worker2" not in g["devices"] for g in s["groups"])
    finally:
        server.close()
