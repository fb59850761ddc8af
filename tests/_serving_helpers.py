"""Helpers shared by the serving tests: a PNG from an array, a free port, a parsed /metrics, and
`edgeweave serve` run as a user runs it."""

from __future__ import annotations

import contextlib
import io
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

import numpy as np
from PIL import Image


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(client) -> dict[str, dict[tuple, float]]:
    """``GET /metrics`` parsed: sample name -> {labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for smp in fam.samples:
            out.setdefault(smp.name, {})[tuple(sorted(smp.labels.items()))] = smp.value
    return out


@contextlib.contextmanager
def serve_command(args: list[str], up_within_s: float = 180.0) -> Iterator[tuple[str, dict]]:
    """``edgeweave serve ARGS --port P`` in a subprocess: yields (base URL, a dict that holds
    ``returncode`` and ``stderr`` once it has been stopped with SIGINT, as Ctrl-C does)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeweave", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, end = f"http://127.0.0.1:{port}", {}
    try:
        deadline = time.monotonic() + up_within_s
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.3)
        yield url, end
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, end["stderr"] = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        end["returncode"] = proc.returncode
