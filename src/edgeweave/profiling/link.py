"""Measure a link's bandwidth and latency over the channel the runtime itself uses (gloo).

Both ranks must already be in a torch.distributed process group: the default one
(``group=None``), or any gloo ``ProcessGroup`` object passed as ``group``, also one built
directly (``ProcessGroupGloo(store, rank, world, opts)``, as the runtime does) that
torch.distributed's global state does not know; ranks are the group's own. One side calls
:func:`probe_link`, the other :func:`respond_link`; the prober sends a small header (sizes and
repeats) first, so the responder needs no arguments to agree on. For every size the prober
sends ``n`` bytes and the responder echoes them back; the round trip therefore crosses the link
once in each direction, which averages an asymmetric link and needs no clock agreement.

Model: half a round trip of ``n`` bytes takes ``8 n / bandwidth + latency``. The minimum over
repeats (after one warm-up) is taken per size (the minimum, not the median, because queueing
behind other traffic only ever adds time); bandwidth is the least-squares slope over the sizes
and latency the smallest message's time (see :func:`fit_link`). ``latency_s`` is therefore
the *one-way* latency (half the round trip of an empty message), the meaning of
``DeviceProfile.latency_s``; the round trip is twice it.

A timeout raises TimeoutError. Gloo closes the connection to the peer when a wait times out
("Application timeout caused pair closure"), so after a timeout the process group is unusable
for that pair: treat it like a failed device and form a new group.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

MAGIC = 0x65776C6B  # "ewlk": guards against a stray message being read as a header
TAG = 0x656C  # message tag of probe traffic, apart from the runtime's own tags
MAX_SIZES = 16
DEFAULT_SIZES = (64, 64 * 1024, 1024 * 1024)
DEFAULT_REPEATS = 3


def _wait(work: "dist.Work", timeout_s: float, what: str) -> None:
    try:
        ok = work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as e:  # gloo raises on timeout
        raise TimeoutError(f"link probe: {what} did not complete within {timeout_s:g}s ({str(e).splitlines()[0]})") from None
    if ok is False:
        raise TimeoutError(f"link probe: {what} did not complete within {timeout_s:g}s")


def _send(t: torch.Tensor, peer: int, timeout_s: float, group) -> None:
    work = dist.isend(t, peer, tag=TAG) if group is None else group.send([t], peer, TAG)
    _wait(work, timeout_s, f"send of {t.numel() * t.element_size()} bytes to rank {peer}")


def _recv(t: torch.Tensor, peer: int, timeout_s: float, group) -> None:
    work = dist.irecv(t, peer, tag=TAG) if group is None else group.recv([t], peer, TAG)
    _wait(work, timeout_s, f"receive of {t.numel() * t.element_size()} bytes from rank {peer}")


def fit_link(sizes_bytes: Sequence[float], one_way_s: Sequence[float]) -> tuple[float, float]:
    """(bandwidth_bps, latency_s) from one-way times per message size.

    Bandwidth is the least-squares slope of t = 8 n / bw + c over all sizes. Latency is the
    time of the *smallest* message less its transfer time, measured rather than extrapolated:
    a tc shaper lets small messages through at line rate from its bucket, which bends the line
    so that its intercept can come out negative (seen on every shaped link here). With a
    non-positive slope (a link faster than the timer resolves) the bandwidth comes from the
    largest message alone."""
    n = np.asarray(sizes_bytes, dtype=float)
    t = np.asarray(one_way_s, dtype=float)
    if len(set(n.tolist())) < 2:
        raise ValueError("link fit needs at least two distinct message sizes")
    A = np.stack([8.0 * n, np.ones_like(n)], axis=1)
    (inv_bw, _), *_ = np.linalg.lstsq(A, t, rcond=None)
    if inv_bw <= 0:
        i = int(np.argmax(n))
        bw = float(8.0 * n[i] / t[i])
    else:
        bw = float(1.0 / inv_bw)
    j = int(np.argmin(n))
    return bw, max(0.0, float(t[j] - 8.0 * n[j] / bw))


def probe_link(
    peer_rank: int,
    sizes: Sequence[int] = DEFAULT_SIZES,
    timeout_s: float = 60.0,
    repeats: int = DEFAULT_REPEATS,
    group: "dist.ProcessGroup | None" = None,
) -> tuple[float, float]:
    """Measure the link to ``peer_rank`` (which must be in :func:`respond_link`).

    Returns ``(bandwidth_bps, latency_s)``: bits per second, and one-way latency in seconds.
    Each transfer waits at most ``timeout_s``; a silent peer raises TimeoutError. Takes about
    ``2 * (repeats + 1) * sum(sizes) * 8 / bandwidth`` seconds (about 1.4 s at 50 Mbit/s with
    the default sizes)."""
    sizes = [int(s) for s in sizes]
    if not 2 <= len(sizes) <= MAX_SIZES or min(sizes) < 1:
        raise ValueError(f"link probe: need 2..{MAX_SIZES} positive sizes, got {sizes}")
    if repeats < 1:
        raise ValueError("link probe: repeats must be at least 1")
    header = torch.zeros(3 + MAX_SIZES, dtype=torch.int64)
    header[0], header[1], header[2] = MAGIC, len(sizes), repeats
    header[3 : 3 + len(sizes)] = torch.tensor(sizes, dtype=torch.int64)
    _send(header, peer_rank, timeout_s, group)
    best: list[float] = []
    for n in sizes:
        buf = torch.zeros(n, dtype=torch.uint8)
        times = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            _send(buf, peer_rank, timeout_s, group)
            _recv(buf, peer_rank, timeout_s, group)
            if r:  # the first round trip is a warm-up (connection, allocations)
                times.append(time.perf_counter() - t0)
        best.append(min(times) / 2.0)
    return fit_link(sizes, best)


def respond_link(peer_rank: int, timeout_s: float = 60.0, group: "dist.ProcessGroup | None" = None) -> None:
    """The other side of :func:`probe_link`: echo every message ``peer_rank`` sends."""
    header = torch.zeros(3 + MAX_SIZES, dtype=torch.int64)
    _recv(header, peer_rank, timeout_s, group)
    if int(header[0]) != MAGIC or not 2 <= int(header[1]) <= MAX_SIZES:
        raise RuntimeError(f"link probe: rank {peer_rank} sent something that is not a probe header")
    n_sizes, repeats = int(header[1]), int(header[2])
    for n in header[3 : 3 + n_sizes].tolist():
        buf = torch.empty(int(n), dtype=torch.uint8)
        for _ in range(repeats + 1):
            _recv(buf, peer_rank, timeout_s, group)
            _send(buf, peer_rank, timeout_s, group)


def measure_byte_s(nbytes: int = 1 << 19, rounds: int = 16, busy_s: float = 0.2, timeout_s: float = 30.0) -> float:
    """Seconds of this device's time per byte it sends or receives over gloo (the planner's
    ``DeviceProfile.byte_s``), measured on loopback: two ranks of one process echo ``nbytes``
    ``rounds`` times, so the process CPU covers both ends (every byte is sent and received
    twice per round). Converted to the device's own time by the wall / CPU ratio of a busy
    loop, so a CPU-capped device reports what a byte costs it in wall seconds. Loopback skips
    the NIC and any shaping, so this is a lower bound: in a 0.25-core testbed cgroup it
    measured 2.5-3.8 ms per MB (0.5-1.0 at 0.5 core), where two namespaces echoing over the
    shaped veths measure 4.6-6.1 (2.3-2.8; ``bench edgeld``'s probe, which the bench plans with).
    """
    import threading

    store = dist.HashStore()
    groups: list = [None, None]
    errors: list[BaseException] = []

    def join(rank: int) -> None:
        try:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timedelta(seconds=timeout_s)
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            groups[rank] = dist.ProcessGroupGloo(store, rank, 2, opts)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=join, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if errors or None in groups:
        raise TimeoutError(f"byte cost probe: no loopback gloo group ({errors[0] if errors else 'time-out'})")
    a, b = torch.zeros(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)

    def echo() -> None:
        for _ in range(rounds):
            _wait(groups[1].recv([b], 0, TAG), timeout_s, "loopback receive")
            _wait(groups[1].send([b], 0, TAG), timeout_s, "loopback send")

    peer = threading.Thread(target=echo, daemon=True)
    c0 = time.process_time()
    peer.start()
    for _ in range(rounds):
        _wait(groups[0].send([a], 1, TAG), timeout_s, "loopback send")
        _wait(groups[0].recv([a], 1, TAG), timeout_s, "loopback receive")
    peer.join(timeout_s)
    cpu_per_byte = (time.process_time() - c0) / (4.0 * rounds * nbytes)
    w0, p0 = time.perf_counter(), time.thread_time()  # this thread alone: torch may run more
    x = [0.0]
    while time.thread_time() - p0 < busy_s:
        for i in range(1000):
            x[0] += i
    wall_per_cpu = (time.perf_counter() - w0) / max(time.thread_time() - p0, 1e-9)
    return cpu_per_byte * wall_per_cpu
