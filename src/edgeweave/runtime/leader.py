"""The leader side: a session over a cluster of followers that executes plans.

``LocalCluster(workers=K)`` starts K follower processes on loopback (one thread each) and always
tears them down; ``RemoteCluster(cluster)`` waits for followers started by hand with
``edgeweave worker --leader HOST:PORT --name NAME``. Both are context managers::

    with LocalCluster(workers=2) as cl:
        cl.load_model(model, spec)            # ships safetensors bytes; followers verify sha256
        plan = make_plan(capture(model, shape), cl.cluster, ...)   # planning decides
        pid = cl.load_plan(plan)
        y, timings = cl.infer(x, pid)

The leader is device 0 and computes its own strips. The session never decides anything: it
runs the plan it is given. Every wait is bounded by ``timeout_s`` and names the device that did
not answer; after such a failure the generation is aborted (followers leave it) and the session
refuses further work until :meth:`recover` (or :meth:`regroup`) starts a new generation with the
devices still alive.

With a cluster key (``key=``; by default the file ``EDGEWEAVE_KEY_FILE`` names, and a fresh
ephemeral key for a :class:`LocalCluster`) a follower is admitted only after it proves it holds
the key (``rendezvous.Gate``), and every control value is sealed (``auth.Control``); see
docs/security.md. Without one the leader listens on loopback only.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.limits import parse_address
from edgeweave.layout import device_copy, ordinary
from edgeweave.planning.plan import Plan
from edgeweave.profiling.profile import Cluster, DeviceProfile
from edgeweave import resident
from edgeweave.runtime import auth
from edgeweave.runtime import rendezvous as rv
from edgeweave.runtime.executor import FIELDS as TIMING_FIELDS, StageTiming, check_plan, execute_plan
from edgeweave.runtime.wire import (
    MAX_SLOTS,
    TAG_CONTROL,
    TAG_FRAME,
    TAG_TIMING,
    Channel,
    PeerError,
    wait_store_keys,
)


def _with_memory(profile: dict[str, Any], memory: Any) -> DeviceProfile:
    """A device's profile with the memory facts its process measured (resident.py)
    where the profile does not give them."""
    if isinstance(memory, dict):
        if not profile.get("memory_bytes") and isinstance(memory.get("memory_bytes"), int):
            profile = {**profile, "memory_bytes": max(0, memory["memory_bytes"])}
        meta = dict(profile.get("meta") or {})
        if "runtime_bytes" not in meta and isinstance(memory.get("runtime_bytes"), int):
            profile = {**profile, "meta": {**meta, "runtime_bytes": max(0, memory["runtime_bytes"])}}
    return DeviceProfile.from_dict(profile)


@dataclass
class Follower:
    ticket: int
    name: str
    info: dict[str, Any]
    process: subprocess.Popen | None = None  # set for local followers
    log_path: Path | None = None


@dataclass
class Timings:
    """Measured times of one inference: per stage and device, wall and compute seconds, and when
    (``start_s``, ``ready_s``: seconds from the leader's start) each stage began and its compute began."""

    total_s: float
    names: list[str]
    per_device: list[list[StageTiming]]  # [device][stage]; the last entry is the final transfers
    stage_kinds: list[str] = field(default_factory=list)

    def origins(self) -> list[float]:
        """Per device, the clock value that becomes 0 in :meth:`to_dict`: the leader's start of
        the inference. A follower whose clock is not the leader's (another machine: its stage 0
        does not begin within the inference as the leader saw it) is put on its own start."""
        lead = self.per_device[0][0].begin if self.per_device and self.per_device[0] else 0.0
        out = []
        for t in self.per_device:
            own = t[0].begin if t else 0.0
            out.append(lead if lead - 1.0 <= own <= lead + self.total_s + 1.0 else own)
        return out

    def to_dict(self) -> dict[str, Any]:
        n = len(self.stage_kinds)
        origin = self.origins()
        stages = []
        for s in range(n + 1):
            rows = [{"device": d, "name": self.names[d], "wall_s": t[s].wall_s, "compute_s": t[s].compute_s,
                     "comm_s": t[s].comm_s, "start_s": t[s].begin - origin[d] if t[s].begin else None,
                     "ready_s": t[s].ready - origin[d] if t[s].ready else None,
                     "cpu_s": t[s].cpu_s, "runtime_cpu_s": t[s].runtime_cpu_s}
                    for d, t in enumerate(self.per_device) if s < len(t)]
            stages.append({"index": s if s < n else "final", "kind": self.stage_kinds[s] if s < n else "final_transfers",
                           "wall_s": max((r["wall_s"] for r in rows), default=0.0),
                           "compute_s": max((r["compute_s"] for r in rows), default=0.0), "devices": rows})
        return {"total_s": self.total_s, "stages": stages, "runtime_cpu_per_stage_s": self.runtime_cpu_per_stage()}

    def runtime_cpu_per_stage(self) -> list[float]:
        """Per device, the CPU seconds the runtime itself cost it per stage of the plan
        (posting and waiting for transfers, assembling inputs, coding rows: its process's CPU
        over the inference minus its compute's), the final transfers counted with the stages."""
        n = max(len(self.stage_kinds), 1)
        return [sum(st.runtime_cpu_s for st in t) / n for t in self.per_device]


LEADER_GRACE_S = 2.0  # see Channel.grace_s

ENV_KEY = "env"  # key=ENV_KEY: the key of the file EDGEWEAVE_KEY_FILE names, if it is set
_security_log = logging.getLogger("edgeweave.security")


def _warn(msg: str) -> None:
    _security_log.warning(f"edgeweave leader: {msg}")

_LIVE: "weakref.WeakSet[Session]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - safety net for interpreter exit
    for s in list(_LIVE):
        s.close()


class Session:
    """A leader holding a TCPStore, a set of followers and one generation at a time."""

    def __init__(self, store: Any, leader_name: str = "leader", *, timeout_s: float = 60.0, gloo_host: str = "",
                 leader_profile: DeviceProfile | None = None, key: bytes | None = None,
                 allowed: set[str] | None = None):
        self.store = store
        # membership and control: ``key`` None is a loopback-only cluster (nothing is checked)
        self.ctl = auth.Control(key, writer="leader", session=auth.new_nonce(), log=_warn)
        self.sstore = rv.SealedStore(store, "", self.ctl)  # sealed values outside a generation
        self.gate = rv.Gate(store, self.ctl, allowed)
        self.leader_name = leader_name
        self.timeout_s = float(timeout_s)
        self.gloo_host = gloo_host
        self.leader_profile = leader_profile or DeviceProfile(name=leader_name)
        self.followers: list[Follower] = []
        self.gone: list[Follower] = []  # left out of a generation (dead or hung; local ones are reaped too)
        self._ticket_mark = -1  # the last ticket taken before the first generation
        self._dead_tickets: set[int] = set()  # registrations that stopped beating before they were taken in
        self.gen = -1
        self.seq = 0
        self.ch: Channel | None = None
        self.broken: str | None = None
        self.model: torch.nn.Module | None = None
        self.model_hash: str | None = None
        self._model_file: Any = None  # the model as shipped (a checkpoint in a nameless file)
        self._own_memory = {"memory_bytes": resident.limit_bytes()}  # its own bytes hold the user's model: not measured
        self.plans: dict[int, tuple[Plan, Any]] = {}  # plan id -> (plan, graph module)
        # plan id -> the leader's compiled share (engine.prepare) and what every device runs it on
        self.programs: dict[int, Any] = {}
        self.backends: dict[int, list[dict[str, Any]]] = {}
        self.ranks: dict[int, list[int] | None] = {}  # plan id -> the ranks of its devices (None: device i is rank i)
        self._groups: list[list[int]] | None = None  # open_groups(): the groups serving frames now
        self._gseq: list[list[int]] = []  # group -> slot -> the next command's number
        self._gviews: list[list[Channel]] = []  # group -> slot -> the leader's view of the group
        self._glock = threading.Lock()
        self._opening = 0  # open_groups calls so far (their command keys never meet)
        self._next_plan = 0
        self._closed = False
        _LIVE.add(self)

    # -- membership --------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [self.leader_name] + [f.name for f in self.followers]

    @property
    def world(self) -> int:
        return 1 + len(self.followers)

    @property
    def cluster(self) -> Cluster:
        """Device profiles in rank order (device 0 = leader), for the planner."""
        devs = [_with_memory(self.leader_profile.to_dict(), self._own_memory)]
        for f in self.followers:
            p = dict(f.info.get("profile") or {})
            p["name"] = f.name
            devs.append(_with_memory(p, f.info.get("memory")))
        return Cluster(devs)

    def who(self, rank: int) -> str:
        return f"device {self.names[rank]!r} (rank {rank})"

    def security(self) -> dict[str, Any]:
        """Whether the cluster is keyed, and what its door and its readers turned away."""
        return {"keyed": self.ctl.keyed, "key_fingerprint": auth.fingerprint(self.ctl.key),
                "members_refused": self.gate.refusals, "control_forged": self.ctl.forged,
                "refusals": [r.to_dict() for r in self.gate.refused[-16:]]}

    def _writer(self, rank: int) -> str:
        """Who must have sealed a report of ``rank`` (its registration's ticket)."""
        return f"t{self.followers[rank - 1].ticket}"

    def _wait_registrations(self, expect: list[str] | int, timeout_s: float) -> list[Follower]:
        """Followers by name (in the given order) or the first ``expect`` to register."""
        deadline = time.monotonic() + timeout_s
        while True:
            regs = dict(self.gate.poll())  # admitted only: they proved they hold the key
            by_name: dict[str, tuple[int, dict[str, Any]]] = {}
            for t, info in sorted(regs.items()):  # a device that registers again (restarted) wins
                by_name[str(info.get("name"))] = (t, info)
            if isinstance(expect, int):
                if len(regs) >= expect:
                    items = sorted(regs.items())[:expect]
                    return [Follower(t, str(i.get("name")), i) for t, i in items]
                missing_desc = f"{expect - len(regs)} of {expect} followers"
            else:
                missing = [n for n in expect if n not in by_name]
                if not missing:
                    return [Follower(by_name[n][0], n, by_name[n][1]) for n in expect]
                missing_desc = "followers " + ", ".join(repr(n) for n in missing)
            reason = self._probe_processes()
            if reason:
                raise PeerError(f"waiting for followers to register: {reason}")
            if time.monotonic() > deadline:
                raise PeerError(f"{missing_desc} did not register within {timeout_s:g} s")
            time.sleep(0.05)

    def newcomers(self, beat_wait_s: float = 4 * rv.BEAT_S) -> list[str]:
        """Devices that registered after the session started and are not in it (a board
        started late, or one that came back with a new registration), and whose process still
        runs: candidates for ``regroup(join=...)``. A registration once left out (``gone``) is
        never offered again. One store call when there are none.

        Alive means its beat counter moves (a waiting follower beats every ``rv.BEAT_S``); a
        registration whose counter does not move within ``beat_wait_s`` is dropped for good (a
        board that died before it was taken in; if it restarts it registers anew). Taking a dead
        one in would cost a whole group time-out."""
        admitted = self.gate.poll()  # one store call when nothing is new
        taken = {f.ticket for f in self.followers + self.gone} | self._dead_tickets
        latest: dict[str, int] = {}  # name -> its newest registration
        for t, info in sorted(admitted.items()):
            if t <= self._ticket_mark or t in taken:
                continue
            name = str(info.get("name"))
            if name not in self.names:
                latest[name] = t
        if not latest:
            return []
        first = rv.beats(self.store, list(latest.values()))
        waiting = set(latest.values())
        deadline = time.monotonic() + beat_wait_s
        while waiting and time.monotonic() < deadline:
            time.sleep(rv.BEAT_S / 5)
            now = rv.beats(self.store, list(waiting))
            waiting -= {t for t, c in now.items() if c > first[t]}
        self._dead_tickets |= waiting
        return [name for name, t in latest.items() if t not in waiting]

    def _start_generation(self) -> None:
        if self._ticket_mark < 0:  # registrations older than the session are not newcomers
            self._ticket_mark = int(self.store.add(rv.ROOT + "tickets", 0))
        self.gen = rv.latest_generation(self.store)
        self.seq = 0
        info = {"members": [f.ticket for f in self.followers], "names": self.names, "timeout_s": self.timeout_s}
        rv.publish_generation(self.sstore, self.gen, info)
        self.gstore = rv.SealedStore(rv.gen_store(self.store, self.gen), rv.gen_scope(self.gen), self.ctl)
        try:
            pg = rv.make_group(self.store, self.gen, 0, self.world, self.timeout_s, self.gloo_host)
        except EdgeweaveError as e:  # a member never came; recover() can go on without it
            self.ch, self.broken = None, str(e)
            raise
        self.ch = Channel(pg, 0, self.names, self.timeout_s, probe=self._probe, grace_s=LEADER_GRACE_S)
        self.broken = None
        self.plans, self.programs, self.backends, self.ranks = {}, {}, {}, {}
        self._groups = None

    def regroup(self, alive: list[str] | None = None, join: list[str] = (), join_timeout_s: float = 60.0) -> None:
        """Start a new generation: the followers named in ``alive`` (default: every follower
        except local ones whose process has exited; name remote survivors explicitly) plus the
        devices named in ``join`` (followers that registered since, e.g. a board that came
        back; waited for up to ``join_timeout_s``). They take the next ranks in that order.
        Plans must be loaded again; the model is re-verified and shipped to newcomers."""
        if self._closed:
            raise EdgeweaveError("the cluster session is closed")
        if self.ch is not None and self.broken is None:
            self._command({"op": "end"})
        keep = [f for f in self.followers if (alive is None and (f.process is None or f.process.poll() is None))
                or (alive is not None and f.name in alive)]
        taken = {f.ticket for f in keep}
        if join:
            new = self._wait_registrations(list(join), join_timeout_s)
            clash = [f.name for f in new if f.ticket in taken or f.name in {k.name for k in keep}]
            if clash:
                raise EdgeweaveError(f"cannot add {clash}: already members of the cluster")
            keep = keep + new
        self.gone += [f for f in self.followers if f not in keep]
        self.followers = keep
        self._start_generation()
        if self.model is not None:
            self._ship_model()

    # -- health ------------------------------------------------------------------------------
    def _probe_processes(self) -> str | None:
        for r, f in enumerate(self.followers, start=1):
            if f.process is not None and f.process.poll() is not None:
                return f"the process of {self.who(r)} exited with code {f.process.returncode}{self._log_tail(f)}"
        return None

    def _probe(self) -> str | None:
        reason = self._probe_processes()
        if reason:
            return reason
        reports = [f"{self.who(r)} reported: {err}" for r in range(1, self.world)
                   if (err := self.gstore.read_if_set(f"err/{r}", self._writer(r))) is not None]  # forged: ignored
        return "; ".join(reports) or None

    @staticmethod
    def _log_tail(f: Follower) -> str:
        if f.log_path is None or not f.log_path.exists():
            return ""
        lines = [ln for ln in f.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return f" (its last log line: {lines[-1][:200]})" if lines else ""

    def _fail(self, e: PeerError) -> None:
        """Abort this generation so followers stop waiting, and refuse work until regroup().
        The abort reaches followers inside a command; an ``end`` reaches those between two."""
        self.broken = str(e)
        try:
            rv.set_json(self.gstore, "abort", str(e)[:1000])
            self.close_groups()
            self._command({"op": "end"})
        except Exception:  # noqa: BLE001 - the store is ours; this should not fail
            pass

    def recover(self, wait_s: float | None = None, suspects: Sequence[str] = ()) -> list[str]:
        """After a failure, go on with the followers that are still there: a new generation
        of every follower that left the broken one (each marks it when it does) within
        ``wait_s`` (default: the time-out). One whose process exited, or that hung or lost its
        link, is left out. The wait ends early once only ``suspects`` (the device the failure
        named) and devices a follower blamed are missing, so a dead board costs no time-out.
        Returns the names left out; plans must be loaded again."""
        if self._closed:
            raise EdgeweaveError("the cluster session is closed")
        self._fail(PeerError(self.broken or "the leader regroups the cluster"))  # everyone leaves
        start = time.monotonic()
        deadline = start + (self.timeout_s if wait_s is None else wait_s)

        def running(f: Follower) -> bool:
            return f.process is None or f.process.poll() is None

        blamed = set(suspects)
        while True:
            pending = [f for f in self.followers if running(f) and not rv.has_left(self.sstore, self.gen, f.ticket)]
            blamed |= {str(b) for r in range(1, self.world)
                       if (b := self.gstore.read_if_set(f"blames/{r}", self._writer(r))) is not None}
            now = time.monotonic()  # half a second for the blamed to mark anyway (a wrong blame loses a board)
            if not pending or now > deadline or (now > start + 0.5 and {f.name for f in pending} <= blamed):
                break
            time.sleep(0.02)
        late = {f.name for f in pending}
        alive = [f.name for f in self.followers if running(f) and f.name not in late]
        lost = [f.name for f in self.followers if f.name not in alive]
        self.regroup(alive=alive)
        return lost

    def _check_usable(self) -> Channel:
        if self._closed:
            raise EdgeweaveError("the cluster session is closed")
        if self.broken is not None or self.ch is None:
            raise EdgeweaveError(f"the cluster is unusable after a failure ({self.broken}); call regroup()")
        return self.ch

    # -- commands ----------------------------------------------------------------------------
    def _command(self, cmd: dict[str, Any]) -> int:
        seq = self.seq
        self.seq += 1
        rv.set_json(self.gstore, f"cmd/{seq}", cmd)  # sealed: followers ignore a command we did not write
        return seq

    def _forget_key(self, key: str) -> None:
        try:
            self.gstore.delete_key(key)
        except Exception:  # noqa: BLE001 - best effort, as in _forget
            pass

    def _forget(self, seq: int, keys: Sequence[str] = ()) -> None:
        """Delete command ``seq`` (and ``keys``) from the store once every follower has read it.

        Why: the store lives in the leader's memory for the whole generation, and a server runs
        one command per request for weeks; kept, they grew it by a key per frame. Best effort: a
        store that fails here fails the next command, which says why; this answer is good."""
        try:
            for k in (f"cmd/{seq}", *keys):
                self.gstore.delete_key(k)
        except Exception:  # noqa: BLE001
            pass

    def _await_acks(self, seq: int, what: str) -> list[dict[str, Any]]:
        keys = [f"ack/{seq}/{r}" for r in range(1, self.world)]
        got: dict[str, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while True:  # an answer that fails the check (forged) is logged and waited past
            missing = [k for k in keys if k not in got]
            wait_store_keys(self.gstore, missing, timeout_s=max(0.0, deadline - time.monotonic()), probe=self._probe,
                            describe_missing=lambda m: ", ".join(self.who(int(k.rsplit("/", 1)[1])) for k in m)
                            + f" ({what})")
            for k in missing:
                a = self.gstore.read(k, self._writer(int(k.rsplit("/", 1)[1])))
                if isinstance(a, dict):
                    got[k] = a
            if len(got) == len(keys):
                break
            if time.monotonic() > deadline:
                bad = ", ".join(self.who(int(k.rsplit("/", 1)[1])) for k in keys if k not in got)
                raise PeerError(f"{bad} ({what}): only answers that fail the check within {self.timeout_s:g} s")
            time.sleep(0.02)
        acks = [got[k] for k in keys]
        self._forget(seq, keys)  # every follower acknowledged: all have read the command
        for r, a in enumerate(acks, start=1):
            if not a.get("ok"):
                raise EdgeweaveError(f"{self.who(r)} failed to {what}: {a.get('error')}")
        return acks

    def ping(self) -> None:
        self._check_usable()
        self._await_acks(self._command({"op": "ping"}), "answer a ping")

    def load_model(self, model: torch.nn.Module, spec: Any, extra: dict[str, Any] | None = None) -> str:
        """Ship ``model`` (a checkpoint: safetensors + JSON metadata) to followers that lack it;
        every follower verifies the sha256 of what it holds. Returns the hash. The checkpoint is
        kept in a nameless file for followers that join later, not in memory.

        ``model`` is put in eval mode; the leader computes with a copy of its 4-D weights in the
        devices' memory layout (``layout.device_copy``) and leaves ``model`` as it was."""
        from edgeweave.checkpoint import model_hash, scratch_dir, write_checkpoint

        self._check_usable()
        model.eval()
        if self._model_file is not None:
            self._model_file.close()
        self.model_hash = model_hash(model)
        self._model_file = tempfile.TemporaryFile(dir=scratch_dir())  # gone with the process, however it ends
        write_checkpoint(self._model_file, model, spec, extra, digest=self.model_hash)
        self._model_file.flush()
        self.model = device_copy(model)
        # what followers are told: keyed tags (the hash itself never goes to the store)
        self._model_tags = (self.ctl.tag("model", self.model_hash), self.ctl.tag_file("model-bytes", self._model_file))
        self._graphs: dict[tuple[int, ...], Any] = {}
        self.plans, self.programs, self.backends, self.ranks = {}, {}, {}, {}  # plans name the old weights' hash; followers dropped theirs too
        self._ship_model()
        return self.model_hash

    def _ship_model(self) -> None:
        ch = self._check_usable()
        # followers started with --model PATH are pinned to their local weights: they must match
        tag, bytes_tag = self._model_tags
        ship = [r for r, f in enumerate(self.followers, start=1)
                if f.info.get("model_tag") != tag and not f.info.get("pinned")]
        nbytes = os.fstat(self._model_file.fileno()).st_size
        seq = self._command({"op": "model", "tag": tag, "bytes": bytes_tag, "nbytes": nbytes, "ship": ship})
        try:
            for r in ship:
                ch.send_file(self._model_file, r, TAG_CONTROL, "the model")
            self._await_acks(seq, "accept the model")
        except PeerError as e:
            self._fail(e)
            raise
        for r in ship:
            self.followers[r - 1].info["model_tag"] = tag

    def load_plan(self, plan: Plan, drop: Sequence[int] = (), ranks: Sequence[int] | None = None) -> int:
        """Send ``plan`` (JSON text) to the followers that run it; they check its model hash and
        capture the graph. Returns the plan id for :meth:`infer`. Plans ``drop`` are forgotten on
        every device with the same command (a long stream re-plans; each plan kept costs memory on
        every board).

        ``ranks``: the plan runs on these devices (device i of the plan is rank ``ranks[i]``), a
        group of :meth:`open_groups`; the leader, when among them, is the plan's device 0. By
        default device i is rank i and the plan uses the first k devices (the others sit it out)."""
        from edgeweave.engine import prepare
        from edgeweave.models.multi_exit import exit_part
        from edgeweave.planning.graph import capture

        ch = self._check_usable()
        if self.model is None:
            raise EdgeweaveError("load_model() before load_plan()")
        if self._groups is not None:
            raise EdgeweaveError("close_groups() before loading a plan: the devices are serving frames")
        if plan.model_hash != self.model_hash:
            raise EdgeweaveError(f"the plan was made for weights {plan.model_hash[:12]}..., the session holds "
                                 f"{str(self.model_hash)[:12]}...")
        if ranks is None:
            if list(plan.devices) != self.names[: len(plan.devices)] or not plan.devices:
                raise EdgeweaveError(f"the plan's devices {plan.devices} are not the cluster's {self.names} "
                                     "(or a prefix of them), in rank order")
            members = list(range(self.world))
        else:
            members = [int(r) for r in ranks]
            if (len(members) != len(plan.devices) or len(set(members)) != len(members)
                    or not all(0 <= r < self.world for r in members)
                    or [self.names[r] for r in members] != list(plan.devices)
                    or (0 in members and members[0] != 0)):
                raise EdgeweaveError(f"the plan's devices {plan.devices} are not ranks {members} of the cluster "
                                     f"{self.names} (the leader, when in a plan, is its device 0)")
        check_plan(plan)
        pid = self._next_plan
        self._next_plan += 1
        text = plan.to_json().encode()
        drop = [int(p) for p in drop if p in self.plans]
        seq = self._command({"op": "plan", "plan_id": pid, "nbytes": len(text), "drop": drop,
                             "ranks": None if ranks is None else members, "tag": self.ctl.tag("plan", text)})
        try:
            for r in members:
                if r != 0:
                    ch.send_bytes(text, r, TAG_CONTROL, "the plan")
            # the leader's share of the preparation, while the followers prepare theirs
            part = plan.meta.get("part")  # a piece of a multi-exit model (runtime/exits.py), or the whole
            shape = (tuple(plan.input_shape), repr(part))
            if shape not in self._graphs:
                self._graphs[shape] = capture(exit_part(self.model, part), tuple(plan.input_shape))
            prog = prepare(self._graphs[shape], plan, 0) if members[0] == 0 else None
            acks = self._await_acks(seq, "accept the plan")
        except PeerError as e:
            self._fail(e)
            raise
        self.plans[pid] = (plan, self._graphs[shape])
        self.programs[pid] = prog
        self.ranks[pid] = None if ranks is None else members
        mine = [{"backend": prog.backend, "fallbacks": prog.fallbacks}] if prog is not None else []
        self.backends[pid] = mine + [{"backend": a.get("backend", "torch"), "fallbacks": list(a.get("fallbacks", []))}
                                     for a in acks if a.get("member", True)]
        for p in drop:
            del self.plans[p]
            self.programs.pop(p, None)
            self.backends.pop(p, None)
            self.ranks.pop(p, None)
        return pid

    # -- groups: frames in flight ------------------------------------------------------------
    def open_groups(self, groups: Sequence[Sequence[int]], slots: int = 1) -> None:
        """Divide the devices into ``groups`` (lists of ranks, disjoint; the leader, when in one,
        first) that serve frames at the same time: from now on :meth:`infer` of a plan loaded
        with ``ranks`` equal to a group runs on that group only, and calls for different groups
        may run at once (one thread each). With ``slots`` > 1 every group takes that many frames
        at once (``infer(..., slot=s)``): each device computes them on as many threads, so one
        frame's computing fills another's waits for its neighbours' rows. Plans cannot be loaded
        until :meth:`close_groups`."""
        self._check_usable()
        gs = [[int(r) for r in g] for g in groups]
        flat = [r for g in gs for r in g]
        if (not gs or any(not g for g in gs) or len(set(flat)) != len(flat)
                or not all(0 <= r < self.world for r in flat) or any(0 in g and g[0] != 0 for g in gs)):
            raise EdgeweaveError(f"groups {gs} must be disjoint, non-empty lists of ranks 0..{self.world - 1}, "
                                 "the leader first in its group")
        if not 1 <= slots <= MAX_SLOTS:
            raise EdgeweaveError(f"slots must be 1..{MAX_SLOTS}, got {slots}")
        if self._groups is not None:
            self.close_groups()
        # every opening has its own keys: an old opening's "end" must not end a new sequence early
        self._opening += 1
        self._command({"op": "groups", "groups": gs, "slots": slots, "opening": self._opening})
        self._groups, self._gseq = gs, [[0] * slots for _ in gs]
        self._gviews = [[self.ch.view(g if 0 in g else [0] + g, s) for s in range(slots)]  # type: ignore[union-attr]
                        for g in gs]

    @property
    def slots(self) -> int:
        """Frames each open group takes at once (0: no groups open)."""
        return len(self._gseq[0]) if self._groups is not None and self._gseq else 0

    def close_groups(self) -> None:
        """End every group's sequence: the followers go back to the generation's commands."""
        if self._groups is None:
            return
        with self._glock:
            for g, seqs in enumerate(self._gseq):
                for slot, k in enumerate(seqs):
                    rv.set_json(self.gstore, self._group_key(g, slot, k), {"op": "end"})
                    seqs[slot] += 1
            self._groups = None

    def _group_key(self, g: int, slot: int, k: int) -> str:
        return f"o{self._opening}/g{g}.{slot}/{k}"

    def _group_of(self, ranks: list[int]) -> int:
        if self._groups is None or ranks not in self._groups:
            raise EdgeweaveError(f"the plan runs on ranks {ranks}: open_groups() with that group first")
        return self._groups.index(ranks)

    def _infer_group(self, x: torch.Tensor, plan_id: int, plan: Plan, ranks: list[int], slot: int
                     ) -> tuple[Any, list[Any]]:
        """One frame on a group: the leader computes as the group's head, or sends the frame to
        the head and receives the output; every member sends its timings to the leader."""
        g = self._group_of(ranks)
        with self._glock:
            k = self._gseq[g][slot]
            self._gseq[g][slot] += 1
        key = self._group_key(g, slot, k)
        rv.set_json(self.gstore, key, {"op": "infer", "plan_id": plan_id})
        view = self._gviews[g][slot]
        n = len(plan.stages) + 1
        others = [i for i in range(1, len(view.names))]
        bufs = {i: torch.zeros(n, TIMING_FIELDS, dtype=torch.float64) for i in others}
        posted = {i: view.irecv(t, i, TAG_TIMING) for i, t in bufs.items()}
        if ranks[0] == 0:
            y, mine = execute_plan(self.programs[plan_id], x, view)
            per_device = [mine]
        else:
            out = torch.empty(plan.stages[-1].output_shape)
            got = view.irecv(out, 1, TAG_FRAME)
            view.send(x.contiguous(), 1, TAG_FRAME, "a frame")
            view.wait(got, 1, "receiving a frame's output")
            y, per_device = out, []
        for i, t in bufs.items():
            view.wait(posted[i], i, "receiving timings")
            per_device.append([StageTiming(*[float(v) for v in row]) for row in t.tolist()])
        self._forget_key(key)
        return y, per_device

    def infer(self, x: torch.Tensor, plan_id: int | None = None, slot: int = 0) -> tuple[torch.Tensor, Timings]:
        """Run one input through the cluster with a loaded plan (default: the last one); a
        group's plan on the group's ``slot`` (:meth:`open_groups`)."""
        ch = self._check_usable()
        if plan_id is None:
            if not self.plans:
                raise EdgeweaveError("no plan loaded: call load_plan(plan) first")
            plan_id = max(self.plans)
        if plan_id not in self.plans:
            raise EdgeweaveError(f"no plan {plan_id} in this generation; loaded: {sorted(self.plans)}")
        plan, gm = self.plans[plan_id]
        if list(x.shape) != list(plan.input_shape):  # before followers start waiting for rows
            raise EdgeweaveError(f"plan {plan_id} was made for input shape {plan.input_shape}, got {list(x.shape)}")
        t0 = time.perf_counter()
        ranks = self.ranks.get(plan_id)
        if ranks is not None:
            self._group_of(ranks)  # refused before anything is sent
            if not 0 <= slot < self.slots:
                raise EdgeweaveError(f"slot {slot}: the groups take {self.slots} frames at once")
            try:
                y, per_device = self._infer_group(x.detach().to(torch.float32), plan_id, plan, ranks, slot)
            except PeerError as e:
                self._fail(e)
                raise
            except BaseException as e:
                self._fail(PeerError(f"the leader failed during inference: {type(e).__name__}: {e}"))
                raise
            assert y is not None
            return ordinary(y), Timings(time.perf_counter() - t0, list(plan.devices), per_device,
                                        [s.kind for s in plan.stages])
        seq = self._command({"op": "infer", "plan_id": plan_id})
        try:
            # timings are posted first so that they are in by the time the leader's part ends
            n = len(plan.stages) + 1
            bufs = {r: torch.zeros(n, TIMING_FIELDS, dtype=torch.float64) for r in range(1, self.world)}
            posted = {r: ch.irecv(t, r, TAG_TIMING) for r, t in bufs.items()}
            y, mine = execute_plan(self.programs[plan_id], x.detach().to(torch.float32), ch)
            per_device = [mine]
            for r, t in bufs.items():
                ch.wait(posted[r], r, "receiving timings")
                per_device.append([StageTiming(*[float(v) for v in row]) for row in t.tolist()])
        except PeerError as e:
            self._fail(e)
            raise
        except BaseException as e:  # the leader's own part failed (or Ctrl-C): followers must not wait
            self._fail(PeerError(f"the leader failed during inference: {type(e).__name__}: {e}"))
            raise
        total = time.perf_counter() - t0
        self._forget(seq)  # every follower sent its timings: all have read the command
        assert y is not None
        return ordinary(y), Timings(total, self.names, per_device, [s.kind for s in plan.stages])

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """End the generation and tell followers to exit (local ones are also reaped)."""
        if self._closed:
            return
        self._closed = True
        if self._model_file is not None:
            self._model_file.close()
        try:
            if self.ch is not None and self.broken is None:
                self._command({"op": "end"})
            rv.publish_generation(self.sstore, rv.latest_generation(self.store), {"shutdown": True})
            # keep the store (ours) up until every follower has read the shutdown
            byes = [(f"{rv.ROOT}bye/{f.ticket}", f"t{f.ticket}") for f in self.followers if f.ticket >= 0]
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not all(self.sstore.read_if_set(k, w) is True for k, w in byes):
                if self._probe_processes():
                    break
                time.sleep(0.02)
        except Exception:  # noqa: BLE001 - best effort; local processes are killed below anyway
            pass
        self._reap()
        self.ch = None
        _LIVE.discard(self)

    def _reap(self) -> None:
        pass

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the follower gets SIGKILL if the leader dies, so no orphan survives a crash."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


KEEP_LOGS_ENV = "EDGEWEAVE_KEEP_WORKER_LOGS"  # set (to 1): a failed LocalCluster keeps its followers' logs
_LOG_PREFIX = "edgeweave-workers-"


def _keep_worker_logs() -> bool:
    return os.environ.get(KEEP_LOGS_ENV, "") not in ("", "0")


def _worker_log_dir() -> Path:
    """A fresh folder for the followers' logs, named after this process; folders left by leaders
    that are gone (killed before they could clean up, e.g. out of memory) are removed first,
    unless kept on request (``KEEP_LOGS_ENV``)."""
    tmp = Path(tempfile.gettempdir())
    if not _keep_worker_logs():
        for d in tmp.glob(f"{_LOG_PREFIX}*-*"):
            pid = d.name[len(_LOG_PREFIX):].split("-", 1)[0]
            try:
                if not pid.isdigit() or d.stat().st_uid != os.getuid() or (d / "KEPT").exists():
                    continue
                os.kill(int(pid), 0)  # its leader still runs
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)
            except OSError:
                continue
    return Path(tempfile.mkdtemp(prefix=f"{_LOG_PREFIX}{os.getpid()}-"))


class LocalCluster(Session):
    """K follower processes on loopback, one thread each; always torn down (see module doc).

    ``key``: the cluster key; by default the one ``EDGEWEAVE_KEY_FILE`` names or, when it is not
    set, a fresh one for this cluster only, handed to the followers it starts through a private
    file (``key_file``; start another follower for it with ``EDGEWEAVE_KEY_FILE`` set to that).
    ``None``: no key (nothing is authenticated)."""

    def __init__(self, workers: int, *, timeout_s: float = 60.0, start_timeout_s: float = 120.0,
                 profiles: Cluster | None = None, threads: int = 1, extra_args: dict[str, list[str]] | None = None,
                 key: bytes | str | None = ENV_KEY, model_bytes: int = 0):
        from edgeweave.limits import check_followers_fit

        from_env = isinstance(key, str) and bool(os.environ.get(auth.KEY_ENV))
        if isinstance(key, str):  # ENV_KEY
            key = auth.key_from_env() or auth.generate_key()
        if workers < 0:
            raise EdgeweaveError(f"--workers must be >= 0, got {workers}")
        if profiles is not None and len(profiles.devices) != workers + 1:
            raise EdgeweaveError(f"the cluster file describes {len(profiles.devices)} devices; with --workers {workers} "
                                 f"it needs {workers + 1} (the leader first)")
        check_followers_fit(workers, model_bytes)  # before any process starts (model_bytes: what each will hold)
        devs = profiles.devices if profiles is not None else Cluster.uniform(workers + 1).devices
        store = rv.host_store("127.0.0.1", 0, start_timeout_s)
        super().__init__(store, devs[0].name, timeout_s=timeout_s, gloo_host="127.0.0.1", leader_profile=devs[0],
                         key=key)
        self.port = int(store.port)
        self.log_dir = _worker_log_dir()  # followers' stdout/stderr, removed when the cluster closes
        self._key_dir: Path | None = None
        self.key_file: str | None = None
        procs: list[Follower] = []
        try:
            import json

            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                       TORCH_CPP_LOG_LEVEL=os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"))
            env.pop("GLOO_SOCKET_IFNAME", None)  # everyone binds 127.0.0.1 (the route to the leader)
            if from_env:
                self.key_file = os.environ[auth.KEY_ENV]
            elif key is not None:  # the followers read it from a file only this user can open
                self._key_dir = Path(tempfile.mkdtemp(prefix="edgeweave-key-"))
                self.key_file = str(auth.write_key(self._key_dir / "cluster.key", key))
            env.pop(auth.KEY_ENV, None)
            if self.key_file is not None:
                env[auth.KEY_ENV] = self.key_file
            for i, dev in enumerate(devs[1:], start=1):
                log = self.log_dir / f"{dev.name}.log"
                cmd = [sys.executable, "-m", "edgeweave", "worker", "--leader", f"127.0.0.1:{self.port}",
                       "--name", dev.name, "--threads", str(threads), "--profile-json", json.dumps(dev.to_dict())]
                cmd += (extra_args or {}).get(dev.name, [])
                with open(log, "wb") as fh:
                    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True,
                                         preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)
                procs.append(Follower(-1, dev.name, {}, p, log))
            self.followers = procs  # so that probes and _reap see the processes
            regs = self._wait_registrations([d.name for d in devs[1:]], start_timeout_s)
            for f, r in zip(procs, regs):
                f.ticket, f.info = r.ticket, r.info
            self._start_generation()
        except BaseException:
            self.followers = procs
            self.close()
            raise

    def _fail(self, e: PeerError) -> None:
        super()._fail(e)
        e.args = (f"{e} [follower logs kept in {self.log_dir}]" if _keep_worker_logs() else
                  f"{e} [{KEEP_LOGS_ENV}=1 keeps the followers' logs]",)

    @property
    def pids(self) -> list[int]:
        return [f.process.pid for f in self.followers if f.process is not None]

    def _reap(self) -> None:
        procs = [f.process for f in self.followers + self.gone if f.process is not None]
        deadline = time.monotonic() + 5.0
        for p in procs:
            try:
                p.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in procs if p.poll() is None]
            for p in alive:
                try:
                    os.killpg(p.pid, sig)  # the follower's own session: its children go too
                except (ProcessLookupError, PermissionError):
                    pass
            for p in alive:
                try:
                    p.wait(timeout=3.0)
                except subprocess.TimeoutExpired:
                    pass
        if self.broken is None or not _keep_worker_logs():  # kept after a failure only when asked
            shutil.rmtree(self.log_dir, ignore_errors=True)
        else:
            (self.log_dir / "KEPT").touch()  # not swept by the next LocalCluster
        if getattr(self, "_key_dir", None) is not None:  # an ephemeral key goes with its cluster
            shutil.rmtree(self._key_dir, ignore_errors=True)


class RemoteCluster(Session):
    """Followers started by hand (``edgeweave worker --leader HOST:PORT --name NAME``).

    ``cluster`` lists the devices (the first is the leader); the session listens on ``listen``
    and waits up to ``start_timeout_s`` for every named follower to register. Only those names
    are admitted, and with a ``key`` (default: the file ``EDGEWEAVE_KEY_FILE`` names) only
    followers that prove they hold it; without a key ``listen`` must be a loopback address.
    """

    def __init__(self, cluster: Cluster | str | Path, listen: str = "0.0.0.0:29400", *, timeout_s: float = 60.0,
                 start_timeout_s: float = 300.0, key: bytes | str | None = ENV_KEY):
        cl = cluster if isinstance(cluster, Cluster) else Cluster.load(cluster)
        host, port = parse_address(listen)
        key = auth.key_from_env() if isinstance(key, str) else key
        auth.require_key_or_loopback(host, key, "leader")
        if key is None:
            _warn(f"no cluster key: followers are not authenticated, so the leader listens on {host} (loopback) only")
        store = rv.host_store(host, port, start_timeout_s)
        super().__init__(store, cl.devices[0].name, timeout_s=timeout_s, leader_profile=cl.devices[0], key=key,
                         allowed={d.name for d in cl.devices[1:]})
        self.port = int(store.port)
        try:
            self.followers = self._wait_registrations([d.name for d in cl.devices[1:]], start_timeout_s)
            self.gloo_host = self._own_address(host)
            self._profiles = {d.name: d for d in cl.devices}
            for f in self.followers:  # a profile the follower measured (--profile) wins over the file's
                if not f.info.get("profile_given"):
                    f.info["profile"] = self._profiles[f.name].to_dict()
            self._start_generation()
        except BaseException:
            self.close()
            raise

    def _own_address(self, listen_host: str) -> str:
        """Where gloo should bind: the listen address if specific; else the address the
        followers used to reach us, when they agree and it is an IP of this machine."""
        if os.environ.get("GLOO_SOCKET_IFNAME"):
            return ""
        if listen_host not in ("0.0.0.0", "::", ""):
            return listen_host
        seen = {str(f.info.get("leader_host", "")) for f in self.followers}
        if len(seen) == 1:
            (addr,) = seen
            try:
                import socket

                with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((addr, 0))  # succeeds only for an address of this machine
                return addr
            except OSError:
                pass
        return ""
