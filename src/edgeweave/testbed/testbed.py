"""The emulated edge cluster on one Linux host: namespaces, shaped links, CPU and memory caps.

``Testbed.up(spec)`` builds one network namespace per device on a Linux bridge (each with its
own address in a private subnet that exists only inside this machine), shapes both ends of each
device's veth with tbf, and makes cgroup v1 groups for its CPU cap (10 ms period) and memory
cap. ``testbed.exec(device, argv)`` starts a process inside that device's cgroups *and*
namespace; ``set_cpu`` changes a cap while processes run; ``down()`` removes everything.

Why these choices (ENVIRONMENT.md has the measurements):
- plain iproute2/tc/cgroupfs driven from Python, not Mininet: Mininet's clean-up leaves cgroups
  and bridges behind and its CPU setting is a share of the whole machine;
- every object carries the spec's prefix, so ``down(prefix)`` finds them by name after a crash,
  with no state needed (a state file under /run/edgeweave only adds memory-cgroup paths and
  worker pids, and lets ``status`` / ``set_cpu`` work from another process);
- the resolver trick: /etc/netns/<ns>/resolv.conf points at 127.0.0.1 and /etc/netns/<ns>/hosts
  names every device, so c10d's reverse look-up fails at once instead of stalling 6-12 s;
- GLOO_SOCKET_IFNAME is set for every process started in a namespace (without it gloo resolves
  the hostname to 127.0.0.1 and fails to connect the mesh).

Without root, ``ip``/``tc`` or the cgroup v1 cpu controller the testbed falls back to loopback
processes with thread limits and says so (``emulated`` is False, ``reason`` says why): links and
CPUs are then NOT emulated.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from edgeweave.errors import EdgeweaveError
from edgeweave.testbed import cgroups
from edgeweave.testbed import commands as C
from edgeweave.testbed.spec import (
    DEFAULT_PREFIX,
    TestbedSpec,
    as_spec,
    parse_rate,
    spec_dict,
    spec_from_state,
)

if TYPE_CHECKING:
    from edgeweave.profiling.profile import Cluster, DeviceProfile

STATE_DIR = Path("/run/edgeweave")
NETNS_ETC = Path("/etc/netns")


def state_path(prefix: str) -> Path:
    return STATE_DIR / f"testbed-{prefix.rstrip('-')}.json"


def log_dir(prefix: str) -> Path:
    return STATE_DIR / f"testbed-{prefix.rstrip('-')}-logs"


def emulation_support() -> tuple[bool, str]:
    """(True, "") when this host can build namespaces, tc shapers and cgroup v1 caps."""
    if not sys.platform.startswith("linux"):
        return False, "not Linux"
    if os.geteuid() != 0:
        return False, "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' (iproute2) is not installed"
    if not cgroups.available("cpu"):
        return False, "no cgroup v1 cpu controller at /sys/fs/cgroup/cpu"
    return True, ""


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode != 0:
        err = (r.stderr or r.stdout).strip().splitlines()
        raise EdgeweaveError(f"testbed: `{' '.join(cmd)}` failed: {err[-1] if err else f'exit {r.returncode}'}")
    return r


def _netns_list() -> list[str]:
    r = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _link_list() -> list[str]:
    r = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in r.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _check_subnet_free(spec: TestbedSpec) -> None:
    """Refuse a subnet that overlaps a route this host already has (other than our own
    bridge's): adding it would shadow real traffic. The testbed's subnet must exist only here."""
    import ipaddress

    ours = ipaddress.ip_network(spec.subnet)
    r = _run(["ip", "-o", "-4", "route", "show"], check=False)
    for line in r.stdout.splitlines():
        parts = line.split()
        if not parts or parts[0] == "default":
            continue
        dev = parts[parts.index("dev") + 1] if "dev" in parts else ""
        if dev.startswith(spec.prefix):
            continue
        try:
            net = ipaddress.ip_network(parts[0], strict=False)
        except ValueError:
            continue
        if net.overlaps(ours):
            raise EdgeweaveError(f"testbed: subnet {spec.subnet} overlaps this host's route {parts[0]} on {dev or '?'}; choose another private 'subnet' in the spec")


def leftovers(prefix: str = DEFAULT_PREFIX) -> dict[str, list[str]]:
    """Everything on this host that carries ``prefix``: what ``down`` must remove."""
    have_ip = shutil.which("ip") is not None
    return {
        "netns": [n for n in _netns_list() if n.startswith(prefix)] if have_ip else [],
        "links": [n for n in _link_list() if n.startswith(prefix)] if have_ip else [],
        "cgroups": [str(p) for p in cgroups.find_groups(prefix)],
        "etc_netns": sorted(str(p) for p in NETNS_ETC.glob(f"{prefix}*")) if NETNS_ETC.is_dir() else [],
    }


def _in_prefixed_cgroup(pid: int, prefix: str) -> bool:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return any(part.startswith(prefix) for line in text.splitlines() for part in line.split(":", 2)[-1].split("/"))


def down(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """Remove every namespace, link, cgroup and resolver file named with ``prefix``, killing the
    processes inside them first. Works from any process, also after the one that ran ``up``
    crashed. Returns what was removed and anything that could not be (``remaining``)."""
    state: dict[str, Any] = {}
    sp = state_path(prefix)
    if sp.is_file():
        try:
            state = json.loads(sp.read_text())
        except ValueError:
            state = {}
    extra_groups = [p for dev in state.get("cgroups", {}).values() for p in dev.values()]
    groups = cgroups.find_groups(prefix, extra_groups)
    before = leftovers(prefix)
    # 1. processes: everything in our cgroups and namespaces, and the workers we recorded
    # recorded worker pids only if still in one of our groups (a pid may have been reused)
    pids: list[int] = [p for p in state.get("pids", []) if _in_prefixed_cgroup(p, prefix)]
    for g in groups:
        pids += cgroups.procs(g)
    for ns in before["netns"]:
        r = _run(["ip", "netns", "pids", ns], check=False)
        pids += [int(x) for x in r.stdout.split() if x.isdigit()]
    killed = cgroups.kill_pids(pids) if pids else []
    # 2. network: namespaces (their veth ends go with them), then any host links left
    for ns in before["netns"]:
        _run(["ip", "netns", "del", ns], check=False)
    for link in [n for n in _link_list() if n.startswith(prefix)]:
        _run(["ip", "link", "del", link], check=False)
    # 3. resolver files, cgroups, state
    for p in before["etc_netns"]:
        shutil.rmtree(p, ignore_errors=True)
    for g in groups:
        cgroups.remove(g)
    sp.unlink(missing_ok=True)
    shutil.rmtree(log_dir(prefix), ignore_errors=True)
    after = leftovers(prefix)
    return {"prefix": prefix, "removed": before, "killed_pids": killed, "remaining": {k: v for k, v in after.items() if v}}


class Testbed:
    """A running emulated cluster (or its loopback fallback); build one with :meth:`up`."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, spec: TestbedSpec, emulated: bool, reason: str = "", groups: dict[str, dict[str, str]] | None = None, pids: list[int] | None = None):
        self.spec = spec
        self.emulated = emulated
        self.reason = reason
        self.groups: dict[str, dict[str, str]] = groups or {}
        self.pids: list[int] = list(pids or [])
        self._procs: list[subprocess.Popen] = []
        self._cpu = {d.name: d.cpu for d in spec.devices}
        self._bw = {d.name: d.bandwidth_bps for d in spec.devices}

    # ---------------------------------------------------------------- building and tearing down
    @classmethod
    def up(cls, spec: "TestbedSpec | dict | list | str | Path", *, emulate: bool | None = None, replace: bool = True) -> "Testbed":
        """Build the cluster. ``emulate=None`` emulates when the host allows it and otherwise falls
        back to loopback (``emulate=True`` raises instead). ``replace`` first removes a testbed
        left with the same prefix (for example by a crashed run)."""
        spec = as_spec(spec)
        ok, why = emulation_support()
        if emulate is True and not ok:
            raise EdgeweaveError(f"testbed: cannot emulate links and CPUs here ({why}); run as root on Linux with iproute2")
        if emulate is False or not ok:
            reason = why if not ok else "emulation turned off"
            return cls(spec, emulated=False, reason=f"{reason}: loopback processes with thread limits; links and CPUs are NOT emulated")
        left = leftovers(spec.prefix)
        if any(left.values()):
            if not replace:
                raise EdgeweaveError(f"testbed: objects named {spec.prefix}* already exist ({sum(map(len, left.values()))}); run `edgeweave testbed down` first")
            down(spec.prefix)
        _check_subnet_free(spec)
        tb = cls(spec, emulated=True)
        try:
            tb._build()
        except BaseException:
            down(spec.prefix)
            raise
        return tb

    def _build(self) -> None:
        spec = self.spec
        hostname = socket.gethostname()
        for cmd in C.bridge_cmds(spec):
            _run(cmd)
        for dev in spec.devices:
            ns = C.ns_name(spec, dev.name)
            for cmd in C.device_net_cmds(spec, dev):
                _run(cmd)
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(C.RESOLV_CONF)
            (etc / "hosts").write_text(C.hosts_file(spec, dev.name, hostname))
            groups: dict[str, str] = {}
            for ctl in cgroups.CONTROLLERS:
                if cgroups.available(ctl):
                    groups[ctl] = str(cgroups.create(ctl, C.cgroup_name(spec, dev.name)))
            if "cpu" in groups:
                cgroups.set_cpu(Path(groups["cpu"]), dev.cpu)
            if "memory" in groups:
                cgroups.set_memory(Path(groups["memory"]), dev.memory_bytes)
            elif dev.memory_bytes is not None:
                raise EdgeweaveError(f"testbed: device {dev.name} asks for a memory cap but there is no cgroup v1 memory controller")
            self.groups[dev.name] = groups
        self._save_state()

    def _save_state(self) -> None:
        if not self.emulated:
            return
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {"spec": spec_dict(self.spec), "cgroups": self.groups, "pids": self.pids, "cpu": self._cpu, "bandwidth": self._bw, "created": time.time()}
        state_path(self.spec.prefix).write_text(json.dumps(state, indent=2))

    @classmethod
    def attach(cls, prefix: str = DEFAULT_PREFIX) -> "Testbed":
        """The testbed another process brought up with this prefix (read from its state file)."""
        sp = state_path(prefix)
        if not sp.is_file():
            left = sum(len(v) for v in leftovers(prefix).values())
            hint = f"; {left} objects named {prefix}* are left from a crash: run `edgeweave testbed down`" if left else "; run `edgeweave testbed up --spec FILE`"
            raise EdgeweaveError(f"testbed: none is up with prefix {prefix!r} (no {sp}){hint}")
        state = json.loads(sp.read_text())
        tb = cls(spec_from_state(state["spec"]), emulated=True, groups=state.get("cgroups"), pids=state.get("pids"))
        tb._cpu.update(state.get("cpu", {}))
        tb._bw.update(state.get("bandwidth", {}))
        return tb

    def down(self) -> dict[str, Any]:
        """Stop every process started here and remove everything the testbed made."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if not self.emulated:
            return {"prefix": self.spec.prefix, "emulated": False, "remaining": {}}
        return down(self.spec.prefix)

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---------------------------------------------------------------- where things are
    @property
    def devices(self) -> list[str]:
        return [d.name for d in self.spec.devices]

    @property
    def leader(self) -> str:
        return self.spec.leader.name

    def address(self, device: str) -> str:
        """The device's IP address (127.0.0.1 for every device in the loopback fallback)."""
        self.spec.device(device)
        return self.spec.address(device) if self.emulated else "127.0.0.1"

    def ifname(self, device: str) -> str:
        """The device's interface inside its namespace ("lo" in the fallback)."""
        self.spec.device(device)
        return C.ns_if(self.spec, device) if self.emulated else "lo"

    def netns(self, device: str) -> str | None:
        self.spec.device(device)
        return C.ns_name(self.spec, device) if self.emulated else None

    def env(self, device: str) -> dict[str, str]:
        """Environment every process on ``device`` gets (on top of this process's)."""
        dev = self.spec.device(device)
        threads = str(max(1, math.ceil(self._cpu.get(device) or 1)))
        return {
            "GLOO_SOCKET_IFNAME": self.ifname(device),
            "TP_SOCKET_IFNAME": self.ifname(device),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "EDGEWEAVE_DEVICE": dev.name,
            "EDGEWEAVE_DEVICE_ADDR": self.address(device),
            "EDGEWEAVE_LEADER_ADDR": self.address(self.leader),
            "EDGEWEAVE_TESTBED_EMULATED": "1" if self.emulated else "0",
        }

    # ---------------------------------------------------------------- running things
    def exec_argv(self, device: str, argv: Sequence[str], *, cgroup: bool = True) -> list[str]:
        """The exact command :meth:`exec` runs (joins the cgroups, then ``ip netns exec``)."""
        if not self.emulated:
            return list(argv)
        procs = [str(Path(p) / "cgroup.procs") for p in self.groups.get(device, {}).values()] if cgroup else []
        return C.exec_argv(argv, netns=self.netns(device), cgroup_procs=procs, ip=shutil.which("ip") or "ip")

    def exec(self, device: str, argv: Sequence[str], env: Mapping[str, str] | None = None, *, cgroup: bool = True, **popen_kw: Any) -> subprocess.Popen:
        """Start ``argv`` on ``device``: inside its cgroups (CPU/memory caps) and its network
        namespace, with GLOO_SOCKET_IFNAME and thread limits set. ``env`` adds to (and
        overrides) that environment. ``cgroup=False`` skips the caps (for measuring tools).
        Extra keyword arguments go to :class:`subprocess.Popen`."""
        full_env = dict(os.environ)
        full_env.update(self.env(device))
        if env:
            full_env.update(env)
        p = subprocess.Popen(self.exec_argv(device, argv, cgroup=cgroup), env=full_env, **popen_kw)
        self._procs.append(p)
        return p

    def start_workers(self, port: int = 29500, python: str | None = None, log: bool = True, extra_args: Sequence[str] = (),
                      devices: Sequence[str] | None = None) -> dict[str, subprocess.Popen]:
        """Start ``edgeweave worker --leader LEADER:PORT --name NAME [extra_args]`` on every
        non-leader device (or on ``devices``: a board that comes back), detached (own session),
        logging to the state directory (``/run/edgeweave/testbed-<prefix>-logs/<name>.log``);
        pids are recorded so ``down`` stops them."""
        python = python or sys.executable
        out: dict[str, subprocess.Popen] = {}
        for name in (self.devices[1:] if devices is None else devices):
            argv = C.worker_argv(python, self.address(self.leader), port, name) + list(extra_args)
            kw: dict[str, Any] = {"start_new_session": True, "stdin": subprocess.DEVNULL}
            if log and self.emulated:
                log_dir(self.spec.prefix).mkdir(parents=True, exist_ok=True)
                f = open(log_dir(self.spec.prefix) / f"{name}.log", "ab")
                kw.update(stdout=f, stderr=subprocess.STDOUT)
            out[name] = self.exec(name, argv, **kw)
            self.pids.append(out[name].pid)
        self._save_state()
        return out

    # ---------------------------------------------------------------- changing caps live
    def set_cpu(self, device: str, cores: float | None) -> None:
        """Change a device's CPU cap now; running processes are throttled from the next period."""
        self.spec.device(device)
        if cores is not None and (isinstance(cores, bool) or not 0.01 <= float(cores) <= 1024):
            raise EdgeweaveError(f"testbed: cpu cap must be between 0.01 and 1024 cores, got {cores!r}")
        self._cpu[device] = None if cores is None else float(cores)
        if self.emulated:
            cgroups.set_cpu(Path(self.groups[device]["cpu"]), self._cpu[device])
            self._save_state()

    def set_bandwidth(self, device: str, rate: "str | float | None") -> None:
        """Change a device's link rate now (both directions); ``None`` removes shaping."""
        self.spec.device(device)
        bps = None if rate is None else parse_rate(rate, f"bandwidth of {device}")
        self._bw[device] = bps
        if self.emulated:
            ns = C.ns_name(self.spec, device)
            for cmd in (C.tbf_cmd(C.host_if(self.spec, device), bps), C.tbf_cmd(C.ns_if(self.spec, device), bps, netns=ns)):
                _run(cmd, check=bps is not None)  # deleting an absent qdisc is fine
            self._save_state()

    def cpu_cap(self, device: str) -> float | None:
        """The cap in force, read back from the kernel when emulated."""
        if self.emulated and "cpu" in self.groups.get(device, {}):
            return cgroups.read_cpu(Path(self.groups[device]["cpu"]))
        return self._cpu.get(device)

    def cpu_usage_s(self, device: str) -> float | None:
        """CPU seconds used so far by everything that ran in the device's cgroup."""
        g = self.groups.get(device, {}).get("cpuacct")
        return cgroups.cpu_usage_s(Path(g)) if g else None

    def cluster(self, base: "DeviceProfile | None" = None) -> "Cluster":
        """A *nominal* cluster description for the planner, from the spec alone: each device's
        compute line and per-message latency are ``base``'s (a full-core profile of this host)
        slowed by its CPU cap (``DeviceProfile.slowed`` by 1/cores), its bandwidth the device's
        link rate (10 Gbit/s when unshaped: a veth), its address its IP.
        Measured profiles (``edgeweave profile`` run in the device, links measured as ``bench
        edgeld`` does) are better; this is the starting point and the check. Traffic between two devices runs at
        the smaller of their two rates, and all followers share the leader's link."""
        from edgeweave.profiling.profile import Cluster, DeviceProfile

        base = base or DeviceProfile(name="base")
        out = []
        for d in self.spec.devices:
            cpu = self._cpu.get(d.name) or 1.0
            out.append(replace(
                base.slowed(1.0 / cpu),
                name=d.name,
                bandwidth_bps=self._bw.get(d.name) or 1e10,
                address=self.address(d.name),
                meta={"nominal": True, "cpu": self._cpu.get(d.name), "emulated": self.emulated, "base": base.name},
            ))
        return Cluster(out)

    # ---------------------------------------------------------------- measuring
    def measure_bandwidth(self, src: str, dst: str, seconds: float = 1.0, tool: str | None = None) -> float:
        """Measured TCP throughput src -> dst in bits per second (iperf3 if installed, else a
        small Python sender/receiver), run in the namespaces but outside the CPU caps so that
        the link, not the sender's CPU share, is what is measured."""
        tool = tool or ("iperf3" if shutil.which("iperf3") else "python")
        port = random.randint(40000, 49999)
        dst_addr = self.address(dst)
        if tool == "iperf3":
            # the server's "listening" line is block-buffered in a pipe, so retry the client
            # until the server accepts instead of waiting for that line
            srv = self.exec(dst, ["iperf3", "-s", "-1", "-B", dst_addr, "-p", str(port)], cgroup=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                secs = str(max(1, int(round(seconds))))  # iperf3 -t takes whole seconds
                deadline = time.monotonic() + 10
                while True:
                    cli = self.exec(src, ["iperf3", "-c", dst_addr, "-p", str(port), "-t", secs, "-J"], cgroup=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    out, _ = cli.communicate(timeout=float(secs) + 20)
                    try:
                        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])
                    except (ValueError, KeyError):
                        if time.monotonic() > deadline or srv.poll() is not None:
                            raise EdgeweaveError(f"testbed: iperf3 {src}->{dst} failed: {out.strip()[-200:]}") from None
                        time.sleep(0.1)
            finally:
                if srv.poll() is None:
                    srv.kill()
                srv.wait()
        script = str(Path(__file__).with_name("tcpbw.py"))
        srv = self.exec(dst, [sys.executable, "-I", script, "serve", dst_addr, str(port)], cgroup=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert srv.stdout is not None
            line = srv.stdout.readline().strip()
            if line != "ready":
                raise EdgeweaveError(f"testbed: bandwidth receiver on {dst} did not start: {line or srv.stderr.read().strip()[-200:] if srv.stderr else ''}")
            cli = self.exec(src, [sys.executable, "-I", script, "send", dst_addr, str(port), str(seconds)], cgroup=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _, err = cli.communicate(timeout=seconds + 20)
            if cli.returncode != 0:
                raise EdgeweaveError(f"testbed: bandwidth sender {src}->{dst} failed: {err.strip()[-200:]}")
            out, _ = srv.communicate(timeout=20)
            return float(json.loads(out.strip().splitlines()[-1])["bps"])
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()

    def status(self, measure: bool = False, seconds: float = 1.0) -> dict[str, Any]:
        """Devices with their address, caps (as read back from the kernel) and usage; with
        ``measure`` also the measured bandwidth from the leader to each follower."""
        devs = []
        for d in self.spec.devices:
            row: dict[str, Any] = {
                "name": d.name,
                "role": "leader" if d.name == self.leader else "follower",
                "address": self.address(d.name),
                "netns": self.netns(d.name),
                "ifname": self.ifname(d.name),
                "cpu": self.cpu_cap(d.name),
                "memory_bytes": d.memory_bytes,
                "bandwidth_bps": self._bw.get(d.name),
                "cpu_used_s": self.cpu_usage_s(d.name),
                "procs": len(cgroups.procs(Path(self.groups[d.name]["cpu"]))) if self.emulated and "cpu" in self.groups.get(d.name, {}) else None,
            }
            mem = self.groups.get(d.name, {}).get("memory")
            if mem:
                lim = int((Path(mem) / "memory.limit_in_bytes").read_text())
                row["memory_limit_bytes"] = lim if lim < 2**62 else None
                row["memory_used_bytes"] = int((Path(mem) / "memory.usage_in_bytes").read_text())
            if measure and self.emulated and d.name != self.leader:
                row["bandwidth_measured_bps"] = self.measure_bandwidth(self.leader, d.name, seconds=seconds)
            devs.append(row)
        return {
            "prefix": self.spec.prefix,
            "emulated": self.emulated,
            "reason": self.reason,
            "subnet": self.spec.subnet if self.emulated else None,
            "bridge": C.bridge_name(self.spec) if self.emulated else None,
            "leader": self.leader,
            "leader_address": self.address(self.leader),
            "devices": devs,
        }
