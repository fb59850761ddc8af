"""Names and command lines for the emulated cluster, as pure functions.

Everything the testbed runs (iproute2, tc, the cgroup-joining exec wrapper) is built here as an
argv list, so that the exact commands can be unit-tested without root and read in one place.
Every object the testbed makes on the host carries the spec's prefix (default ``ew-``), which is
how ``down`` finds all of it again after a crash without any state file:

    namespace   <prefix><device>          e.g. ew-leader
    veth pair   <prefix><device>-h (host side, on the bridge) / <prefix><device>-n (inside)
    bridge      <prefix>br
    cgroups     <prefix><device> under cpu, cpuacct and memory (cgroup v1)
    resolver    /etc/netns/<prefix><device>/{resolv.conf,hosts}
"""

from __future__ import annotations

from typing import Sequence

from edgeweave.testbed.spec import DeviceSpec, TestbedSpec

TBF_LATENCY_MS = 100  # queue length of the shaper, as time at the shaped rate
TBF_MIN_BURST = 32 * 1024  # bytes; at least a couple of full-size (GSO) packets
TBF_BURST_SECONDS = 0.001  # else 1 ms worth of the rate, so short bursts stay near the rate


def ns_name(spec: TestbedSpec, device: str) -> str:
    return f"{spec.prefix}{device}"


def host_if(spec: TestbedSpec, device: str) -> str:
    return f"{spec.prefix}{device}-h"


def ns_if(spec: TestbedSpec, device: str) -> str:
    """The device's interface inside its namespace (what GLOO_SOCKET_IFNAME names)."""
    return f"{spec.prefix}{device}-n"


def bridge_name(spec: TestbedSpec) -> str:
    return f"{spec.prefix}br"


def cgroup_name(spec: TestbedSpec, device: str) -> str:
    return f"{spec.prefix}{device}"


def tbf_burst_bytes(rate_bps: float) -> int:
    """Bucket size for tbf: big enough to pass full-size segments, small enough to stay shaped."""
    return int(max(TBF_MIN_BURST, rate_bps / 8 * TBF_BURST_SECONDS))


def tbf_cmd(dev: str, rate_bps: float | None, netns: str | None = None) -> list[str]:
    """Shape egress of ``dev`` to ``rate_bps`` with tbf; ``None`` removes shaping.

    tbf shapes only what leaves an interface, so a symmetric link needs it on both ends of the
    veth: the host end shapes traffic towards the device, the namespace end traffic from it.
    """
    base = ["tc"] + (["-n", netns] if netns else [])
    if rate_bps is None:
        return base + ["qdisc", "del", "dev", dev, "root"]
    return base + [
        "qdisc", "replace", "dev", dev, "root", "tbf",
        "rate", f"{int(rate_bps)}bit",
        "burst", str(tbf_burst_bytes(rate_bps)),
        "latency", f"{TBF_LATENCY_MS}ms",
    ]


def bridge_cmds(spec: TestbedSpec) -> list[list[str]]:
    br = bridge_name(spec)
    return [
        ["ip", "link", "add", br, "type", "bridge"],
        ["ip", "addr", "add", f"{spec.bridge_address()}/{spec.prefixlen}", "dev", br],
        ["ip", "link", "set", br, "up"],
    ]


def device_net_cmds(spec: TestbedSpec, dev: DeviceSpec) -> list[list[str]]:
    """Namespace, veth pair into it, address, and the shaper on both ends."""
    ns, h, n = ns_name(spec, dev.name), host_if(spec, dev.name), ns_if(spec, dev.name)
    cmds = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", h, "type", "veth", "peer", "name", n, "netns", ns],
        ["ip", "link", "set", h, "master", bridge_name(spec)],
        ["ip", "link", "set", h, "up"],
        ["ip", "-n", ns, "addr", "add", f"{spec.address(dev.name)}/{spec.prefixlen}", "dev", n],
        ["ip", "-n", ns, "link", "set", n, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]
    if dev.bandwidth_bps is not None:
        cmds.append(tbf_cmd(h, dev.bandwidth_bps))
        cmds.append(tbf_cmd(n, dev.bandwidth_bps, netns=ns))
    return cmds


def hosts_file(spec: TestbedSpec, device: str, hostname: str) -> str:
    """/etc/hosts seen inside ``device``'s namespace: every device by name, and this machine's
    hostname mapped to the device's own address, so no lookup ever leaves the namespace."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for d in spec.devices:
        names = [d.name, ns_name(spec, d.name)]
        if d.name == device and hostname and hostname not in names:
            names.append(hostname)
        lines.append(f"{spec.address(d.name)}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


RESOLV_CONF = "# edgeweave testbed: no DNS inside the namespace; fail fast instead of timing out\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


# The exec wrapper: join every cgroup (write our own pid to cgroup.procs), then exec the rest.
# It must join *before* `ip netns exec`, which remounts /sys so the cgroup tree is not visible.
_JOIN_SCRIPT = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 126; shift; n=$((n-1)); done; exec "$@"'


def exec_argv(argv: Sequence[str], *, netns: str | None, cgroup_procs: Sequence[str] = (), ip: str = "ip") -> list[str]:
    """argv that starts ``argv`` inside the given cgroups and network namespace.

    ``ip netns exec`` (rather than nsenter) is used because it also bind-mounts
    /etc/netns/<ns>/ over /etc, which is what the resolver trick relies on.
    """
    inner = list(argv)
    if netns:
        inner = [ip, "netns", "exec", netns] + inner
    if cgroup_procs:
        inner = ["/bin/sh", "-c", _JOIN_SCRIPT, "ew-exec", str(len(cgroup_procs)), *cgroup_procs] + inner
    return inner


def worker_argv(python: str, leader_addr: str, port: int, name: str) -> list[str]:
    """The follower command (built by the runtime): ``edgeweave worker --leader A:P --name N``."""
    return [python, "-m", "edgeweave", "worker", "--leader", f"{leader_addr}:{port}", "--name", name]
