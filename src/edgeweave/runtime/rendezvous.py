"""Rendezvous through the leader's TCPStore: registration, generations, commands.

Why generations: a cluster changes (a board dies, another joins), and gloo groups cannot be
resized. So membership is decided per *generation* N: the leader writes ``ew/gen/N`` (JSON:
member tickets in rank order, names, time-out) and everyone in it builds a fresh gloo group on
``PrefixStore("ew/g<N>/pg/")``. A follower that leaves a generation (the leader ends it, or
something failed) waits for ``ew/gen/N+1``; a generation marked ``shutdown`` ends it. Followers
that register late are simply given a rank in a later generation.

Keys (all small JSON strings; never pickles):
- ``ew/tickets``: counter; a follower's ``add(1)`` is its ticket.
- ``ew/worker/<ticket>``: its registration (name, pid, host, profile, has_model).
- ``ew/gen/<N>``: ``{"members": [ticket...], "names": [leader, ...], "timeout_s": T,
  "leader_addr": A}`` or ``{"shutdown": true}``.
- ``ew/left/<N>/<ticket>``: the follower left generation N and waits for the next one (after a
  failure, the leader regroups with the followers that say so: see ``Session.recover``).
- inside ``ew/g<N>/``: ``cmd/<seq>`` (leader -> all), ``ack/<seq>/<rank>`` (follower ->
  leader), ``err/<rank>`` (a follower's failure report), ``abort`` (leader gave up the generation).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from edgeweave.errors import EdgeweaveError

ROOT = "ew/"


def parse_address(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EdgeweaveError(f"expected HOST:PORT (for example 127.0.0.1:29400), got {addr!r}")
    return host.strip("[]"), int(port)


def host_store(host: str, port: int, timeout_s: float = 60.0) -> dist.TCPStore:
    """The leader's store; ``port=0`` picks a free port (read it back from ``store.port``)."""
    try:
        return dist.TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - turn socket errors into one line
        raise EdgeweaveError(f"cannot listen on {host}:{port}: {str(e).splitlines()[0][:200]}") from None


def connect_store(host: str, port: int, timeout_s: float = 60.0) -> dist.TCPStore:
    try:
        return dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as e:  # noqa: BLE001
        raise EdgeweaveError(f"cannot reach the leader at {host}:{port} within {timeout_s:g} s: "
                             f"{str(e).splitlines()[0][:200]}") from None


def gen_store(store: Any, gen: int) -> dist.PrefixStore:
    return dist.PrefixStore(f"{ROOT}g{gen}/", store)


def get_json(store: Any, key: str) -> Any:
    return json.loads(store.get(key).decode())


def set_json(store: Any, key: str, obj: Any) -> None:
    store.set(key, json.dumps(obj))


def register(store: Any, info: dict[str, Any]) -> int:
    """Follower: take a ticket and publish ``info``; returns the ticket."""
    ticket = int(store.add(ROOT + "tickets", 1))
    set_json(store, f"{ROOT}worker/{ticket}", info)
    return ticket


def registrations(store: Any) -> dict[int, dict[str, Any]]:
    """Leader: every follower that has registered so far, by ticket."""
    n = int(store.add(ROOT + "tickets", 0))
    out = {}
    for t in range(1, n + 1):
        key = f"{ROOT}worker/{t}"
        if store.check([key]):
            out[t] = get_json(store, key)
    return out


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


def next_generation(store: Any, gen: int, ticket: int) -> dict[str, Any]:
    """Follower: generation ``gen`` once the leader publishes it (members, names, or shutdown).

    While it waits it beats (adds to ``beat/<ticket>`` every ``BEAT_S``), so the leader can tell a
    registration whose process still runs from one whose board died before it was taken in,
    without waiting a group time-out for it."""
    key = f"{ROOT}gen/{gen}"
    wait_key(store, key, BEAT_S, every_poll=lambda: store.add(beat_key(ticket), 1))
    return get_json(store, key)


def beats(store: Any, tickets: list[int]) -> dict[int, int]:
    """Leader: each ticket's beat count so far."""
    return {t: int(store.add(beat_key(t), 0)) for t in tickets}


def mark_left(store: Any, gen: int, ticket: int) -> None:
    """Follower: it is out of generation ``gen`` and alive (the leader's roll call after a failure)."""
    store.set(f"{ROOT}left/{gen}/{ticket}", "1")


def has_left(store: Any, gen: int, ticket: int) -> bool:
    return bool(store.check([f"{ROOT}left/{gen}/{ticket}"]))


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
