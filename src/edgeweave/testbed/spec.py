"""Testbed spec: which emulated devices to build, with their CPU, memory and link caps.

A spec is JSON or TOML::

    {"devices": [
        {"name": "leader", "cpu": 0.25, "bandwidth": "1000mbit"},
        {"name": "w1", "cpu": 0.25, "memory": "1g", "bandwidth": "100mbit"}],
     "prefix": "ew-", "subnet": "10.77.0.0/24"}

The first device is the leader. ``cpu`` is in cores (0.25 = a quarter of one core), ``memory`` a
size ("512m", "1g", bytes as an int), ``bandwidth`` a tc-style rate ("100mbit", "1gbit",
"500kbit", bits per second as a number). Any cap may be left out (= not capped).

``bandwidth`` is the rate of the device's own access link to the emulated switch, in both
directions; traffic between two devices therefore flows at the smaller of their two rates, as
on a real switched network. Parsing is pure (no root needed) so that it can be unit-tested and
so that a bad spec fails before anything is built, with one line that says what was expected.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeweave.errors import EdgeweaveError

DEFAULT_PREFIX = "ew-"
DEFAULT_SUBNET = "10.77.0.0/24"
IFNAMSIZ = 15  # Linux interface names hold at most 15 characters

_RATE_UNITS = {
    "bit": 1.0, "bps": 1.0,
    "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "kibit": 1024.0, "mibit": 1024.0**2, "gibit": 1024.0**3,
    # tc's own spelling: "kbps" etc. mean bytes per second
    "kbps": 8e3, "mbps": 8e6, "gbps": 8e9,
}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,3}-$")


def parse_rate(value: Any, where: str = "bandwidth") -> float:
    """A rate as bits per second: "100mbit" -> 1e8. Numbers are bits per second.

    Units follow tc(8): ``bit``, ``kbit``, ``mbit``, ``gbit`` are bits per second (SI), and
    ``kbps``/``mbps``/``gbps`` are *bytes* per second, as tc reads them.
    """
    if isinstance(value, bool):
        raise EdgeweaveError(f"{where}: expected a rate like '100mbit', got {value!r}")
    if isinstance(value, (int, float)):
        bps = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _RATE_UNITS:
            raise EdgeweaveError(f"{where}: expected a rate like '100mbit' or '1gbit' (units: bit, kbit, mbit, gbit, kbps, mbps, gbps), got {value!r}")
        bps = float(m.group(1)) * _RATE_UNITS[unit]
    else:
        raise EdgeweaveError(f"{where}: expected a rate like '100mbit', got {value!r}")
    if not bps > 0 or bps != bps or bps == float("inf"):
        raise EdgeweaveError(f"{where}: rate must be positive and finite, got {value!r}")
    if bps < 8e3:
        raise EdgeweaveError(f"{where}: rate {value!r} is below 8kbit, too slow to shape")
    return bps


def parse_size(value: Any, where: str = "memory") -> int:
    """A size as bytes: "1g" -> 1073741824 (binary units; ints are bytes)."""
    if isinstance(value, bool):
        raise EdgeweaveError(f"{where}: expected a size like '1g' or '512m', got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise EdgeweaveError(f"{where}: expected a size like '1g' or '512m' (units: k, m, g), got {value!r}")
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise EdgeweaveError(f"{where}: expected a size like '1g' or '512m', got {value!r}")
    if n < 4 * 1024**2:
        raise EdgeweaveError(f"{where}: {value!r} is below 4 MiB; a process cannot start in that")
    return n


def format_rate(bps: float | None) -> str:
    """Human form of a rate for tables ("100mbit"), or "-" when not shaped."""
    if bps is None:
        return "-"
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps:g}bit"


@dataclass(frozen=True)
class DeviceSpec:
    """One emulated device: caps are None when not limited."""

    name: str
    cpu: float | None = None  # cores
    memory_bytes: int | None = None
    bandwidth_bps: float | None = None


@dataclass(frozen=True)
class TestbedSpec:
    """A whole emulated cluster; ``devices[0]`` is the leader."""

    __test__ = False  # not a pytest test class despite the name

    devices: tuple[DeviceSpec, ...]
    prefix: str = DEFAULT_PREFIX
    subnet: str = DEFAULT_SUBNET
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def leader(self) -> DeviceSpec:
        return self.devices[0]

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise EdgeweaveError(f"testbed: no device named {name!r}; devices are {[d.name for d in self.devices]}")

    def address(self, name: str) -> str:
        """Device i gets host i+1 of the subnet (10.77.0.1 is the leader)."""
        net = ipaddress.ip_network(self.subnet)
        idx = [d.name for d in self.devices].index(self.device(name).name)
        return str(net.network_address + idx + 1)

    def bridge_address(self) -> str:
        """The host's own address on the bridge: the last usable host of the subnet."""
        net = ipaddress.ip_network(self.subnet)
        return str(net.broadcast_address - 1)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "subnet": self.subnet,
            "devices": [
                {k: v for k, v in (("name", d.name), ("cpu", d.cpu), ("memory", d.memory_bytes), ("bandwidth", d.bandwidth_bps)) if v is not None}
                for d in self.devices
            ],
        }


_DEVICE_KEYS = {"name", "cpu", "memory", "bandwidth"}


def _parse_device(i: int, d: Any, prefix: str) -> DeviceSpec:
    where = f"testbed spec devices[{i}]"
    if not isinstance(d, dict):
        raise EdgeweaveError(f"{where}: expected a table like {{name, cpu, memory, bandwidth}}, got {type(d).__name__}")
    unknown = set(d) - _DEVICE_KEYS
    if unknown:
        raise EdgeweaveError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(_DEVICE_KEYS)}")
    name = d.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise EdgeweaveError(f"{where}: 'name' must be letters, digits or '_' (starting with a letter or digit), got {name!r}")
    maxlen = IFNAMSIZ - len(prefix) - 2  # link names are <prefix><name>-h / -n
    if len(name) > maxlen:
        raise EdgeweaveError(f"{where}: name {name!r} is longer than {maxlen} characters (Linux interface names hold 15)")
    cpu = d.get("cpu")
    if cpu is not None:
        if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or not (0.01 <= float(cpu) <= 1024):
            raise EdgeweaveError(f"{where} ({name}): 'cpu' must be a number of cores between 0.01 and 1024, got {cpu!r}")
        cpu = float(cpu)
    mem = parse_size(d["memory"], f"{where} ({name}) memory") if d.get("memory") is not None else None
    bw = parse_rate(d["bandwidth"], f"{where} ({name}) bandwidth") if d.get("bandwidth") is not None else None
    return DeviceSpec(name=name, cpu=cpu, memory_bytes=mem, bandwidth_bps=bw)


def spec_from_dict(data: Any) -> TestbedSpec:
    """Validate a parsed spec; every problem is one EdgeweaveError line naming the place."""
    if isinstance(data, list):
        data = {"devices": data}
    if not isinstance(data, dict):
        raise EdgeweaveError("testbed spec: expected an object with a 'devices' list (the first is the leader)")
    unknown = set(data) - {"devices", "prefix", "subnet", "meta"}
    if unknown:
        raise EdgeweaveError(f"testbed spec: unknown keys {sorted(unknown)}; expected devices, prefix, subnet")
    prefix = data.get("prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise EdgeweaveError(f"testbed spec: 'prefix' must be 1-4 lowercase letters/digits then '-', like 'ew-', got {prefix!r}")
    subnet = data.get("subnet", DEFAULT_SUBNET)
    try:
        net = ipaddress.ip_network(subnet)
    except (ValueError, TypeError):
        raise EdgeweaveError(f"testbed spec: 'subnet' must be an IPv4 network like '10.77.0.0/24', got {subnet!r}") from None
    if net.version != 4 or not net.is_private:
        raise EdgeweaveError(f"testbed spec: 'subnet' must be a private IPv4 network (it exists only inside this machine), got {subnet!r}")
    devs = data.get("devices")
    if not isinstance(devs, list) or not devs:
        raise EdgeweaveError("testbed spec: expected a non-empty list under 'devices' (the first is the leader)")
    devices = tuple(_parse_device(i, d, prefix) for i, d in enumerate(devs))
    names = [d.name for d in devices]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EdgeweaveError(f"testbed spec: device names must be unique; repeated: {dup}")
    if len(devices) + 3 > net.num_addresses:  # network, devices, bridge, broadcast
        raise EdgeweaveError(f"testbed spec: subnet {subnet} is too small for {len(devices)} devices plus the bridge")
    meta = data.get("meta", {})
    return TestbedSpec(devices=devices, prefix=prefix, subnet=str(net), meta=dict(meta) if isinstance(meta, dict) else {})


def load_spec(path: str | Path) -> TestbedSpec:
    """Read a spec from a .json or .toml file."""
    p = Path(path)
    if not p.is_file():
        raise EdgeweaveError(f"testbed spec file not found: {p}")
    is_toml = p.suffix.lower() == ".toml"
    try:
        if is_toml:
            import tomllib

            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EdgeweaveError(f"testbed spec {p} is not valid {'TOML' if is_toml else 'JSON'}: {msg}") from None
    return spec_from_dict(data)


def as_spec(spec: "TestbedSpec | dict | list | str | Path") -> TestbedSpec:
    """Accept a spec object, a parsed dict/list, or a path."""
    if isinstance(spec, TestbedSpec):
        return spec
    if isinstance(spec, (dict, list)):
        return spec_from_dict(spec)
    return load_spec(spec)


def spec_dict(spec: TestbedSpec) -> dict[str, Any]:
    """Plain dict of the dataclass (for state files)."""
    return {"prefix": spec.prefix, "subnet": spec.subnet, "devices": [asdict(d) for d in spec.devices]}


def spec_from_state(d: dict[str, Any]) -> TestbedSpec:
    """Inverse of :func:`spec_dict`."""
    return TestbedSpec(devices=tuple(DeviceSpec(**x) for x in d["devices"]), prefix=d["prefix"], subnet=d["subnet"])
