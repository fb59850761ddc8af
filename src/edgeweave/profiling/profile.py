"""Device and link profiles: the numbers the planner's cost model reads.

A device's compute model is seconds = a * FLOPs + b, optionally per operator kind ("conv",
"linear", "other") where one line does not fit; its link is the bandwidth and round-trip
latency between it and the rest of the cluster. Profiles are plain JSON so that a user can write
a cluster by hand before measuring, and so that followers can send theirs to the leader.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeweave.errors import EdgeweaveError


@dataclass
class DeviceProfile:
    name: str
    a: float = 1e-10  # seconds per FLOP (capability = 1/a)
    b: float = 0.0  # fixed seconds per call
    per_kind: dict[str, list[float]] = field(default_factory=dict)  # kind -> [a, b]
    bandwidth_bps: float = 1e9  # bits per second of this device's link
    latency_s: float = 0.0  # one-way latency of this device's link
    # Seconds of this device's time per byte it sends, or receives for another device (relays):
    # the network stack's CPU work, which a device that computes and relays at once (the leader
    # in gather mode) pays on top of its compute. The bench's probe measures 4.6-6.1 ms per MB
    # at 0.25 core (`edgeweave profile`'s loopback probe a lower bound); 0: not modelled.
    byte_s: float = 0.0
    address: str | None = None  # host:port or namespace address, when known
    meta: dict[str, Any] = field(default_factory=dict)

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
        return replace(self, a=self.a * f, b=self.b * f, per_kind={k: [v[0] * f, v[1] * f] for k, v in self.per_kind.items()},
                       latency_s=self.latency_s * f, byte_s=self.byte_s * f)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeviceProfile":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise EdgeweaveError(f"device profile: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        if "name" not in d:
            raise EdgeweaveError("device profile: every device needs a 'name'")
        return cls(**d)


@dataclass
class Cluster:
    """The devices of one cluster; ``devices[0]`` is the leader."""

    devices: list[DeviceProfile]

    def to_dict(self) -> dict[str, Any]:
        return {"devices": [d.to_dict() for d in self.devices]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cluster":
        devs = d.get("devices")
        if not isinstance(devs, list) or not devs:
            raise EdgeweaveError("cluster file: expected a non-empty list under 'devices' (the first is the leader)")
        return cls([DeviceProfile.from_dict(x) for x in devs])

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
        return cls.from_dict(data)

    @classmethod
    def uniform(cls, n: int, a: float = 1e-10, b: float = 0.0, bandwidth_bps: float = 1e9) -> "Cluster":
        return cls([DeviceProfile(name="leader" if i == 0 else f"worker{i}", a=a, b=b, bandwidth_bps=bandwidth_bps) for i in range(n)])
