"""Bounded waits on real gloo messages (runtime/wire.py): reused waiter threads, and a wait
stuck on a silent peer that does not hold up the next message."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from edgeweave.runtime.wire import Channel, PeerError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pair():
    """Two ranks of one gloo group in this process (each built on its own thread, since the
    constructor waits for the other)."""
    port = _free_port()
    groups: dict[int, object] = {}

    def build(rank: int) -> None:
        store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=30))
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        opts._timeout = timedelta(seconds=30)
        groups[rank] = (store, dist.ProcessGroupGloo(store, rank, 2, opts))

    ts = [threading.Thread(target=build, args=(r,)) for r in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert set(groups) == {0, 1}
    names = ["a", "b"]
    return [Channel(groups[r][1], r, names, timeout_s=1.0) for r in (0, 1)]


def _waiters() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "edgeweave-wait")


def test_waits_reuse_threads(pair):
    a, b = pair
    before = _waiters()
    for i in range(30):
        b.isend(torch.full((8,), float(i)), 0, 5 + i)
        got = a.recv(torch.empty(8), 1, 5 + i, "numbers")
        assert torch.equal(got, torch.full((8,), float(i)))
    b.flush_sends()
    # one thread per concurrently pending wait, not one per wait
    assert _waiters() - before <= 3


def test_posted_receive_is_ready_without_waiting(pair):
    a, b = pair
    t = torch.empty(4)
    posted = a.irecv(t, 1, 77)  # handed to a waiter thread at once
    b.isend(torch.arange(4.0), 0, 77)
    b.flush_sends()
    assert posted.done.wait(5.0)  # completed in the background, before anyone asks for it
    a.wait(posted, 1, "numbers")
    assert torch.equal(t, torch.arange(4.0))


def test_a_silent_peer_is_named_and_does_not_block_the_next_message(pair):
    a, b = pair
    t0 = time.monotonic()
    with pytest.raises(PeerError, match=r"device 'b' \(rank 1\) during receiving nothing did not answer within 1 s"):
        a.recv(torch.empty(4), 1, 1234, "nothing")  # b never sends this
    assert time.monotonic() - t0 < 3.0
    # the thread that waits on the silent receive is still blocked in gloo; a new message must
    # still get through at once
    t1 = time.monotonic()
    b.isend(torch.ones(4), 0, 99)
    assert torch.equal(a.recv(torch.empty(4), 1, 99, "ones"), torch.ones(4))
    assert time.monotonic() - t1 < 0.5
