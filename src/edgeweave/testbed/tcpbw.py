"""A tiny TCP throughput meter (stdlib only), used when iperf3 is not installed.

Run as a script inside a namespace (``python tcpbw.py serve HOST PORT`` on the receiver,
``python tcpbw.py send HOST PORT SECONDS`` on the sender) so it starts in a few tens of
milliseconds without importing torch. The receiver prints ``ready`` once listening and, after
the sender closes, one JSON line ``{"bytes", "seconds", "bps"}`` timed from the first byte to
the last, which is the link's sustained rate once the shaper's initial bucket is spent.
"""

from __future__ import annotations

import json
import socket
import sys
import time

CHUNK = 64 * 1024


def serve(host: str, port: int, timeout_s: float = 30.0) -> dict:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(1)
    srv.settimeout(timeout_s)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(timeout_s)
    total = 0
    first = last = None
    buf = bytearray(CHUNK)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        total += n
    conn.close()
    srv.close()
    secs = (last - first) if first is not None and last is not None else 0.0
    return {"bytes": total, "seconds": secs, "bps": (8 * total / secs) if secs > 0 else 0.0}


def send(host: str, port: int, seconds: float, connect_timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            s = socket.create_connection((host, port), timeout=2.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    payload = b"\0" * CHUNK
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(payload)
        sent += CHUNK
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # wait for the receiver to finish reading before closing
    s.close()
    return sent


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "serve":
        print(json.dumps(serve(argv[1], int(argv[2]))), flush=True)
        return 0
    if len(argv) >= 4 and argv[0] == "send":
        send(argv[1], int(argv[2]), float(argv[3]))
        return 0
    print("usage: tcpbw.py serve HOST PORT | send HOST PORT SECONDS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
