"""The HTTP layer of `edgeweave serve` as a client meets it, on a real uvicorn server: every
refusal is JSON and counted once, the schema declares the inference body, the docs page works
offline, and malformed query parameters answer the documented error shape.

The model behind the API is a stub that takes a fixed time per request (the limits are the
server's, not the cluster's); tests/test_serving.py runs the API over a real cluster.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn

from edgeweave.serving.app import create_app
from edgeweave.serving.preprocess import NORMALIZATIONS, encode_raw
from edgeweave.serving.server import Counters, ServerLimits, Turns, check_input
from _serving_helpers import free_port, scrape

RAW = {"content-type": "application/octet-stream"}
SHAPE = (1, 4, 4)


class StubServer:
    """What the app needs from a server: one request computes at a time, for ``compute_s``."""

    on_demand = False
    model_name = "stub"
    input_shape = SHAPE

    def __init__(self, limits: ServerLimits, compute_s: float) -> None:
        self.limits, self.compute_s = limits, compute_s
        self.spec = SimpleNamespace(num_classes=3, classes=["a", "b", "c"], in_channels=1)
        self.counters = Counters(limits.window, "unauthorized")
        self.turns = Turns(limits, self.counters)

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        check_input(x, SHAPE)
        queue_s = self.turns.enter()
        try:
            time.sleep(self.compute_s)
        finally:
            self.turns.leave_queue()
            self.turns.release()
        self.counters.served(self.compute_s)
        return torch.tensor([[0.1, 2.0, 0.3]]), {"latency_s": self.compute_s, "queue_s": queue_s}

    def model_info(self) -> dict:
        return {"devices": ["leader"]}

    def stats(self) -> dict:
        return {"model": self.model_name, **self.counters.snapshot(), "devices": ["leader"]}


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # runs in a thread
        pass


def _serve(app) -> Iterator[str]:
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)


@pytest.fixture
def api():
    """A server where 1 request computes (0.3 s), 1 waits, and at most 4 are in flight."""
    stub = StubServer(ServerLimits(max_waiting=1, wait_timeout_s=5), compute_s=0.3)
    app = create_app(stub, NORMALIZATIONS["none"], max_body_bytes=1 << 16, max_in_flight=4)
    for url in _serve(app):
        yield url, stub


def test_every_refusal_under_load_is_json_and_counted_once(api):
    url, stub = api
    x = encode_raw(torch.zeros(1, *SHAPE))
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def post() -> None:
        r = httpx.post(f"{url}/v1/infer", content=x, headers=RAW, timeout=30)
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=post) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 24
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 10, codes
    for r in answers:  # uvicorn's plain-text "Service Unavailable" would fail here
        assert r.headers["content-type"] == "application/json"
        assert isinstance(r.json()["detail"], str) if r.status_code == 503 else r.json()["prediction"]["label"] == "b"
    busy = [r.json()["detail"] for r in answers if r.status_code == 503]
    assert any("in flight" in d or "being handled" in d for d in busy) or any("waiting" in d for d in busy)
    with httpx.Client(base_url=url) as client:
        s = client.get("/v1/stats").json()
        assert s["served"] == codes.count(200) and s["refused"] == codes.count(503)
        m = scrape(client)
        assert m["edgeweave_refused_total"][()] == codes.count(503)
        assert m["edgeweave_served_total"][()] == codes.count(200)


def test_a_request_beyond_the_in_flight_limit_is_refused_before_its_body_is_read(api):
    url, stub = api
    x = encode_raw(torch.zeros(1, *SHAPE))

    def trickle():  # a client that sends its body slowly holds its request in flight
        for i in range(0, len(x), 8):
            time.sleep(0.1)
            yield x[i:i + 8]

    slow = [threading.Thread(target=httpx.post, args=(f"{url}/v1/infer",),
                             kwargs={"content": trickle(), "headers": RAW, "timeout": 30}) for _ in range(4)]
    for t in slow:
        t.start()
    time.sleep(0.5)
    r = httpx.post(f"{url}/v1/infer", content=x, headers=RAW, timeout=30)
    assert r.status_code == 503 and "being handled" in r.json()["detail"]
    assert httpx.get(f"{url}/healthz").status_code == 200  # never refused: a liveness probe
    for t in slow:
        t.join(30)
    s = httpx.get(f"{url}/v1/stats").json()
    assert s["served"] + s["refused"] == 5 and s["served"] >= 2  # each counted once, by whoever refused it


def test_the_schema_declares_the_inference_body(api):
    url, _ = api
    schema = httpx.get(f"{url}/openapi.json").json()
    body = schema["paths"]["/v1/infer"]["post"]["requestBody"]
    assert body["required"] is True
    assert {"image/png", "image/jpeg", "application/octet-stream"} <= set(body["content"])
    assert body["content"]["image/png"]["schema"] == {"type": "string", "format": "binary"}
    params = {p["name"] for p in schema["paths"]["/v1/infer"]["post"]["parameters"]}
    assert {"top", "logits"} <= params


def test_the_docs_page_needs_nothing_from_elsewhere(api):
    url, _ = api
    r = httpx.get(f"{url}/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for path in ("/v1/infer", "/v1/model", "/v1/stats", "/metrics", "/healthz"):
        assert path in page
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)  # no CDN, no other host
    assert "<script>" in page and "fetch(" in page  # the form that sends an image
    assert httpx.get(f"{url}/redoc").status_code == 404  # FastAPI's CDN page is gone too


def test_malformed_query_parameters_answer_the_documented_string_detail(api):
    url, stub = api
    x = encode_raw(torch.zeros(1, *SHAPE))
    for query, word in (("top=abc", "top"), ("logits=maybe", "logits"), ("top=1.5", "top")):
        r = httpx.post(f"{url}/v1/infer?{query}", content=x, headers=RAW)
        assert r.status_code == 400, (query, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and word in detail, (query, detail)
    r = httpx.post(f"{url}/v1/infer?top=2", content=x, headers=RAW)
    assert r.status_code == 200 and [t["label"] for t in r.json()["top"]] == ["b", "c"]
    assert stub.stats()["served"] == 1 and stub.stats()["refused"] == 0  # bad input is not a refusal


def test_a_token_guards_every_route_but_the_health_probe_and_the_docs_page():
    stub = StubServer(ServerLimits(max_waiting=1, wait_timeout_s=5), compute_s=0.0)
    token = "s3cret-" + "y" * 20
    for url in _serve(create_app(stub, NORMALIZATIONS["none"], token=token)):
        x = encode_raw(torch.zeros(1, *SHAPE))
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/docs").status_code == 200 and 'id="token"' in httpx.get(f"{url}/docs").text
        for headers in ({}, {"authorization": f"Bearer {token}x"}, {"authorization": f"bearer{token}"}):
            r = httpx.post(f"{url}/v1/infer", content=x, headers={**RAW, **headers})
            assert r.status_code == 401 and r.headers["content-type"] == "application/json"
        assert httpx.get(f"{url}/nowhere").status_code == 401  # unknown routes tell nothing either
        good = {"authorization": f"Bearer {token}"}
        assert httpx.post(f"{url}/v1/infer", content=x, headers={**RAW, **good}).status_code == 200
        s = httpx.get(f"{url}/v1/stats", headers=good).json()
        assert s["unauthorized"] == 4 and s["served"] == 1 and s["refused"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_edgeweave_serve_under_a_flood_answers_json_and_counts_every_refusal(tmp_path):
    """More clients at once than the server takes (2 * max_waiting + 16 in flight): each refusal
    is JSON and counted once in /v1/stats, /metrics and the final summary."""
    import json

    from _serving_helpers import serve_command

    x = encode_raw(torch.zeros(1, 3, 28, 28))
    stats_file = tmp_path / "stats.json"
    answers: list[httpx.Response] = []
    lock = threading.Lock()
    with serve_command(["--model", "small_cnn", "--input-size", "28", "--workers", "1", "--max-waiting", "0", "--json",
                        str(stats_file)]) as (url, end):
        def post() -> None:
            def trickle():  # held in flight for about a second
                for i in range(0, len(x), len(x) // 8):
                    time.sleep(0.12)
                    yield x[i:i + len(x) // 8]

            r = httpx.post(f"{url}/v1/infer", content=trickle(), headers=RAW, timeout=60)
            with lock:
                answers.append(r)

        threads = [threading.Thread(target=post) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = [r.status_code for r in answers]
        assert len(codes) == 30 and set(codes) <= {200, 503} and codes.count(503) >= 14, codes
        assert all(r.headers["content-type"] == "application/json" for r in answers)
        with httpx.Client(base_url=url) as client:
            s = client.get("/v1/stats").json()
            assert s["refused"] == codes.count(503) and s["served"] == codes.count(200)
            assert scrape(client)["edgeweave_refused_total"][()] == codes.count(503)
    assert end["returncode"] == 0, end["stderr"][-3000:]
    assert f"{codes.count(503)} refused" in end["stderr"]
    assert json.loads(stats_file.read_text())["refused"] == codes.count(503)
