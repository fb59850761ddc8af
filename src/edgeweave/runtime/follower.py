"""The follower process (``edgeweave worker``): join the leader, hold the model, execute plans.

It decides nothing. It registers with the leader's store, joins each generation it is given a
rank in, and serves the leader's commands (``model``, ``plan``, ``infer``, ``end``) until the
leader shuts the cluster down or disappears. It refuses to compute with weights whose sha256
differs from the plan's ``model_hash``, whether the weights were shipped or loaded locally.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.layout import to_device_layout
from edgeweave.planning.plan import Plan
from edgeweave.runtime import rendezvous as rv
from edgeweave.runtime.wire import TAG_CONTROL, TAG_TIMING, Channel, PeerError


@dataclass
class FollowerState:
    """What survives from one generation to the next: the model and its hash."""

    name: str
    model: torch.nn.Module | None = None
    model_hash: str | None = None
    plans: dict[int, Any] = field(default_factory=dict)  # plan id -> engine.DeviceProgram
    graphs: dict[tuple[int, ...], Any] = field(default_factory=dict)  # input shape -> graph module
    gloo_host: str = ""


def _log(name: str, msg: str) -> None:
    print(f"[edgeweave worker {name}] {msg}", file=sys.stderr, flush=True)


def serve(leader: str, name: str | None = None, *, threads: int = 1, model_path: str | None = None,
          profile: dict[str, Any] | None = None, connect_timeout_s: float = 60.0) -> int:
    """Run a follower until the leader shuts the cluster down; returns an exit code."""
    torch.set_num_threads(max(1, threads))
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    host, port = rv.parse_address(leader)
    state = FollowerState(name)
    if model_path:
        from edgeweave.checkpoint import load_model, model_hash

        state.model, _spec = load_model(model_path)
        state.model = to_device_layout(state.model.eval())
        state.model_hash = model_hash(state.model)
    store = rv.connect_store(host, port, connect_timeout_s)
    state.gloo_host = rv.gloo_host_for(host, port)  # the interface that reaches the leader
    _preload()
    prof = dict(profile or {"name": name})
    prof["name"] = name
    registration = {"name": name, "pid": os.getpid(), "host": socket.gethostname(), "threads": threads,
                    "profile": prof, "model_hash": state.model_hash, "pinned": bool(model_path),
                    "profile_given": profile is not None, "leader_host": host}
    ticket = rv.register(store, registration)
    _log(name, f"registered with {host}:{port} (ticket {ticket})")
    gen, was_member = 0, False
    try:
        while True:
            info = rv.next_generation(store, gen, ticket)
            if info.get("shutdown"):
                store.set(f"{rv.ROOT}bye/{ticket}", "1")  # lets the leader's store outlive our last read
                _log(name, "leader shut the cluster down")
                return 0
            if ticket not in info.get("members", []):
                if was_member:
                    # Left out while alive: blamed for another's failure, or too slow (or stopped)
                    # to answer the leader's roll call. A registration once left out is never
                    # offered again, so offer ourselves anew; the leader takes newcomers in.
                    ticket = rv.register(store, registration)
                    was_member = False
                    _log(name, f"left out of generation {gen}; registered again (ticket {ticket})")
                gen += 1
                continue
            rank = info["members"].index(ticket) + 1
            try:
                _serve_generation(store, gen, rank, info, state)
            except EdgeweaveError as e:  # the group never formed (a member did not come): wait for the next
                _log(name, f"generation {gen}: {e}")
            rv.mark_left(store, gen, ticket)
            state.plans.clear()
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
    gstore = rv.gen_store(store, gen)

    def probe() -> str | None:
        if gstore.check(["abort"]):
            return f"the leader aborted generation {gen}: {gstore.get('abort').decode()[:300]}"
        return None

    pg = rv.make_group(store, gen, rank, len(names), timeout_s, state.gloo_host)
    ch = Channel(pg, rank, names, timeout_s, probe=probe)
    seq = 0
    while True:
        key = f"cmd/{seq}"
        rv.wait_key(gstore, key)
        cmd = rv.get_json(gstore, key)
        op = cmd.get("op")
        try:
            if op == "end":
                return
            if op == "model":
                _cmd_model(gstore, ch, seq, cmd, state)
            elif op == "plan":
                _cmd_plan(gstore, ch, seq, cmd, state)
            elif op == "infer":
                _cmd_infer(ch, cmd, state)
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
            if isinstance(e, PeerError) or op == "infer":
                # the message pattern of this generation is broken: report and leave it
                if isinstance(e, PeerError) and e.name:  # whom it blames: the leader's roll call stops waiting for it
                    gstore.set(f"blames/{rank}", e.name)
                gstore.set(f"err/{rank}", msg[:1000])
                return
        seq += 1


def _cmd_model(gstore: Any, ch: Channel, seq: int, cmd: dict[str, Any], state: FollowerState) -> None:
    from edgeweave.checkpoint import model_from_bytes, model_hash

    want = str(cmd["hash"])
    rank = ch.rank
    if rank in cmd.get("ship", []):
        data = ch.recv_bytes(0, TAG_CONTROL, "the model", max_bytes=int(cmd["nbytes"]))
        model, _spec, _extra = model_from_bytes(data, where=f"model shipped to {state.name}")
        state.model, state.model_hash = to_device_layout(model.eval()), model_hash(model)
        state.plans.clear()
        state.graphs.clear()
    if state.model_hash != want:
        have = state.model_hash[:12] if state.model_hash else "none"
        where = " (loaded from its --model path)" if cmd.get("ship") is not None and rank not in cmd["ship"] else ""
        raise EdgeweaveError(f"device {state.name!r} (rank {rank}) refuses the model: its weights{where} hash "
                             f"{have}... differs from the leader's {want[:12]}...")
    rv.set_json(gstore, f"ack/{seq}/{rank}", {"ok": True, "hash": state.model_hash})


def _cmd_plan(gstore: Any, ch: Channel, seq: int, cmd: dict[str, Any], state: FollowerState) -> None:
    from edgeweave.engine import prepare
    from edgeweave.planning.graph import capture

    text = ch.recv_bytes(0, TAG_CONTROL, "a plan").decode()
    plan = Plan.from_json(text)
    rank = ch.rank
    if state.model is None:
        raise EdgeweaveError(f"device {state.name!r} (rank {rank}) has no model to run the plan with")
    if plan.model_hash != state.model_hash:
        raise EdgeweaveError(f"device {state.name!r} (rank {rank}) refuses the plan: it was made for weights "
                             f"{plan.model_hash[:12]}... but this device holds {str(state.model_hash)[:12]}...")
    shape = tuple(plan.input_shape)
    if shape not in state.graphs:  # tracing costs seconds; plans for one shape share a graph
        state.graphs[shape] = capture(state.model, shape)
    gm = state.graphs[shape]
    prog = prepare(gm, plan, rank)  # compiled now: the first frame runs at this device's real speed
    state.plans[int(cmd["plan_id"])] = prog
    for p in cmd.get("drop", []):
        state.plans.pop(int(p), None)
    rv.set_json(gstore, f"ack/{seq}/{rank}", {"ok": True, "backend": prog.backend, "fallbacks": prog.fallbacks})


def _cmd_infer(ch: Channel, cmd: dict[str, Any], state: FollowerState) -> None:
    from edgeweave.runtime.executor import execute_plan

    pid = int(cmd["plan_id"])
    if pid not in state.plans:
        raise EdgeweaveError(f"device {state.name!r} has no plan {pid}")
    _out, timings = execute_plan(state.plans[pid], None, ch)
    t = torch.tensor([[s.wall_s, s.compute_s, s.begin, s.ready] for s in timings], dtype=torch.float64)
    ch.send(t, 0, TAG_TIMING, "timings")
