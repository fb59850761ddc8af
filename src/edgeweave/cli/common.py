"""What every subcommand shares: JSON output per the contract, console on stderr, errors.

Contract (DESIGN.md): ``--json`` prints one JSON object on stdout, ``--json PATH`` writes it to
PATH; tables and progress bars go to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from edgeweave.console import console, progress_bar  # noqa: F401  (re-exported for commands)
from edgeweave.jsonio import dumps, write_json


# `--json` alone means stdout ("-"); `--json PATH` writes to PATH. Typer has no optional-value
# options, so main() rewrites a bare `--json` to `--json -` (see normalize_json_flag).
JsonOpt = typer.Option(
    None,
    "--json",
    metavar="[PATH]",
    help="Print one JSON object on stdout (or write it to PATH).",
)


# Options of the commands that run or plan a model on a cluster (run, serve, plan)
ModelOpt = typer.Option(..., "--model", "-m", help="Registry name, torchvision:NAME, or checkpoint path.")
InputSizeOpt = typer.Option(None, "--input-size", "-n",
                            help="Input height and width (default: the checkpoint's, else 224).")
WorkersOpt = typer.Option(None, "--workers", "-w", help="Start K local followers (plus the leader).")
ClusterOpt = typer.Option(None, "--cluster", help="Cluster file (DeviceProfile JSON/TOML); without --workers, wait "
                          "for followers started by hand with `edgeweave worker --leader HOST:PORT`.")
ListenOpt = typer.Option("0.0.0.0:29400", "--listen", help="HOST:PORT the leader listens on for followers "
                         "(with --cluster).")
PartitionOpt = typer.Option("optimal", "--partition", help="equal | bodp | ocbp | optimal")
FusionOpt = typer.Option("auto", "--fusion", help="none | pools | auto")
ModeOpt = typer.Option("exchange", "--mode", help="gather (EdgeLD) | exchange (halo exchange)")


def normalize_json_flag(argv: list[str]) -> list[str]:
    """Give a bare ``--json`` (last, or followed by another option) the value ``-`` (stdout)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--json" and (i + 1 == len(argv) or argv[i + 1].startswith("-") and argv[i + 1] != "-"):
            out.append("-")
    return out


def emit_json(result: dict[str, Any], target: Optional[str]) -> None:
    """Write ``result`` per the contract; does nothing when ``--json`` was not given."""
    if target is None:
        return
    if target == "-":
        typer.echo(dumps(result))
    else:
        console.print(f"[dim]wrote {write_json(target, result)}[/dim]")
