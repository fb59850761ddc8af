"""CPU and memory caps with cgroup v1 (the cgroup v2 tree here has no cpu/memory controller).

CPU: ``cpu.cfs_quota_us / cpu.cfs_period_us`` = cores. The period is 10 ms rather than the
default 100 ms: with 100 ms a short inference slips through inside one period and is not slowed
at all (ENVIRONMENT.md). The kernel wants a quota of at least 1 ms, so below 0.1 core the period
grows instead (0.05 core = 1 ms every 20 ms).

Memory: ``memory.limit_in_bytes``, in a group created under this process's own memory cgroup
(from /proc/self/cgroup), the only place we may create one on a managed host.

A cpuacct group with the same name accounts the CPU time the device really used, which
``status`` and the tests read to check that a cap is in force.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 10_000
MIN_QUOTA_US = 1_000
CONTROLLERS = ("cpu", "cpuacct", "memory")


def own_cgroup_path(controller: str, proc_cgroup: str | None = None) -> str:
    """This process's path in a v1 hierarchy ("/" when at the root), from /proc/self/cgroup."""
    text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return parts[2] or "/"
    return "/"


def controller_root(controller: str) -> Path:
    return CGROUP_ROOT / controller


def available(controller: str) -> bool:
    return (controller_root(controller) / "cgroup.procs").exists()


def group_dir(controller: str, name: str) -> Path:
    """Where this process creates group ``name``: under its own path in that hierarchy."""
    return controller_root(controller) / own_cgroup_path(controller).lstrip("/") / name


def quota_for(cores: float | None) -> tuple[int, int]:
    """(period_us, quota_us) for a cap of ``cores``; quota -1 means no cap."""
    if cores is None:
        return PERIOD_US, -1
    period = PERIOD_US
    quota = int(round(cores * period))
    if quota < MIN_QUOTA_US:
        period = int(math.ceil(MIN_QUOTA_US / cores))
        quota = MIN_QUOTA_US
    return period, quota


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def create(controller: str, name: str) -> Path:
    d = group_dir(controller, name)
    d.mkdir(exist_ok=True)
    return d


def set_cpu(cpu_dir: Path, cores: float | None) -> None:
    period, quota = quota_for(cores)
    # Lower the quota before changing the period so the pair is never rejected as inconsistent.
    _write(cpu_dir / "cpu.cfs_quota_us", "-1")
    _write(cpu_dir / "cpu.cfs_period_us", str(period))
    _write(cpu_dir / "cpu.cfs_quota_us", str(quota))


def read_cpu(cpu_dir: Path) -> float | None:
    quota = int((cpu_dir / "cpu.cfs_quota_us").read_text())
    period = int((cpu_dir / "cpu.cfs_period_us").read_text())
    return None if quota < 0 else quota / period


def set_memory(mem_dir: Path, limit_bytes: int | None) -> None:
    _write(mem_dir / "memory.limit_in_bytes", "-1" if limit_bytes is None else str(int(limit_bytes)))


def cpu_usage_s(cpuacct_dir: Path) -> float:
    """CPU seconds used by every process that ever ran in the group."""
    return int((cpuacct_dir / "cpuacct.usage").read_text()) / 1e9


def procs(d: Path) -> list[int]:
    try:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def find_groups(prefix: str, extra: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Every v1 group whose name starts with ``prefix``: under the roots, this process's own
    paths and their parents, and any paths remembered in ``extra`` (a crashed run's state)."""
    found: set[Path] = set()
    for c in CONTROLLERS:
        root = controller_root(c)
        if not root.is_dir():
            continue
        bases = {root}
        p = Path(own_cgroup_path(c))
        while True:
            bases.add(root / str(p).lstrip("/"))
            if p == p.parent:
                break
            p = p.parent
        for base in bases:
            try:
                for child in base.iterdir():
                    if child.is_dir() and child.name.startswith(prefix):
                        found.add(child)
            except OSError:
                continue
    for e in extra:
        p = Path(e)
        if p.is_dir() and p.name.startswith(prefix):
            found.add(p)
    # deepest first, so nested groups go before their parents
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def kill_pids(pids: list[int], grace_s: float = 2.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``; never this process. Returns the pids signalled."""
    me = os.getpid()
    pids = sorted({p for p in pids if p != me and p > 1})
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def remove(d: Path, timeout_s: float = 3.0) -> bool:
    """rmdir a group (after its processes are gone; the kernel refuses while any remain)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            d.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            kill_pids(procs(d), grace_s=0.5)
            time.sleep(0.05)
