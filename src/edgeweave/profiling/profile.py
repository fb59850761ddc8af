"""Device and link profiles: the numbers the planner's cost model reads.

A device's compute model is seconds = a * FLOPs + b, optionally per operator kind ("conv",
"linear", "other") where one line does not fit; its link is the bandwidth and round-trip
latency between it and the rest of the cluster. The lines describe the device computing on its
``backend`` (torch unless it says otherwise); ``backends`` holds the lines `edgeweave profile`
measured for the other backends the device has (ONNX Runtime, OpenVINO), so the planner can
price the device on each (``on``) and pick its fastest (``--backend auto``). Profiles are plain JSON so that a user can write
a cluster by hand before measuring, and so that followers can send theirs to the leader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeweave.errors import EdgeweaveError


# Numeric keys of a profile: (the range a value must be in, how it reads in a message).
_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "a": (lambda v: v > 0, "seconds per FLOP, a number > 0"),
    "b": (lambda v: v >= 0, "fixed seconds per call, a number >= 0"),
    "bandwidth_bps": (lambda v: v > 0, "bits per second of the device's link, a number > 0"),
    "latency_s": (lambda v: v >= 0, "one-way seconds per message, a number >= 0"),
    "byte_s": (lambda v: v >= 0, "CPU seconds per byte sent or relayed, a number >= 0"),
    "memory_bytes": (lambda v: v >= 0, "bytes of memory the device's process may use, a number >= 0 (0: unknown)"),
}
_WEIGHTS_RULE = (lambda v: v >= 0, "seconds per weight element read, a number >= 0")
# Keys a cluster file must give for every device (the defaults are placeholders for code)
FILE_REQUIRED = ("a", "bandwidth_bps")
# The placeholder profile: 10 GFLOP/s, 1 Gbit/s (Cluster.uniform; not a measurement)
DEFAULT_A, DEFAULT_BPS = 1e-10, 1e9


def _type_name(v: Any) -> str:
    return {list: "a list", dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), type(v).__name__)


def _check_number(v: Any, ok: Callable[[float], bool], what: str, label: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise EdgeweaveError(f"{label} must be {what}, got {_type_name(v)} {v!r}")
    if not math.isfinite(v) or not ok(v):
        raise EdgeweaveError(f"{label} must be {what}, got {v!r}")


@dataclass
class DeviceProfile:
    name: str
    a: float = DEFAULT_A  # seconds per FLOP (capability = 1/a)
    b: float = 0.0  # fixed seconds per call
    per_kind: dict[str, list[float]] = field(default_factory=dict)  # kind -> [a, b]
    bandwidth_bps: float = DEFAULT_BPS  # bits per second of this device's link
    latency_s: float = 0.0  # one-way latency of this device's link
    # Seconds of this device's time per byte it sends, or receives for another device (relays):
    # the network stack's CPU work, which a device that computes and relays at once (the leader
    # in gather mode) pays on top of its compute. The bench's probe measures 4.6-6.1 ms per MB
    # at 0.25 core (`edgeweave profile`'s loopback probe a lower bound); 0: not modelled.
    byte_s: float = 0.0
    address: str | None = None  # host:port or namespace address, when known
    # Bytes of memory this device's worker may use (its cgroup's limit or the board's RAM, found at
    # join; a cluster file or testbed spec may give it): a hard limit for plans (planning/memory.py).
    # 0: unknown, not checked.
    memory_bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    backend: str = "torch"  # the compute backend a, b and per_kind describe (engine/backends.py)
    # other backends measured on this device: name -> {"a": .., "b": .., "per_kind": {kind: [a, b]}}
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)

    def lines(self) -> dict[str, Any]:
        """This profile's compute model as one ``backends`` entry."""
        return {"a": self.a, "b": self.b, "per_kind": {k: list(v) for k, v in self.per_kind.items()}}

    def measured(self) -> list[str]:
        """The backends this profile has compute lines for (its own first)."""
        return [self.backend] + [b for b in self.backends if b != self.backend]

    def on(self, backend: str) -> "DeviceProfile":
        """This device priced on ``backend``: that backend's measured lines when the profile has
        them; otherwise the same lines (an estimate: ``meta["uncalibrated_backend"]`` says so)."""
        if backend == self.backend:
            return self
        known = {**self.backends, self.backend: self.lines()}
        if backend in known:
            line = known[backend]
            return replace(self, a=float(line["a"]), b=float(line["b"]),
                           per_kind={k: [float(v[0]), float(v[1])] for k, v in line.get("per_kind", {}).items()},
                           backend=backend, backends=known)
        return replace(self, backend=backend, backends=known, meta={**self.meta, "uncalibrated_backend": backend})

    def compute_s(self, flops: float, kind: str = "conv") -> float:
        a, b = self.per_kind.get(kind, (self.a, self.b))
        return a * flops + b

    @property
    def capability(self) -> float:
        return 1.0 / self.a

    def slowed(self, f: float) -> "DeviceProfile":
        """This device ``f`` times slower (``f`` > 1): every compute line's a and b, the
        per-message latency and the per-byte CPU time times f. The latency scales with the CPU because between busy
        capped devices it is mostly the ends' CPU time and quota waits (``planning.adapt.scale_profile``)."""
        def scaled(line: dict[str, Any]) -> dict[str, Any]:
            return {"a": line["a"] * f, "b": line["b"] * f,
                    "per_kind": {k: [v[0] * f, v[1] * f] for k, v in line.get("per_kind", {}).items()}}

        return replace(self, a=self.a * f, b=self.b * f, per_kind={k: [v[0] * f, v[1] * f] for k, v in self.per_kind.items()},
                       latency_s=self.latency_s * f, byte_s=self.byte_s * f,
                       backends={k: scaled(v) for k, v in self.backends.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, *, where: str | None = None, required: tuple[str, ...] = ()) -> "DeviceProfile":
        """A profile from plain data, every key checked for type and range (a wrong one would
        fail deep inside the planner, or worse, be planned with: a negative bandwidth is "fast").
        ``where`` starts every message (a file and a device; default: "device profile NAME");
        keys in ``required`` may not be left to their defaults (a cluster file must give ``a``
        and ``bandwidth_bps``)."""
        if not isinstance(d, dict):
            raise EdgeweaveError(f"{where or 'device profile'}: expected an object with keys such as name, a, "
                                 f"bandwidth_bps; got {_type_name(d)}")
        if "name" not in d:
            raise EdgeweaveError(f"{where or 'device profile'}: every device needs a 'name'")
        name = d["name"]
        if not isinstance(name, str) or not name.strip():
            raise EdgeweaveError(f"{where or 'device profile'}: 'name' must be a non-empty string, got {name!r}")
        where = where or f"device profile {name!r}"
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise EdgeweaveError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        missing = [k for k in required if k not in d]
        if missing:
            raise EdgeweaveError(f"{where}: missing key {missing[0]!r} ({_RULES[missing[0]][1]})")
        for key, (ok, what) in _RULES.items():
            if key in d:
                _check_number(d[key], ok, what, f"{where}: {key!r}")
        per_kind = d.get("per_kind", {})
        if not isinstance(per_kind, dict):
            raise EdgeweaveError(f"{where}: 'per_kind' must map an operator kind to [a, b], got {_type_name(per_kind)}")
        for kind, line in per_kind.items():
            if not isinstance(line, (list, tuple)) or len(line) != 2:
                raise EdgeweaveError(f"{where}: 'per_kind' {kind!r} must be [a, b] (seconds = a * FLOPs + b), "
                                     f"got {line!r}")
            rule = _WEIGHTS_RULE if kind == "weights" else _RULES["a"]  # weights read may cost nothing measurable
            _check_number(line[0], *rule, f"{where}: 'per_kind' {kind!r} a")
            _check_number(line[1], *_RULES["b"], f"{where}: 'per_kind' {kind!r} b")
        if d.get("address") is not None and not isinstance(d["address"], str):
            raise EdgeweaveError(f"{where}: 'address' must be a string such as host:port, got {d['address']!r}")
        if not isinstance(d.get("meta", {}), dict):
            raise EdgeweaveError(f"{where}: 'meta' must be an object, got {_type_name(d['meta'])}")
        backend = d.get("backend", "torch")
        if not isinstance(backend, str) or not backend:
            raise EdgeweaveError(f"{where}: 'backend' must be a backend name such as torch or ort, got {backend!r}")
        lines = d.get("backends", {})
        if not isinstance(lines, dict):
            raise EdgeweaveError(f"{where}: 'backends' must map a backend name to its lines, got {_type_name(lines)}")
        for name_, line in lines.items():
            if not isinstance(line, dict) or "a" not in line:
                raise EdgeweaveError(f"{where}: 'backends' {name_!r} must be an object with a, b and per_kind")
            cls.from_dict({"name": str(name), **line}, where=f"{where}, backend {name_!r}")
        return cls(**{**d, "per_kind": {str(k): [float(v[0]), float(v[1])] for k, v in per_kind.items()},
                      "memory_bytes": int(d.get("memory_bytes", 0))})


@dataclass
class Cluster:
    """The devices of one cluster; ``devices[0]`` is the leader."""

    devices: list[DeviceProfile]

    def to_dict(self) -> dict[str, Any]:
        return {"devices": [d.to_dict() for d in self.devices]}

    @property
    def is_default(self) -> bool:
        """Every device has the placeholder profile (:meth:`uniform`'s), nothing measured or
        given: a plan made with it predicts from guesses (the CLI says "uncalibrated")."""
        return all(d.a == DEFAULT_A and d.b == 0 and not d.per_kind and d.bandwidth_bps == DEFAULT_BPS
                   and d.latency_s == 0 and d.byte_s == 0 for d in self.devices)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "cluster file", required: tuple[str, ...] = ()) -> "Cluster":
        """Devices from plain data (``source`` names it in messages); duplicate names refused."""
        devs = d.get("devices") if isinstance(d, dict) else None
        if not isinstance(devs, list) or not devs:
            raise EdgeweaveError(f"{source}: expected a non-empty list under 'devices' (the first is the leader)")
        out: list[DeviceProfile] = []
        for i, x in enumerate(devs, start=1):
            named = isinstance(x, dict) and isinstance(x.get("name"), str)
            label = f"device {x['name']!r} (#{i})" if named else f"device #{i}"
            out.append(DeviceProfile.from_dict(x, where=f"{source}, {label}", required=required))
        seen: dict[str, int] = {}
        for i, dev in enumerate(out, start=1):
            if dev.name in seen:
                raise EdgeweaveError(f"{source}: devices #{seen[dev.name]} and #{i} are both named {dev.name!r}; "
                                     f"every device needs its own name")
            seen[dev.name] = i
        return cls(out)

    @classmethod
    def load(cls, path: str | Path) -> "Cluster":
        p = Path(path)
        if not p.is_file():
            raise EdgeweaveError(f"cluster file not found: {p}")
        try:
            if p.suffix == ".toml":
                import tomllib

                data = tomllib.loads(p.read_text())
            else:
                data = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise EdgeweaveError(f"cluster file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None
        # a file says what each device is like: the planner's defaults would be a guess taken for a measurement
        return cls.from_dict(data, source=f"cluster file {p}", required=FILE_REQUIRED)

    @classmethod
    def uniform(cls, n: int, a: float = DEFAULT_A, b: float = 0.0, bandwidth_bps: float = DEFAULT_BPS) -> "Cluster":
        return cls([DeviceProfile(name="leader" if i == 0 else f"worker{i}", a=a, b=b, bandwidth_bps=bandwidth_bps) for i in range(n)])
