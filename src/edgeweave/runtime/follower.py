"""The follower process (``edgeweave worker``): join the leader, hold the model, execute plans.

It decides nothing. It registers with the leader's store, joins each generation it is given a
rank in, and serves the leader's commands (``model``, ``plan``, ``infer``, ``end``) until the
leader shuts the cluster down or disappears. It refuses to compute with weights whose sha256
differs from the plan's ``model_hash``, whether the weights were shipped or loaded locally.

With a cluster key it proves it holds the key before the leader admits it (``rendezvous.join``),
and believes only control values sealed with that key (``auth.Control``): a forged or replayed
generation, command or abort is logged and ignored. Without one it joins a leader on loopback only.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from dataclasses import astuple, dataclass, field
from typing import Any

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.limits import parse_address
from edgeweave.layout import ordinary, to_device_layout
from edgeweave.planning.plan import Plan
from edgeweave import resident
from edgeweave.runtime import auth
from edgeweave.runtime import rendezvous as rv
from edgeweave.runtime.wire import TAG_CONTROL, TAG_FRAME, TAG_TIMING, Channel, PeerError


@dataclass
class FollowerState:
    """What survives from one generation to the next: the model and its hash."""

    name: str
    model: torch.nn.Module | None = None
    model_hash: str | None = None
    plans: dict[int, Any] = field(default_factory=dict)  # plan id -> engine.DeviceProgram
    ranks: dict[int, list[int]] = field(default_factory=dict)  # plan id -> the ranks of its devices, in plan order
    graphs: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # (input shape, piece) -> graph module
    gloo_host: str = ""
    leader_addr: tuple[str, int] | None = None  # the leader's store (a slot of frames in flight opens its own client)
    ctl: auth.Control = field(default_factory=lambda: auth.Control(None))  # seals and checks control values


def _log(name: str, msg: str) -> None:
    print(f"[edgeweave worker {name}] {msg}", file=sys.stderr, flush=True)


def serve(leader: str, name: str | None = None, *, threads: int = 1, model_path: str | None = None,
          profile: dict[str, Any] | None = None, connect_timeout_s: float = 60.0, key: bytes | None = None,
          backend: str = "auto") -> int:
    """Run a follower until the leader shuts the cluster down; returns an exit code. ``key``: the
    cluster key (without one, only a leader on loopback can be joined)."""
    torch.set_num_threads(max(1, threads))
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    host, port = parse_address(leader)
    auth.require_key_or_loopback(host, key, "follower")
    state = FollowerState(name, ctl=auth.Control(key, log=lambda m: _log(name, m)))
    if model_path:
        from edgeweave.checkpoint import load_model, model_hash

        state.model, _spec = load_model(model_path)
        state.model = to_device_layout(state.model.eval())
        state.model_hash = model_hash(state.model)
    raw_store = rv.connect_store(host, port, connect_timeout_s)
    state.leader_addr = (host, port)
    store = rv.SealedStore(raw_store, "", state.ctl)
    state.gloo_host = rv.gloo_host_for(host, port)  # the interface that reaches the leader
    _preload()
    prof = dict(profile or {"name": name})
    prof["name"] = name
    from edgeweave.engine.backends import available

    # what the planner may choose for this device (``--backend auto``): what it has, and what it asks for
    prof["meta"] = {**prof.get("meta", {}), "backends_available": available(), "backend": backend}
    ctl = state.ctl
    # what the leader learns once we proved we hold the key: our local weights only as a keyed tag
    registration = {"name": name, "pid": os.getpid(), "host": socket.gethostname(), "threads": threads,
                    "profile": prof, "pinned": bool(model_path), "profile_given": profile is not None,
                    "leader_host": host, "memory": resident.facts(),
                    "model_tag": ctl.tag("model", state.model_hash) if state.model_hash else None}
    hello = {"pid": os.getpid(), "host": socket.gethostname(), "addr": state.gloo_host}
    _log(name, f"cluster key fingerprint {auth.fingerprint(ctl.key)}" if ctl.keyed else
         "no cluster key: unauthenticated, loopback only")
    gen, was_member = 0, False
    try:
        ticket = rv.join(raw_store, ctl, name, registration, hello)
        _log(name, f"admitted by {host}:{port} (ticket {ticket})")
        while True:
            info = rv.next_generation(store, gen, ticket)
            if info.get("shutdown"):
                rv.set_json(store, f"{rv.ROOT}bye/{ticket}", True)  # lets the leader's store outlive our last read
                _log(name, "leader shut the cluster down")
                return 0
            if ticket not in info.get("members", []):
                if was_member:
                    # Left out while alive: blamed for another's failure, or too slow (or stopped)
                    # to answer the leader's roll call. A registration once left out is never
                    # offered again, so offer ourselves anew; the leader takes newcomers in.
                    ticket = rv.join(raw_store, ctl, name, registration, hello)
                    was_member = False
                    _log(name, f"left out of generation {gen}; registered again (ticket {ticket})")
                gen += 1
                continue
            rank = info["members"].index(ticket) + 1
            try:
                _serve_generation(raw_store, gen, rank, info, state)
            except EdgeweaveError as e:  # the group never formed (a member did not come): wait for the next
                _log(name, f"generation {gen}: {e}")
            rv.mark_left(store, gen, ticket)
            state.plans.clear()
            state.ranks.clear()
            gen, was_member = gen + 1, True
    except (RuntimeError, OSError) as e:  # store connection lost: the leader is gone
        _log(name, f"lost the leader ({str(e).splitlines()[0][:120]}); exiting")
        return 3


def _preload() -> None:
    """Import what commands need before registering, so the leader's first command (and its
    time-out) does not pay for importing torchvision and the planner."""
    import edgeweave.checkpoint  # noqa: F401
    import edgeweave.engine  # noqa: F401
    import edgeweave.planning.graph  # noqa: F401
    from edgeweave.models.registry import _ensure_builtin_models_loaded

    _ensure_builtin_models_loaded()
    import torchvision.models  # noqa: F401


def _serve_generation(store: Any, gen: int, rank: int, info: dict[str, Any], state: FollowerState) -> None:
    names = [str(n) for n in info["names"]]
    timeout_s = float(info.get("timeout_s", 60.0))
    gstore = rv.SealedStore(rv.gen_store(store, gen), rv.gen_scope(gen), state.ctl)

    def probe() -> str | None:
        why = gstore.read_if_set("abort", writer="leader")  # a forged abort is logged and ignored
        return f"the leader aborted generation {gen}: {str(why)[:300]}" if why is not None else None

    pg = rv.make_group(store, gen, rank, len(names), timeout_s, state.gloo_host)
    ch = Channel(pg, rank, names, timeout_s, probe=probe)
    seq = 0
    while True:
        cmd = gstore.wait_read(f"cmd/{seq}", writer="leader", ordered=True)
        op = cmd.get("op") if isinstance(cmd, dict) else None
        try:
            if op == "end":
                return
            if op == "model":
                _cmd_model(gstore, ch, seq, cmd, state)
            elif op == "plan":
                _cmd_plan(gstore, ch, seq, cmd, state)
            elif op == "infer":
                _cmd_infer(ch, cmd, state)
            elif op == "groups":
                _cmd_groups(gstore, ch, cmd, state, gen)
            elif op == "ping":
                rv.set_json(gstore, f"ack/{seq}/{rank}", {"ok": True})
            else:
                raise EdgeweaveError(f"unknown command {op!r}")
        except Exception as e:  # noqa: BLE001 - report every failure to the leader, then decide
            msg = f"{e}" if isinstance(e, EdgeweaveError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, EdgeweaveError):
                traceback.print_exc()
            _log(state.name, f"{op} failed: {msg}")
            if op in ("model", "plan", "ping"):
                rv.set_json(gstore, f"ack/{seq}/{rank}", {"ok": False, "error": msg})
            if isinstance(e, PeerError) or op in ("infer", "groups"):
                # the message pattern of this generation is broken: report and leave it
                if isinstance(e, PeerError) and e.name:  # whom it blames: the leader's roll call stops waiting for it
                    rv.set_json(gstore, f"blames/{rank}", e.name)
                rv.set_json(gstore, f"err/{rank}", msg[:1000])
                return
        seq += 1


def _cmd_model(gstore: Any, ch: Channel, seq: int, cmd: dict[str, Any], state: FollowerState) -> None:
    import tempfile

    from edgeweave.checkpoint import load_checkpoint, read_metadata, scratch_dir

    # the command carries keyed tags of the weights' hash and of the bytes, never the hash itself
    want, ctl = str(cmd["tag"]), state.ctl
    rank = ch.rank
    if rank in cmd.get("ship", []):
        # Received into a file and mapped (checkpoint.py): the weights are pages of the file, resident
        # where a plan uses them; the file's name goes at once, its mapping keeps it until replaced.
        scratch = scratch_dir()
        sweep_receipts(scratch)
        with tempfile.TemporaryDirectory(prefix=f"recv-{os.getpid()}-", dir=scratch) as tmp:
            path = os.path.join(tmp, "model.safetensors")
            ch.recv_file(path, 0, TAG_CONTROL, "the model", max_bytes=int(cmd["nbytes"]))
            with open(path, "rb") as f:
                if not auth.equal(ctl.tag_file("model-bytes", f), cmd.get("bytes")):
                    raise EdgeweaveError(f"device {state.name!r} (rank {rank}) refuses the model: the bytes it "
                                         f"received are not the ones the leader sealed")
            state.model, state.model_hash = None, None  # the old model's pages go before the new one's come
            state.plans.clear()
            state.ranks.clear()
            state.graphs.clear()
            model, _spec, _extra = load_checkpoint(path, where=f"model shipped to {state.name}")
            digest = read_metadata(path)["hash"]  # what load_checkpoint checked the weights against
        state.model, state.model_hash = to_device_layout(model.eval()), digest
        resident.give_back()
    have = ctl.tag("model", state.model_hash) if state.model_hash else "none"
    if not auth.equal(have, want):
        where = " (loaded from its --model path)" if cmd.get("ship") is not None and rank not in cmd["ship"] else ""
        raise EdgeweaveError(f"device {state.name!r} (rank {rank}) refuses the model: its weights{where} (tag "
                             f"{have[:12]}...) differ from the leader's (tag {want[:12]}...)")
    rv.set_json(gstore, f"ack/{seq}/{rank}", {"ok": True})


def _cmd_plan(gstore: Any, ch: Channel, seq: int, cmd: dict[str, Any], state: FollowerState) -> None:
    from edgeweave.engine import prepare
    from edgeweave.planning.graph import capture

    rank = ch.rank
    ranks = [int(r) for r in cmd.get("ranks") or range(len(ch.names))]
    for p in cmd.get("drop", []):
        state.plans.pop(int(p), None)
    if rank not in ranks:  # a plan for a group of devices this one is not in
        rv.set_json(gstore, f"ack/{seq}/{rank}", {"ok": True, "member": False})
        return
    text = ch.recv_bytes(0, TAG_CONTROL, "a plan").decode()
    _check_tag(state, "plan", text, cmd)
    plan = Plan.from_json(text)
    if state.model is None:
        raise EdgeweaveError(f"device {state.name!r} (rank {rank}) has no model to run the plan with")
    if plan.model_hash != state.model_hash:
        raise EdgeweaveError(f"device {state.name!r} (rank {rank}) refuses the plan: it was made for weights "
                             f"{plan.model_hash[:12]}... but this device holds {str(state.model_hash)[:12]}...")
    from edgeweave.models.multi_exit import exit_part

    part = plan.meta.get("part")  # a piece of a multi-exit model (runtime/exits.py), or the whole
    gkey = (tuple(plan.input_shape), repr(part))
    if gkey not in state.graphs:  # tracing costs seconds; plans for one shape (and piece) share a graph
        state.graphs[gkey] = capture(exit_part(state.model, part), tuple(plan.input_shape))
    gm = state.graphs[gkey]
    prog = prepare(gm, plan, ranks.index(rank))  # compiled now: the first frame runs at this device's real speed
    state.plans[int(cmd["plan_id"])] = prog
    state.ranks[int(cmd["plan_id"])] = ranks
    resident.give_back()
    rv.set_json(gstore, f"ack/{seq}/{rank}", {"ok": True, "backend": prog.backend, "fallbacks": prog.fallbacks})


def sweep_receipts(scratch: str | None) -> list[str]:
    """Remove what followers killed while receiving a model left in ``scratch`` (``recv-<pid>-*``
    of processes that no longer run: a partial file may be hundreds of MB); returns the removed."""
    import shutil

    gone = []
    for d in os.listdir(scratch) if scratch and os.path.isdir(scratch) else []:
        parts = d.split("-")
        if len(parts) < 3 or parts[0] != "recv" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # its process still runs
        except ProcessLookupError:
            pass
        except OSError:  # another user's process: not ours to judge
            continue
        shutil.rmtree(os.path.join(scratch, d), ignore_errors=True)
        gone.append(d)
    return gone


def _check_tag(state: FollowerState, label: str, data: str | bytes, cmd: dict[str, Any]) -> None:
    """Bytes that came over gloo (not authenticated) must be the ones the sealed command names."""
    if not auth.equal(state.ctl.tag(label, data), cmd.get("tag")):
        raise EdgeweaveError(f"device {state.name!r} refuses the {label}: the bytes it received are not the ones "
                             f"the leader sealed")


def _cmd_infer(ch: Channel, cmd: dict[str, Any], state: FollowerState) -> None:
    from edgeweave.runtime.executor import execute_plan

    pid = int(cmd["plan_id"])
    if pid not in state.plans:
        raise EdgeweaveError(f"device {state.name!r} has no plan {pid}")
    _out, timings = execute_plan(state.plans[pid], None, ch)
    _send_timings(ch, timings)


def _send_timings(ch: Channel, timings: list[Any]) -> None:
    t = torch.tensor([list(astuple(s)) for s in timings], dtype=torch.float64)
    ch.send(t, 0, TAG_TIMING, "timings")


def _cmd_groups(gstore: Any, ch: Channel, cmd: dict[str, Any], state: FollowerState, gen: int) -> None:
    """Serve frames in this device's group until the leader ends the group's sequences.

    The groups' frames run at once; each group reads its own command sequences (``o<opening>/g<i>.<slot>/<k>``),
    so a device waits only for its group's frames. With several slots the device serves that many
    frames at once, one thread each (their messages kept apart by tag offsets): one frame computes
    while another waits for rows. A group whose head is not the leader receives each frame's
    input from the leader and returns the output to it (runtime/leader.py ``infer``)."""
    import threading

    groups = [[int(r) for r in g] for g in cmd["groups"]]
    mine = next((g for g, ranks in enumerate(groups) if ch.rank in ranks), None)
    if mine is None:
        return
    slots = int(cmd.get("slots", 1))
    errors: list[BaseException] = []
    done = threading.Event()

    def serve_slot(slot: int) -> None:
        try:
            # its own store client: a client serves one wait at a time, and a slot waits for its next
            # command while another slot's frame probes the store for an abort
            store = gstore
            if slots > 1 and state.leader_addr is not None:
                raw = rv.connect_store(*state.leader_addr, timeout_s=ch.timeout_s)
                store = rv.SealedStore(rv.gen_store(raw, gen), rv.gen_scope(gen), state.ctl)
            _serve_slot(store, ch, groups[mine], f"o{int(cmd.get('opening', 0))}/g{mine}.{slot}", slot, state)
        except BaseException as e:  # noqa: BLE001 - reported by the command loop
            errors.append(e)
        finally:
            done.set()

    threads = [threading.Thread(target=serve_slot, args=(s,), daemon=True, name=f"edgeweave-slot{s}")
               for s in range(slots)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        done.wait(0.5)
        done.clear()
        if errors:  # report now: the others end once the leader aborts the generation
            raise errors[0]
    if errors:
        raise errors[0]


def _serve_slot(gstore: Any, ch: Channel, ranks: list[int], prefix: str, slot: int, state: FollowerState) -> None:
    from edgeweave.runtime.executor import execute_plan

    view = ch.view(ranks, slot)
    to_leader = ch.view(list(range(len(ch.names))), slot)
    k = 0
    while True:
        c = gstore.wait_read(f"{prefix}/{k}", writer="leader")
        k += 1
        if not isinstance(c, dict) or c.get("op") != "infer":
            return
        pid = int(c["plan_id"])
        if pid not in state.plans or state.ranks.get(pid) != ranks:
            raise EdgeweaveError(f"device {state.name!r} has no plan {pid} for its group {ranks}")
        prog = state.plans[pid]
        x = None
        if view.rank == 0 and ranks[0] != 0:  # the head: the frame comes from the leader
            x = to_leader.recv(torch.empty(prog.plan.input_shape), 0, TAG_FRAME, "a frame")
        y, timings = execute_plan(prog, x, view)
        if view.rank == 0 and ranks[0] != 0:
            assert y is not None
            to_leader.send(ordinary(y).contiguous(), 0, TAG_FRAME, "a frame's output")
        _send_timings(to_leader, timings)
