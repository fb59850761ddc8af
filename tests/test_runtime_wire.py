"""Bounded waits on real gloo messages (runtime/wire.py): reused waiter threads, and a wait
stuck on a silent peer that does not hold up the next message."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from edgeweave.runtime.wire import PeerError, wait_ticket


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


def test_receives_posted_together_are_waited_for_together_and_a_missing_one_is_named(pair):
    a, b = pair
    bufs = [torch.empty(3), torch.empty(3)]
    ticket = a.irecv_all([(bufs[0], 1), (bufs[1], 1)], 300)  # two from b, one tag: in order
    b.isend(torch.full((3,), 1.0), 0, 300)
    b.isend(torch.full((3,), 2.0), 0, 300)
    a.wait_all(ticket, [1, 1], "two partial sums")
    assert torch.equal(bufs[0], torch.full((3,), 1.0)) and torch.equal(bufs[1], torch.full((3,), 2.0))
    b.isend(torch.ones(3), 0, 301)
    ticket = a.irecv_all([(torch.empty(3), 1), (torch.empty(3), 1)], 301)  # only one comes
    with pytest.raises(PeerError, match=r"the second sum did not answer within 1 s"):  # names the one missing
        wait_ticket(ticket, timeout_s=1.0, probe=None, describe=lambda i: ("the first sum", "the second sum")[i])
    ticket = a.irecv_all([(torch.empty(3), 1)], 302)
    with pytest.raises(PeerError, match=r"device 'b' \(rank 1\) during receiving the sums did not answer"):
        a.wait_all(ticket, [1], "the sums")
    b.flush_sends()


def test_a_file_travels_in_pieces_and_arrives_whole(pair, tmp_path, monkeypatch):
    import edgeweave.runtime.wire as wire

    monkeypatch.setattr(wire, "CHUNK", 1000)  # 3 full pieces and a short one
    data = bytes(range(256)) * 13 + b"end"
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    a, b = pair
    with src.open("rb") as f:
        t = threading.Thread(target=b.send_file, args=(f, 0, 91, "a file"))
        t.start()
        n = a.recv_file(tmp_path / "dst.bin", 1, 91, "a file", max_bytes=len(data))
        t.join(10)
    assert n == len(data) and (tmp_path / "dst.bin").read_bytes() == data


def test_a_file_larger_than_announced_is_refused(pair, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    a, b = pair

    def send(f):
        try:
            b.send_file(f, 0, 92, "a file")
        except PeerError:  # nobody takes the file's bytes
            pass

    with src.open("rb") as f:
        t = threading.Thread(target=send, args=(f,), daemon=True)
        t.start()
        with pytest.raises(PeerError, match="announced 100 bytes"):
            a.recv_file(tmp_path / "dst.bin", 1, 92, "a file", max_bytes=99)
    assert not (tmp_path / "dst.bin").exists()  # nothing written before the size was checked


def test_what_a_killed_follower_was_receiving_is_swept_away(tmp_path):
    import os
    import subprocess
    import sys

    from edgeweave.runtime.follower import sweep_receipts

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"recv-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    mine = tmp_path / f"recv-{os.getpid()}-def"
    mine.mkdir()
    other = tmp_path / "unrelated"
    other.mkdir()
    assert sweep_receipts(str(tmp_path)) == [stale.name]
    assert not stale.exists() and mine.exists() and other.exists()
    assert sweep_receipts(None) == []
