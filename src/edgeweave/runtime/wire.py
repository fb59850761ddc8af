"""What crosses the network, and how every wait on it is bounded.

Only tensors and small typed messages travel: bytes (a safetensors model, a JSON plan) go as an
int64 length header followed by a uint8 tensor, and are decoded by safetensors / ``json`` on
the other side. Nothing is ever unpickled (no ``send_object_list``).

gloo's own time-out is fatal to a connection and cannot be interrupted, so a wait here runs
``Work.wait`` (with the generation's time-out) on a helper thread while the caller watches the
clock and a *liveness probe* (follower error reports in the store, dead local processes, an
abort from the leader). The first thing that goes wrong becomes a :class:`PeerError` that names
the device (name and rank) that did not answer.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
import torch.distributed as dist

from edgeweave.errors import EdgeweaveError

# Tags: data transfers use stage * TAG_STRIDE + transfer index; control traffic lives above.
TAG_STRIDE = 4096
TAG_CONTROL = 1 << 28
TAG_TIMING = TAG_CONTROL + 1
TAG_FRAME = TAG_CONTROL + 2  # a group's frame: its input to the group's head, its output back
# Frames in flight on one group at once (slots) keep their messages apart by a tag offset per slot.
CHUNK = 16 << 20  # bytes per message of a file sent in pieces (Channel.send_file)
SLOT_TAGS = 1 << 24
MAX_SLOTS = 8

# A probe returns None when all is well, or a message explaining why waiting is pointless.
Probe = Callable[[], "str | None"]


class PeerError(EdgeweaveError):
    """A device did not answer in time, hung up, or reported a failure."""

    def __init__(self, message: str, rank: int | None = None, name: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.name = name


def transfer_tag(stage: int, index: int) -> int:
    if index >= TAG_STRIDE:
        raise EdgeweaveError(f"stage {stage} has more than {TAG_STRIDE} transfers; the runtime cannot tag them apart")
    return stage * TAG_STRIDE + index


@dataclass
class Channel:
    """Point-to-point messages inside one generation's process group, with bounded waits.

    ``names[r]`` is the device name of rank ``r``; ``timeout_s`` bounds every single wait.
    """

    pg: Any  # torch.distributed.ProcessGroupGloo
    rank: int
    names: list[str]
    timeout_s: float
    probe: Probe | None = None
    poll_s: float = 0.2
    # The leader waits a little longer than followers, so that when a follower waits on a
    # silent peer, its report (naming the real culprit) reaches the leader before it gives up.
    grace_s: float = 0.0
    _pending_sends: list[tuple[Any, int, str, Any]] = field(default_factory=list)
    ranks: list[int] | None = None  # a view's peers' ranks in the whole group (:meth:`view`)

    def who(self, rank: int) -> str:
        name = self.names[rank] if 0 <= rank < len(self.names) else "?"
        if self.ranks is not None and 0 <= rank < len(self.ranks):
            rank = self.ranks[rank]
        return f"device {name!r} (rank {rank})"

    def view(self, ranks: list[int], slot: int = 0) -> "Channel":
        """This channel as seen by a plan over some of the devices: peer ``i`` of the view is
        rank ``ranks[i]`` (a group of devices serving frames of its own; planning/throughput.py).
        The view keeps its own pending sends, so groups running at once do not wait for each
        other's; ``slot`` offsets every tag, so frames in flight on one group at once do too."""
        if self.rank not in ranks:
            raise EdgeweaveError(f"rank {self.rank} is not one of the view's ranks {ranks}")
        if not 0 <= slot < MAX_SLOTS:
            raise EdgeweaveError(f"slot {slot} out of range 0..{MAX_SLOTS - 1}")
        return Channel(_Mapped(self.pg, list(ranks), slot * SLOT_TAGS), ranks.index(self.rank),
                       [self.names[r] for r in ranks], self.timeout_s, probe=self.probe, poll_s=self.poll_s,
                       grace_s=self.grace_s, ranks=list(ranks))

    # -- raw tensors -------------------------------------------------------------------------
    def isend(self, t: torch.Tensor, dst: int, tag: int, what: str = "data") -> None:
        """Post a send; it is waited for (and errors surface) in :meth:`flush_sends`."""
        t = t.contiguous()
        work = self._post(lambda: self.pg.send([t], dst, tag), dst, f"sending {what}")
        self._pending_sends.append((work, dst, what, t))  # keep ``t`` alive until sent

    def irecv(self, t: torch.Tensor, src: int, tag: int) -> Ticket:
        """Post a receive into ``t``; a waiter thread takes it at once (see :class:`_Waiters`)."""
        return self.irecv_all([(t, src)], tag)

    def irecv_all(self, bufs: list[tuple[torch.Tensor, int]], tag: int) -> Ticket:
        """Post a receive into each ``(tensor, src)`` at once, all on one waiter thread."""
        works = [self._post(lambda t=t, src=src: self.pg.recv([t], src, tag), src, "receiving") for t, src in bufs]
        return _WAITERS.submit(works, self.timeout_s + self.grace_s + 5.0)

    def _post(self, op: Callable[[], Any], peer: int, what: str) -> Any:
        """gloo refuses to post an operation on a pair whose peer has already hung up (a
        RuntimeError at once, not from ``wait``): that is the peer's failure too."""
        try:
            return op()
        except RuntimeError as e:
            raise PeerError(f"{self.who(peer)} hung up before {what}: {str(e).splitlines()[0][:200]}",
                            *self._peer(peer)) from None

    def wait_all(self, ticket: Ticket, srcs: list[int], what: str) -> None:
        """Wait for :meth:`irecv_all`'s receives from ``srcs``; a failure names its peer."""
        wait_ticket(ticket, timeout_s=self.timeout_s + self.grace_s, probe=self.probe, poll_s=self.poll_s,
                    describe=lambda i: f"{self.who(srcs[i])} during receiving {what}",
                    peer=lambda i: self._peer(srcs[i]))

    def _peer(self, rank: int) -> tuple[int, str | None]:
        name = self.names[rank] if 0 <= rank < len(self.names) else None
        return (self.ranks[rank] if self.ranks is not None and name is not None else rank), name

    def wait(self, work: Any, peer: int, what: str) -> None:
        """Wait for one operation with ``peer``; raise PeerError naming it on any failure."""
        wait_work(work, timeout_s=self.timeout_s + self.grace_s, probe=self.probe, poll_s=self.poll_s,
                  describe=lambda: f"{self.who(peer)} during {what}", peer=self._peer(peer))

    def flush_sends(self) -> None:
        """Wait for every posted send, all on one waiter thread (one hand-off, not one each)."""
        pending, self._pending_sends = self._pending_sends, []
        if not pending:
            return
        ticket = _WAITERS.submit([w for w, _d, _what, _t in pending], self.timeout_s + self.grace_s + 5.0)
        wait_ticket(ticket, timeout_s=self.timeout_s + self.grace_s, probe=self.probe, poll_s=self.poll_s,
                    describe=lambda i: f"{self.who(pending[i][1])} during sending {pending[i][2]}",
                    peer=lambda i: self._peer(pending[i][1]))

    def send(self, t: torch.Tensor, dst: int, tag: int, what: str) -> None:
        t = t.contiguous()
        self.wait(self._post(lambda: self.pg.send([t], dst, tag), dst, f"sending {what}"), dst, f"sending {what}")

    def recv(self, t: torch.Tensor, src: int, tag: int, what: str) -> torch.Tensor:
        self.wait(self.irecv(t, src, tag), src, f"receiving {what}")
        return t

    # -- bytes and JSON ----------------------------------------------------------------------
    def send_bytes(self, data: bytes, dst: int, tag: int = TAG_CONTROL, what: str = "a message") -> None:
        self.send(torch.tensor([len(data)], dtype=torch.int64), dst, tag, f"{what} (header)")
        if data:
            self.send(bytes_to_tensor(data), dst, tag, what)

    def recv_bytes(self, src: int, tag: int = TAG_CONTROL, what: str = "a message", max_bytes: int = 1 << 34) -> bytes:
        head = self.recv(torch.zeros(1, dtype=torch.int64), src, tag, f"{what} (header)")
        n = int(head.item())
        if n < 0 or n > max_bytes:
            raise PeerError(f"{self.who(src)} announced {n} bytes for {what}; expected 0..{max_bytes}", src)
        if n == 0:
            return b""
        buf = self.recv(torch.empty(n, dtype=torch.uint8), src, tag, what)
        return buf.numpy().tobytes()

    def send_file(self, f: BinaryIO, dst: int, tag: int = TAG_CONTROL, what: str = "a file") -> None:
        """Send an open file's bytes, from its start, in pieces of ``CHUNK`` (a model of hundreds
        of MB never sits in memory whole, on either side); :meth:`recv_file` takes them."""
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        self.send(torch.tensor([size], dtype=torch.int64), dst, tag, f"{what} (header)")
        while size > 0:
            piece = f.read(min(CHUNK, size))
            if not piece:
                raise EdgeweaveError(f"the file of {what} shrank while it was being sent")
            self.send(torch.frombuffer(bytearray(piece), dtype=torch.uint8), dst, tag, what)
            size -= len(piece)

    def recv_file(self, path: str | Path, src: int, tag: int = TAG_CONTROL, what: str = "a file",
                  max_bytes: int = 1 << 34) -> int:
        """Receive :meth:`send_file`'s bytes into a new file at ``path``; returns their count."""
        head = self.recv(torch.zeros(1, dtype=torch.int64), src, tag, f"{what} (header)")
        n = int(head.item())
        if n < 0 or n > max_bytes:
            raise PeerError(f"{self.who(src)} announced {n} bytes for {what}; expected 0..{max_bytes}", src)
        buf = torch.empty(min(CHUNK, n), dtype=torch.uint8)
        left = n
        with open(path, "wb") as f:
            while left > 0:
                k = min(CHUNK, left)
                f.write(self.recv(buf[:k], src, tag, what).numpy().data)
                left -= k
        return n

    def send_json(self, obj: Any, dst: int, tag: int = TAG_CONTROL, what: str = "a message") -> None:
        self.send_bytes(json.dumps(obj).encode(), dst, tag, what)

    def recv_json(self, src: int, tag: int = TAG_CONTROL, what: str = "a message") -> Any:
        data = self.recv_bytes(src, tag, what, max_bytes=1 << 28)
        try:
            return json.loads(data.decode())
        except (UnicodeDecodeError, ValueError):
            raise PeerError(f"{self.who(src)} sent {what} that is not valid JSON", src) from None


@dataclass
class _Mapped:
    """A process group's point-to-point operations addressed by position in ``ranks``."""

    pg: Any
    ranks: list[int]
    offset: int = 0  # added to every tag (a slot's)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> Any:
        return self.pg.send(tensors, self.ranks[dst], tag + self.offset)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Any:
        return self.pg.recv(tensors, self.ranks[src], tag + self.offset)


def bytes_to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass
class Ticket:
    """Operations handed to a waiter thread (:class:`_Waiters`); ``failed`` = (index, error);
    ``at`` = the index of the operation being waited for (the one to name if it never ends)."""

    done: threading.Event
    failed: list[tuple[int, BaseException]]
    at: int = 0


class _Waiters:
    """Reusable daemon threads that call ``Work.wait`` for the caller (see :func:`wait_work`).

    A gloo point-to-point receive completes only inside ``Work.wait`` (``is_completed`` stays
    False until someone waits), so some thread has to block in it. Starting a thread per wait
    cost a capped device ~2 ms per stage boundary (measured: a synchronisation between two
    0.25-core devices took 4.4 ms with a thread per wait, 2.2 ms with reused threads, 1.6 ms
    waiting directly, which cannot be interrupted). Receives are handed over when they are
    posted (:meth:`Channel.irecv`), so rows that arrive during compute are ready without a
    hand-off. A thread stuck on a silent peer stays busy until gloo gives up; later waits get
    another thread, so one frozen device never delays the next generation's messages.
    """

    def __init__(self) -> None:
        self._idle: list[queue.SimpleQueue] = []
        self._lock = threading.Lock()

    def submit(self, works: list[Any], timeout_s: float) -> Ticket:
        """Wait for ``works`` in order on a waiter thread; stop at the first failure."""
        ticket = Ticket(threading.Event(), [])
        with self._lock:
            q = self._idle.pop() if self._idle else None
        if q is None:
            q = queue.SimpleQueue()
            threading.Thread(target=self._loop, args=(q,), daemon=True, name="edgeweave-wait").start()
        q.put((works, timeout_s, ticket))
        return ticket

    def _loop(self, q: queue.SimpleQueue) -> None:
        while True:
            works, timeout_s, ticket = q.get()
            for i, work in enumerate(works):
                ticket.at = i
                try:
                    work.wait(timedelta(seconds=timeout_s))
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    ticket.failed.append((i, e))
                    break
            ticket.done.set()
            with self._lock:
                self._idle.append(q)


_WAITERS = _Waiters()


def wait_work(work: Any, *, timeout_s: float, probe: Probe | None, describe: Callable[[], str],
              poll_s: float = 0.2, peer: tuple[int, str | None] | None = None) -> None:
    """``work.wait()`` (a gloo Work or a :class:`Ticket`) bounded by ``timeout_s`` and
    interruptible by ``probe`` (see module doc)."""
    if not isinstance(work, Ticket):
        if work.is_completed():
            _finish(work, describe, peer)
            return
        work = _WAITERS.submit([work], timeout_s + 5.0)
    wait_ticket(work, timeout_s=timeout_s, probe=probe, describe=lambda _i: describe(), poll_s=poll_s,
                peer=lambda _i: peer)


def wait_ticket(ticket: Ticket, *, timeout_s: float, probe: Probe | None, describe: Callable[[int], str],
                poll_s: float = 0.2, peer: Callable[[int], tuple[int, str | None] | None] = lambda _i: None) -> None:
    """Wait for a :class:`Ticket`; ``describe(i)`` / ``peer(i)`` name its i-th operation."""
    deadline = time.monotonic() + timeout_s
    while not ticket.done.wait(poll_s):
        reason = probe() if probe is not None else None
        at = ticket.at
        if reason:
            raise PeerError(f"gave up waiting for {describe(at)}: {reason}", *(peer(at) or (None, None)))
        if time.monotonic() > deadline:
            raise PeerError(f"{describe(at)} did not answer within {timeout_s:g} s", *(peer(at) or (None, None)))
    if ticket.failed:
        i, e = ticket.failed[0]
        reason = probe() if probe is not None else None
        raise PeerError(f"{describe(i)} failed: {_short(e)}" + (f"; {reason}" if reason else ""), *(peer(i) or (None, None)))


def _finish(work: Any, describe: Callable[[], str], peer: tuple[int, str | None] | None) -> None:
    try:
        work.wait()
    except RuntimeError as e:
        raise PeerError(f"{describe()} failed: {_short(e)}", *(peer or (None, None))) from None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "Connection closed by peer" in text:
        return "the connection was closed (the process died or gave up)"
    if "Timed out" in text:
        return "gloo time-out"
    return text[:200]


def wait_store_keys(store: Any, keys: list[str], *, timeout_s: float, probe: Probe | None,
                    describe_missing: Callable[[list[str]], str], poll_s: float = 0.02) -> None:
    """Poll the store until every key exists; raise PeerError naming what is missing."""
    deadline = time.monotonic() + timeout_s
    last_probe = 0.0
    while True:
        missing = [k for k in keys if not store.check([k])]
        if not missing:
            return
        now = time.monotonic()
        if probe is not None and now - last_probe > 0.2:
            last_probe = now
            reason = probe()
            if reason:
                raise PeerError(f"gave up waiting for {describe_missing(missing)}: {reason}")
        if now > deadline:
            raise PeerError(f"{describe_missing(missing)} did not answer within {timeout_s:g} s")
        time.sleep(poll_s)
