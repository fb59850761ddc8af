"""Rendezvous through the leader's TCPStore: registration, generations, commands.

Why generations: a cluster changes (a board dies, another joins), and gloo groups cannot be
resized. So membership is decided per *generation* N: the leader writes ``ew/gen/N`` (JSON:
member tickets in rank order, names, time-out) and everyone in it builds a fresh gloo group on
``PrefixStore("ew/g<N>/pg/")``. A follower that leaves a generation (the leader ends it, or
something failed) waits for ``ew/gen/N+1``; a generation marked ``shutdown`` ends it. Followers
that register late are simply given a rank in a later generation.

Keys (all small JSON strings; never pickles):
- ``ew/tickets``: counter; a follower's ``add(1)`` is its ticket.
- ``ew/worker/<ticket>``: its hello (name, a fresh nonce, pid, host, its key's fingerprint); the
  only value read before anyone is authenticated.
- ``ew/challenge/<ticket>``: the leader's answer (a session id, its nonce and a MAC proving it
  holds the cluster key), or ``{"refused": why}``; ``ew/proof/<ticket>``: the follower's MAC over
  both nonces, its name and ticket, with its registration (profile, threads, a keyed tag of its
  local weights' hash). See :func:`join` and :class:`Gate`.
- ``ew/gen/<N>``: ``{"members": [ticket...], "names": [leader, ...], "timeout_s": T,
  "leader_addr": A}`` or ``{"shutdown": true}``.
- ``ew/left/<N>/<ticket>``: the follower left generation N and waits for the next one (after a
  failure, the leader regroups with the followers that say so: see ``Session.recover``).
- inside ``ew/g<N>/``: ``cmd/<seq>`` (leader -> all), ``ack/<seq>/<rank>`` (follower ->
  leader), ``err/<rank>`` (a follower's failure report), ``abort`` (leader gave up the generation).

Every value after the hello is sealed with the cluster key (``auth.Control``: a MAC over the
session, the key's name, the writer and its sequence number); a reader ignores and logs one
that fails the check, and waits for the real one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from edgeweave.errors import EdgeweaveError
from edgeweave.runtime import auth

ROOT = "ew/"


def host_store(host: str, port: int, timeout_s: float = 60.0) -> dist.TCPStore:
    """The leader's store; ``port=0`` picks a free port (read it back from ``store.port``)."""
    try:
        return dist.TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - turn socket errors into one line
        raise EdgeweaveError(f"cannot listen on {host}:{port}: {str(e).splitlines()[0][:200]}") from None


def connect_store(host: str, port: int, timeout_s: float = 60.0) -> dist.TCPStore:
    """A client of the leader's store, or a one-line error within ``timeout_s`` (to about a second).

    TCPStore's own client retries with a growing back-off (a 60 s time-out gave up after 77-120 s)
    and logs C++ stack frames on stderr for every failed try. So first wait with plain sockets
    until the leader's port accepts connections, then connect the store client in the time left
    (at least a second), its C++ log held back: a failure is told in one line.
    ``timeout_s`` stays the store's time-out for later operations."""
    if not timeout_s > 0:
        raise EdgeweaveError(f"the time-out to reach the leader must be positive, got {timeout_s:g} s")
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, left))):
                break
        except socket.gaierror as e:
            why = f"cannot resolve {host!r} ({e.strerror or e})"
        except OSError as e:
            why = e.strerror or str(e) or type(e).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise EdgeweaveError(f"cannot reach the leader at {host}:{port} within {timeout_s:g} s: {why}")
        time.sleep(min(0.25, left))
    left = max(1.0, deadline - time.monotonic())
    got: dict[str, Any] = {}

    def client() -> None:  # on a thread: a port that accepts but never answers hangs the C++ client
        try:
            got["store"] = dist.TCPStore(host, port, None, False, timedelta(seconds=left), wait_for_workers=False)
        except Exception as e:  # noqa: BLE001 - pybind raises several types
            got["error"] = e

    import sys
    import tempfile
    import threading

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)  # the C++ client's log lines go here, not to the user's terminal
        try:
            th = threading.Thread(target=client, name="edgeweave-store-client", daemon=True)
            th.start()
            th.join(left)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    if "store" not in got:
        why = got.get("error")
        raise EdgeweaveError(f"the leader's port {host}:{port} answers but no store replied within {timeout_s:g} s "
                             f"(is it an edgeweave leader?)"
                             + (f": {(str(why).strip().splitlines() or [type(why).__name__])[0][:200]}" if why else ""))
    store = got["store"]
    store.set_timeout(timedelta(seconds=timeout_s))
    return store


def gen_store(store: Any, gen: int) -> dist.PrefixStore:
    return dist.PrefixStore(f"{ROOT}g{gen}/", store)


def gen_scope(gen: int) -> str:
    """The names a generation's keys are sealed under (its PrefixStore's prefix)."""
    return f"{ROOT}g{gen}/"


class SealedStore:
    """A store (or a generation's PrefixStore, whose prefix is ``scope``) whose JSON values are
    sealed with ``ctl`` (:class:`~edgeweave.runtime.auth.Control`): :func:`set_json` seals,
    :meth:`read` checks. Everything else goes to the store as it is."""

    def __init__(self, store: Any, scope: str, ctl: auth.Control):
        self.store, self.scope, self.ctl = store, scope, ctl

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def put(self, key: str, obj: Any) -> None:
        self.store.set(key, self.ctl.seal(self.scope + key, obj))

    def read(self, key: str, writer: str | None = None, ordered: bool = False) -> Any:
        """The payload at ``key`` (which must exist), or None when it fails the check (logged)."""
        return self.ctl.check(self.scope + key, self.store.get(key), writer=writer, ordered=ordered)

    def read_if_set(self, key: str, writer: str | None = None) -> Any:
        """:meth:`read` when ``key`` exists, else None."""
        return self.read(key, writer) if self.store.check([key]) else None

    def wait_read(self, key: str, writer: str | None = None, ordered: bool = False, poll_s: float = 30.0,
                  every_poll: Callable[[], Any] | None = None) -> Any:
        """Block until ``key`` holds a value that passes the check. A forged one (someone wrote
        it first) is logged and skipped: the real writer's value replaces it."""
        while True:
            wait_key(self.store, key, poll_s, every_poll)
            v = self.read(key, writer, ordered)
            if v is not None:
                return v
            time.sleep(0.05)
            if every_poll is not None:
                every_poll()


def get_json(store: Any, key: str) -> Any:
    return json.loads(store.get(key).decode())


def set_json(store: Any, key: str, obj: Any) -> None:
    if isinstance(store, SealedStore):
        store.put(key, obj)
    else:
        store.set(key, json.dumps(obj))


def register(store: Any, hello: dict[str, Any]) -> int:
    """Follower: take a ticket and publish its ``hello`` (see :func:`join`); returns the ticket."""
    ticket = int(store.add(ROOT + "tickets", 1))
    set_json(store, f"{ROOT}worker/{ticket}", hello)
    return ticket


def join(store: Any, ctl: auth.Control, name: str, info: dict[str, Any], hello: dict[str, Any] | None = None) -> int:
    """Follower: register, answer the leader's challenge, and hand it ``info`` (profile, ...);
    returns the ticket. Sets ``ctl.writer`` and ``ctl.session``. Raises EdgeweaveError when the
    leader refuses this device, runs with another key, or without one while this device has one."""
    nonce = auth.new_nonce()
    ticket = register(store, {**(hello or {}), "name": name, "nonce": nonce, "key": auth.fingerprint(ctl.key)})
    ctl.writer = f"t{ticket}"
    key = f"{ROOT}challenge/{ticket}"
    wait_key(store, key, BEAT_S, every_poll=lambda: store.add(beat_key(ticket), 1))
    proof_key = f"{ROOT}proof/{ticket}"

    def fail(why: str, told: str) -> EdgeweaveError:
        store.set(proof_key, ctl.seal(proof_key, {"error": told}))  # the leader logs why, at once
        return EdgeweaveError(why)

    try:
        ch = get_json(store, key)
        assert isinstance(ch, dict)
    except (ValueError, AssertionError):
        raise fail("the leader's challenge is not readable", "unreadable challenge") from None
    if "refused" in ch:
        raise EdgeweaveError(f"the leader refuses this device: {str(ch['refused'])[:300]}")
    session, theirs = str(ch.get("session", "")), str(ch.get("nonce", ""))
    if ch.get("mode") != "hmac-sha256":
        if ctl.keyed:
            raise fail("the leader runs without a cluster key; this device has one and will not join an "
                       "unauthenticated cluster (give the leader --key FILE)", "this device has a key, the leader none")
    elif not ctl.keyed:
        raise fail("the leader requires the cluster key: give --key FILE (or EDGEWEAVE_KEY_FILE)", "no key")
    elif not auth.equal(ch.get("mac"), auth.challenge_mac(ctl.key, session, ticket, name, nonce, theirs)):
        fp = str(ch.get("key", "?"))
        raise fail(f"the leader's challenge does not verify with this device's key (fingerprint "
                   f"{auth.fingerprint(ctl.key)}; the leader's: {fp}): the keys differ",
                   f"the leader's challenge does not verify with its key (fingerprint {auth.fingerprint(ctl.key)})")
    ctl.session = session
    response = auth.response_mac(ctl.key, session, ticket, name, nonce, theirs) if ctl.keyed else ""
    store.set(proof_key, ctl.seal(proof_key, {"response": response, "info": info}))
    return ticket


PROOF_WAIT_S = 10.0  # a registration that does not answer its challenge within this is refused
_log = logging.getLogger("edgeweave.security")


@dataclass
class Refusal:
    """A registration the leader did not admit, and what it claimed to be."""

    ticket: int
    name: str
    source: str  # the host, address and pid it claimed (the store does not tell who wrote)
    reason: str
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"ticket": self.ticket, "name": self.name, "source": self.source, "reason": self.reason, "at": self.at}


class Gate:
    """The leader's door: every registration gets a challenge, and only one that answers it with
    the cluster key (and, given ``allowed``, one of those names) is admitted. Nothing about the
    model, and no rank, goes to a registration before that. Refusals are logged and kept."""

    def __init__(self, store: Any, ctl: auth.Control, allowed: set[str] | None = None):
        self.store, self.ctl, self.allowed = store, ctl, allowed
        self.admitted: dict[int, dict[str, Any]] = {}  # ticket -> its registration
        self.refused: list[Refusal] = []  # the recent ones
        self.refusals = 0  # all of them
        self._seen = 0  # tickets looked at
        self._no_hello: dict[int, float] = {}  # tickets taken whose hello is not there yet
        self._pending: dict[int, tuple[dict[str, Any], str, float]] = {}  # ticket -> (hello, our nonce, since)

    def poll(self) -> dict[int, dict[str, Any]]:
        """Challenge new registrations, judge the answers in; every admitted one so far, by ticket.
        One store call when nothing is new."""
        n = int(self.store.add(ROOT + "tickets", 0))
        now = time.monotonic()
        for t in range(self._seen + 1, n + 1):
            self._no_hello[t] = now
        self._seen = max(self._seen, n)
        for t, since in sorted(self._no_hello.items()):
            if self.store.check([f"{ROOT}worker/{t}"]):
                del self._no_hello[t]
                self._challenge(t)
            elif now - since > 6 * PROOF_WAIT_S:  # a ticket taken by a process that died at once
                del self._no_hello[t]
        for t, (hello, nonce, since) in list(self._pending.items()):
            key = f"{ROOT}proof/{t}"
            if self.store.check([key]):
                del self._pending[t]
                self._judge(t, hello, nonce, self.store.get(key))
            elif now - since > PROOF_WAIT_S:
                del self._pending[t]
                self._refuse(t, hello, f"no answer to the challenge within {PROOF_WAIT_S:g} s")
        return self.admitted

    def _challenge(self, t: int) -> None:
        try:
            hello = get_json(self.store, f"{ROOT}worker/{t}")
        except ValueError:
            hello = None
        if not isinstance(hello, dict) or not isinstance(hello.get("name"), str) or len(str(hello.get("nonce"))) != 32:
            self._refuse(t, hello if isinstance(hello, dict) else {}, "malformed registration (no name or nonce)")
            return
        name = hello["name"]
        if self.allowed is not None and name not in self.allowed:
            why = f"{name!r} is not a device of the cluster file"
            set_json(self.store, f"{ROOT}challenge/{t}", {"refused": why})
            self._refuse(t, hello, why)
            return
        nonce = auth.new_nonce()
        ch: dict[str, Any] = {"session": self.ctl.session, "nonce": nonce, "key": auth.fingerprint(self.ctl.key)}
        if self.ctl.keyed:
            ch.update(mode="hmac-sha256", mac=auth.challenge_mac(self.ctl.key, self.ctl.session, t, name,
                                                                  str(hello["nonce"]), nonce))
        else:
            ch["mode"] = "none"
        set_json(self.store, f"{ROOT}challenge/{t}", ch)
        self._pending[t] = (hello, nonce, time.monotonic())

    def _judge(self, t: int, hello: dict[str, Any], nonce: str, raw: bytes) -> None:
        name = hello["name"]
        try:
            proof = self.ctl.open(f"{ROOT}proof/{t}", raw, writer=f"t{t}")
        except auth.Forged:
            said = auth.Control.peek(raw)
            told = said.get("error") if isinstance(said, dict) else None
            self._refuse(t, hello, f"{told} (unauthenticated)" if told else
                         f"wrong key: its answer does not verify (its key's fingerprint: {hello.get('key')}, "
                         f"ours: {auth.fingerprint(self.ctl.key)})")
            return
        if not isinstance(proof, dict) or "error" in proof:
            self._refuse(t, hello, str(proof.get("error") if isinstance(proof, dict) else "malformed answer"))
            return
        if self.ctl.keyed and not auth.equal(proof.get("response"), auth.response_mac(
                self.ctl.key, self.ctl.session, t, name, str(hello["nonce"]), nonce)):
            self._refuse(t, hello, "wrong answer to the challenge")
            return
        info = proof.get("info")
        if not isinstance(info, dict):
            self._refuse(t, hello, "malformed answer (no registration)")
            return
        self.admitted[t] = {**info, "name": name}

    def _refuse(self, t: int, hello: dict[str, Any], why: str) -> None:
        name = str(hello.get("name", "?"))[:64]
        source = (f"host {str(hello.get('host', '?'))[:64]}, address {str(hello.get('addr', '?'))[:64]}, "
                  f"pid {str(hello.get('pid', '?'))[:16]}")
        r = Refusal(t, name, source, why)
        self.refused.append(r)
        del self.refused[:-256]
        self.refusals += 1
        _log.warning(f"edgeweave leader: refused follower {name!r} (ticket {t}; it claims {source}): {why}")


def publish_generation(store: Any, gen: int, info: dict[str, Any]) -> None:
    set_json(store, f"{ROOT}gen/{gen}", info)


def wait_key(store: Any, key: str, poll_s: float = 30.0, every_poll: Callable[[], Any] | None = None) -> None:
    """Block until ``key`` exists, for as long as the store (the leader) is alive.

    ``store.wait`` wakes as soon as the key is set; its time-out only lets us notice a dead
    leader, which makes ``check`` raise. ``every_poll`` runs before each wait (a heartbeat).
    """
    while True:
        if every_poll is not None:
            every_poll()
        try:
            store.wait([key], timedelta(seconds=poll_s))
            return
        except Exception:  # noqa: BLE001 - time-out or lost connection; check tells which
            if store.check([key]):  # raises when the leader is gone
                return


BEAT_S = 0.5  # a waiting follower adds to its beat counter this often


def beat_key(ticket: int) -> str:
    return f"{ROOT}beat/{ticket}"


def next_generation(store: SealedStore, gen: int, ticket: int) -> dict[str, Any]:
    """Follower: generation ``gen`` once the leader publishes it (members, names, or shutdown);
    a value that fails the check (a forged shutdown, an old generation copied) is skipped.

    While it waits it beats (adds to ``beat/<ticket>`` every ``BEAT_S``), so the leader can tell a
    registration whose process still runs from one whose board died before it was taken in,
    without waiting a group time-out for it."""
    info = store.wait_read(f"{ROOT}gen/{gen}", writer="leader", ordered=True, poll_s=BEAT_S,
                           every_poll=lambda: store.add(beat_key(ticket), 1))
    return info if isinstance(info, dict) else {}


def beats(store: Any, tickets: list[int]) -> dict[int, int]:
    """Leader: each ticket's beat count so far."""
    return {t: int(store.add(beat_key(t), 0)) for t in tickets}


def mark_left(store: SealedStore, gen: int, ticket: int) -> None:
    """Follower: it is out of generation ``gen`` and alive (the leader's roll call after a failure)."""
    set_json(store, f"{ROOT}left/{gen}/{ticket}", True)


def has_left(store: SealedStore, gen: int, ticket: int) -> bool:
    return store.read_if_set(f"{ROOT}left/{gen}/{ticket}", writer=f"t{ticket}") is True


def latest_generation(store: Any) -> int:
    """Leader: the number a new generation should take."""
    return int(store.add(ROOT + "gen_counter", 1)) - 1


def local_address_towards(host: str, port: int) -> str:
    """The local IP address this machine uses to reach ``host`` (no packet is sent).

    gloo must bind to an address its peers can reach; resolving the hostname often gives
    127.0.0.1 or 127.0.1.1 on boards and inside network namespaces. The interface that routes
    to the leader is the right one, unless the user chose one with GLOO_SOCKET_IFNAME.
    """
    try:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return ""


def gloo_host_for(host: str, port: int) -> str:
    """The hostname for this process's gloo device ("" = gloo's default, honouring
    GLOO_SOCKET_IFNAME)."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return ""
    return local_address_towards(host, port)


def make_group(store: Any, gen: int, rank: int, world: int, timeout_s: float, gloo_host: str = "") -> Any:
    """A fresh gloo process group for generation ``gen`` (no global torch.distributed state)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=timeout_s + 10.0)
    if gloo_host:
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=gloo_host)]
    else:
        opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    t0 = time.monotonic()
    try:
        return dist.ProcessGroupGloo(dist.PrefixStore("pg/", gen_store(store, gen)), rank, world, opts)
    except Exception as e:  # noqa: BLE001
        raise EdgeweaveError(
            f"rank {rank} could not join the gloo group of generation {gen} after {time.monotonic() - t0:.1f} s: "
            f"{str(e).splitlines()[0][:200]} (on a multi-homed host, set GLOO_SOCKET_IFNAME)") from None
