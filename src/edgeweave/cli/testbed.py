"""`edgeweave testbed up|down|status`: the emulated edge cluster (root, Linux).

Thin wrapper over :mod:`edgeweave.testbed`. ``up`` builds namespaces, shaped links and CPU /
memory caps from a spec and, with ``--start-workers``, starts ``edgeweave worker`` in every
follower device; ``down`` removes everything named with the prefix (also after a crash);
``status`` shows devices, caps read back from the kernel and measured bandwidth.

``--json`` keys: up/status: ``prefix, emulated, reason, subnet, bridge, leader,
leader_address, devices[{name, role, address, netns, ifname, cpu, memory_bytes, bandwidth_bps,
cpu_used_s, procs, memory_limit_bytes, memory_used_bytes, bandwidth_measured_bps}]`` (+
``workers`` {name: pid} for up); down: ``prefix, removed, killed_pids, remaining``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from edgeweave.cli.common import JsonOpt, console, emit_json

testbed_app = typer.Typer(name="testbed", help="Emulated edge cluster on this host: namespaces, shaped links, CPU caps (root, Linux).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(testbed_app, name="testbed")


def _prefix(spec: Optional[Path], prefix: Optional[str]) -> str:
    from edgeweave.testbed.spec import DEFAULT_PREFIX, load_spec

    if prefix:
        return prefix
    return load_spec(spec).prefix if spec else DEFAULT_PREFIX


def _show(st: dict[str, Any]) -> None:
    from rich.table import Table

    from edgeweave.testbed.spec import format_rate

    if not st["emulated"]:
        console.print(f"[bold yellow]NOT EMULATED[/] ({st['reason']})")
    table = Table(title=f"testbed {st['prefix']}* (leader {st['leader']} at {st['leader_address']})")
    for c in ("device", "role", "address", "cpu cap", "memory cap", "link", "measured", "cpu used", "procs"):
        table.add_column(c)
    for d in st["devices"]:
        meas = d.get("bandwidth_measured_bps")
        mem = d.get("memory_limit_bytes", d.get("memory_bytes"))
        table.add_row(
            d["name"], d["role"], d["address"],
            "-" if d["cpu"] is None else f"{d['cpu']:g} core",
            "-" if mem is None else f"{mem / 2**20:.0f} MiB",
            format_rate(d["bandwidth_bps"]),
            "-" if meas is None else f"{meas / 1e6:.1f} Mbit/s",
            "-" if d.get("cpu_used_s") is None else f"{d['cpu_used_s']:.2f} s",
            "-" if d.get("procs") is None else str(d["procs"]),
        )
    console.print(table)


@testbed_app.command("up")
def up(
    spec: Path = typer.Option(..., "--spec", help="Spec file (JSON or TOML): devices [{name, cpu, memory, bandwidth}], the first is the leader."),
    start_workers: bool = typer.Option(False, "--start-workers", help="Start `edgeweave worker --leader LEADER:PORT --name NAME` in every follower device (detached; in the loopback fallback this command stays in the foreground until they exit)."),
    port: int = typer.Option(29500, "--port", help="Leader port the workers connect to."),
    worker_args: str = typer.Option("", "--worker-args", help="Extra arguments for every worker, one string (e.g. \"--profile p.json\")."),
    emulate: Optional[bool] = typer.Option(None, "--emulate/--no-emulate", help="Force emulation (fail without root) or loopback; default: emulate when possible."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Build the emulated cluster (replacing one left with the same prefix)."""
    from edgeweave.testbed import Testbed

    tb = Testbed.up(spec, emulate=emulate)
    st = tb.status(measure=False)
    if start_workers:
        import shlex

        procs = tb.start_workers(port=port, extra_args=shlex.split(worker_args))
        st["workers"] = {n: p.pid for n, p in procs.items()}
        console.print(f"started {len(procs)} workers -> leader {tb.address(tb.leader)}:{port}" + ("" if tb.emulated else " (loopback; they stop when this command exits)"))
        if not tb.emulated:  # nothing outlives this process in the fallback
            for p in procs.values():
                p.wait()
    _show(st)
    emit_json(st, json_out)


@testbed_app.command("down")
def down_cmd(
    spec: Optional[Path] = typer.Option(None, "--spec", help="Spec file (only its prefix is used)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Prefix of everything to remove (default: the spec's, else ew-)."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Remove every namespace, link, cgroup and resolver file with the prefix, and their processes."""
    from edgeweave.errors import EdgeweaveError
    from edgeweave.testbed import down, emulation_support

    ok, why = emulation_support()
    if not ok and why == "not root":
        raise EdgeweaveError("testbed down: needs root (it deletes namespaces and cgroups)")
    r = down(_prefix(spec, prefix))
    n = sum(len(v) for v in r["removed"].values())
    console.print(f"removed {n} objects named {r['prefix']}*, stopped {len(r['killed_pids'])} processes")
    if r["remaining"]:
        console.print(f"[red]could not remove: {r['remaining']}[/]")
    emit_json(r, json_out)
    if r["remaining"]:
        raise typer.Exit(1)


@testbed_app.command("status")
def status(
    spec: Optional[Path] = typer.Option(None, "--spec", help="Spec file (only its prefix is used)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Prefix of the testbed (default: the spec's, else ew-)."),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="Measure leader -> follower bandwidth (about 1 s per follower)."),
    seconds: float = typer.Option(1.0, "--seconds", min=0.2, help="Length of each bandwidth measurement."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Devices, caps in force and measured bandwidth of the running testbed."""
    from edgeweave.testbed import Testbed

    tb = Testbed.attach(_prefix(spec, prefix))
    st = tb.status(measure=measure, seconds=seconds)
    _show(st)
    emit_json(st, json_out)
