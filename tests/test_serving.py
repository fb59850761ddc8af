"""`edgeweave serve`: the HTTP API over an adaptive stream (real followers, gloo on loopback).

Every answer that carries outputs is compared with the single-device model; the limits (body
size, queue, wait) and the input checks are exercised through HTTP as a client meets them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.errors import EdgeweaveError
from edgeweave.runtime.stream import Frame
from edgeweave.serving.app import _classes, create_app
from edgeweave.serving.preprocess import (NORMALIZATIONS, BadInput, decode_image, decode_raw, encode_raw,
                                          parse_normalize)
from edgeweave.serving.server import InferenceServer, ServerLimits, _percentiles
from _runtime_helpers import equal_stream, small_cluster
from _serving_helpers import free_port, png, scrape, serve_command

RAW = {"content-type": "application/octet-stream"}
PNG = {"content-type": "image/png"}


# ---- pure parts -------------------------------------------------------------------------------

def test_parse_normalize_names_and_numbers():
    assert parse_normalize("neucls") == NORMALIZATIONS["neucls"] == ((0.5,), (0.25,))
    assert parse_normalize("0.5/0.25") == ((0.5,), (0.25,))
    assert parse_normalize("0.1,0.2,0.3/1,2,3") == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    for bad in ("imagenett", "0.5", "a/b", "0.5/0", "0.5/-1", "nan/1"):
        with pytest.raises(EdgeweaveError):
            parse_normalize(bad)


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_raw_tensors_round_trip_exactly(c, h, w, seed):
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(seed))
    body = encode_raw(x)
    assert torch.equal(decode_raw(body, (c, h, w)), x)
    with pytest.raises(BadInput, match="bytes"):
        decode_raw(body[:-4], (c, h, w))


def test_raw_tensor_with_nan_is_refused():
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 1, 1] = float("nan")
    with pytest.raises(BadInput, match="NaN"):
        decode_raw(encode_raw(x), (1, 2, 2))


def test_images_are_converted_resized_and_normalised():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    x = decode_image(png(grey), 1, (28, 28), ((0.5,), (0.25,)))
    assert x.shape == (1, 1, 28, 28)
    assert torch.allclose(x[0, 0], (torch.from_numpy(grey).float() / 255 - 0.5) / 0.25)
    rgb = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)  # another size, three channels
    y = decode_image(png(rgb), 1, (28, 28), NORMALIZATIONS["none"])
    assert y.shape == (1, 1, 28, 28) and 0 <= float(y.min()) and float(y.max()) <= 1
    z = decode_image(png(rgb), 3, (7, 5), NORMALIZATIONS["imagenet"])
    assert z.shape == (1, 3, 7, 5)
    with pytest.raises(BadInput, match="readable"):
        decode_image(b"not an image", 1, (28, 28), NORMALIZATIONS["none"])


def test_huge_images_are_refused_before_decoding():
    big = png(np.zeros((4097, 4097), dtype=np.uint8))  # compresses to a few kB, 16.8 M pixels
    assert len(big) < 1 << 20
    with pytest.raises(BadInput, match="pixels"):
        decode_image(big, 1, (28, 28), NORMALIZATIONS["none"])


def test_top_classes_are_the_ranking_with_labels():
    p = torch.softmax(torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64), 0)
    out = _classes(p, 5, ["a", "b", "c"])
    assert [t["class"] for t in out["top"]] == [1, 2, 0] and out["prediction"]["label"] == "b"
    assert abs(sum(t["score"] for t in out["top"]) - 1) < 1e-12
    assert out["prediction"]["score"] == float(p[1])
    assert "label" not in _classes(p, 1, None)["prediction"] and len(_classes(p, 1, None)["top"]) == 1


def test_percentiles():
    assert _percentiles([]) is None
    assert _percentiles([2.0]) == {"p50": 2.0, "p90": 2.0, "p99": 2.0, "max": 2.0}
    p = _percentiles([float(i) for i in range(1, 101)])
    assert p["p50"] == 50.5 and 89 < p["p90"] < 92 and 98 < p["p99"] <= 100 and p["max"] == 100


class _SlowLearner:
    """A stream whose learning from a frame takes ``learn_s`` (a re-plan on a slow leader), or fails."""

    def __init__(self, learn_s: float, fail: bool = False):
        self.learn_s, self.fail = learn_s, fail
        self.frames = self.version = 0
        self.plan = SimpleNamespace(devices=["leader"], input_shape=[1, 1, 4, 4], predicted_s=0.01)
        self.records: list = []

    def run(self, x):
        return 2 * x, Frame(SimpleNamespace(total_s=0.01))

    def learn(self, frame):
        time.sleep(self.learn_s)
        if self.fail:
            raise RuntimeError("bug")
        self.frames += 1
        self.records.append(SimpleNamespace(event="replanned", factors=[1.0], calibrated_s=0.01))
        return self.records[-1]


def test_the_answer_does_not_wait_for_learning_but_the_next_frame_does():
    spec = SimpleNamespace(in_channels=1)
    server = InferenceServer(_SlowLearner(1.0), spec, "m", ServerLimits(wait_timeout_s=10))
    x = torch.ones(1, 1, 4, 4)
    t0 = time.monotonic()
    y, info = server.infer(x)
    assert time.monotonic() - t0 < 0.5 and torch.equal(y, 2 * x) and info["frame"] == 0
    y, info = server.infer(x)  # waits for the first frame's learning
    assert info["queue_s"] >= 0.8 and info["frame"] == 1
    assert server.idle(5) and server.stats()["replans"] == 2 and server.stats()["served"] == 2


def test_a_failure_while_learning_is_counted_and_serving_goes_on():
    server = InferenceServer(_SlowLearner(0.0, fail=True), SimpleNamespace(in_channels=1), "m")
    x = torch.ones(1, 1, 4, 4)
    for _ in range(2):
        assert torch.equal(server.infer(x)[0], 2 * x)
    assert server.idle(5) and server.stats()["learn_errors"] == 2 and server.stats()["served"] == 2


# ---- the API on real followers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def served():
    with small_cluster(2, timeout_s=10) as (cl, model, spec):
        server = InferenceServer(equal_stream(cl, model), spec, "small_cnn",
                                 ServerLimits(max_waiting=8, wait_timeout_s=0.5))
        server.warm_up()
        with TestClient(create_app(server, NORMALIZATIONS["none"], max_body_bytes=64 << 10)) as client:
            yield client, server, model, cl


def _ref(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


@pytest.mark.slow
def test_raw_input_gives_the_single_device_output(served):
    client, server, model, _ = served
    info = client.get("/v1/model").json()
    assert info["input_shape"] == [1, 28, 28] and info["devices"] == ["leader", "worker1", "worker2"]
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    r = client.post("/v1/infer?logits=true&top=3", content=encode_raw(x), headers=RAW)
    assert r.status_code == 200, r.text
    out = r.json()
    ref = _ref(model, x)
    assert torch.allclose(torch.tensor(out["logits"]), ref, rtol=1e-4, atol=1e-5)
    assert out["prediction"]["class"] == int(ref.argmax()) and len(out["top"]) == 3
    scores = [t["score"] for t in out["top"]]
    assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-9
    assert out["latency_s"] > 0 and out["devices"] == info["devices"] and out["lost"] == []


@pytest.mark.slow
def test_an_image_is_preprocessed_then_inferred_exactly(served):
    client, _, model, _ = served
    img = png(np.random.default_rng(1).integers(0, 256, (40, 30), dtype=np.uint8))
    r = client.post("/v1/infer?logits=true", content=img, headers=PNG)
    assert r.status_code == 200, r.text
    x = decode_image(img, 1, (28, 28), NORMALIZATIONS["none"])
    assert torch.allclose(torch.tensor(r.json()["logits"]), _ref(model, x), rtol=1e-4, atol=1e-5)
    assert "logits" not in client.post("/v1/infer", content=img, headers=PNG).json()


@pytest.mark.slow
def test_bad_requests_get_clear_errors_and_the_server_goes_on(served):
    client, server, model, _ = served
    cases = [
        (client.post("/v1/infer", content=b"{}", headers={"content-type": "application/json"}), 415, "image"),
        (client.post("/v1/infer", content=b"\0" * (65 << 10), headers=RAW), 413, "bytes"),
        (client.post("/v1/infer", content=b"\0" * 12, headers=RAW), 400, "3136 bytes"),
        (client.post("/v1/infer", content=b"GIF89a nonsense", headers={"content-type": "image/gif"}), 400, "image"),
        (client.post("/v1/infer?top=0", content=b"", headers=RAW), 400, "top"),
        (client.post("/v1/infer?budget_ms=5", content=b"", headers=RAW), 400, "multi-exit"),
    ]
    for r, code, word in cases:
        assert r.status_code == code and word in r.json()["detail"], (r.status_code, r.text)
    x = torch.ones(1, 1, 28, 28)
    r = client.post("/v1/infer?logits=true", content=encode_raw(x), headers=RAW)
    assert r.status_code == 200 and torch.allclose(torch.tensor(r.json()["logits"]), _ref(model, x), rtol=1e-4,
                                                   atol=1e-5)


@pytest.mark.slow
def test_concurrent_requests_are_served_one_frame_at_a_time_and_exactly(served):
    client, server, model, _ = served
    xs = [torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(100 + i)) for i in range(6)]
    results: dict[int, httpx.Response] = {}

    def post(i: int) -> None:
        results[i] = client.post("/v1/infer?logits=true", content=encode_raw(xs[i]), headers=RAW)

    before = server.stats()["served"]
    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    frames = set()
    for i, x in enumerate(xs):
        r = results[i]
        assert r.status_code == 200, r.text
        assert torch.allclose(torch.tensor(r.json()["logits"]), _ref(model, x), rtol=1e-4, atol=1e-5)
        frames.add(r.json()["frame"])
    assert len(frames) == len(xs)
    assert server.idle(30)
    s = server.stats()
    assert s["served"] == before + len(xs) and s["latency_s"]["p50"] > 0 and s["window"] >= len(xs)


@pytest.mark.slow
def test_metrics_say_what_stats_says_in_prometheus_format(served):
    client, server, _, _ = served
    client.post("/v1/infer", content=encode_raw(torch.zeros(1, 1, 28, 28)), headers=RAW)
    assert server.idle(30)
    m, s = scrape(client), client.get("/v1/stats").json()
    for key in ("served", "failed", "refused", "replans", "regroups", "learn_errors"):
        assert m[f"edgeweave_{key}_total"][()] == s[key], key
    assert m["edgeweave_devices"][()] == len(s["devices"]) == 3
    lat = {dict(k)["quantile"]: v for k, v in m["edgeweave_latency_seconds"].items()}
    assert lat["0.5"] == s["latency_s"]["p50"] and lat["1"] == s["latency_s"]["max"] > 0
    speeds = {dict(k)["device"]: v for k, v in m["edgeweave_speed_factor"].items()}
    assert list(speeds) == s["devices"] and list(speeds.values()) == s["speed_factors"]
    assert "edgeweave_unsatisfied_total" not in m


@pytest.mark.slow
def test_a_request_that_waits_too_long_is_told_the_cluster_is_busy(served):
    client, server, _, _ = served
    refused = server.stats()["refused"]
    with server.turns._lock:  # the cluster is busy with another frame
        t0 = time.monotonic()
        r = client.post("/v1/infer", content=encode_raw(torch.zeros(1, 1, 28, 28)), headers=RAW)
        waited = time.monotonic() - t0
    assert r.status_code == 503 and "waited" in r.json()["detail"]
    assert 0.5 <= waited < 5
    assert server.stats()["refused"] == refused + 1
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.slow
def test_when_a_follower_dies_the_request_still_gets_the_exact_answer(served):
    client, server, model, cl = served  # last in this module: it takes a follower away
    os.kill(cl.followers[0].process.pid, signal.SIGKILL)
    time.sleep(1.0)
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    r = client.post("/v1/infer?logits=true", content=encode_raw(x), headers=RAW)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["event"] == "regrouped" and out["lost"] == ["worker1"] and out["regroup_s"] > 0
    assert out["devices"] == ["leader", "worker2"]
    assert torch.allclose(torch.tensor(out["logits"]), _ref(model, x), rtol=1e-4, atol=1e-5)
    assert server.idle(30)
    s = client.get("/v1/stats").json()
    assert s["regroups"] == 1 and s["lost"] == ["worker1"] and s["devices"] == ["leader", "worker2"]


# ---- the command a user runs ------------------------------------------------------------------

def test_a_port_in_use_is_reported_before_the_cluster_starts():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "edgeweave", "serve", "--model", "small_cnn", "--workers", "1",
                              "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr[-2000:]
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_edgeweave_serve_answers_until_interrupted(tmp_path: Path):
    stats_file = tmp_path / "stats.json"
    with serve_command(["--model", "small_cnn", "--input-size", "32", "--workers", "2", "--normalize", "cifar100",
                        "--json", str(stats_file)]) as (url, end):
        info = httpx.get(f"{url}/v1/model").json()
        assert info["input_shape"] == [3, 32, 32] and len(info["devices"]) == 3
        assert info["normalize"]["mean"] == list(NORMALIZATIONS["cifar100"][0])
        img = png(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        for _ in range(3):
            r = httpx.post(f"{url}/v1/infer", content=img, headers=PNG, timeout=60)
            assert r.status_code == 200, r.text
            assert 0 <= r.json()["prediction"]["class"] < 10
    assert end["returncode"] == 0, end["stderr"][-3000:]
    assert "stopped: 3 served" in end["stderr"]
    stats = json.loads(stats_file.read_text())
    assert stats["served"] == 3 and stats["failed"] == 0 and stats["latency_s"]["p50"] > 0
