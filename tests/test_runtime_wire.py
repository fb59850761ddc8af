"""Bounded waits on real gloo messages (runtime/wire.py): reused waiter threads, and a wait
stuck on a silent peer that does not hold up the next message."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from edgeweave.runtime.wire import PeerError


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
