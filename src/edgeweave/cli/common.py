"""What every subcommand shares: JSON output per the contract, console on stderr, errors.

Contract (DESIGN.md): ``--json`` prints one JSON object on stdout, ``--json PATH`` writes it to
PATH; tables and progress bars go to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from edgeweave.console import console, progress_bar  # noqa: F401  (re-exported for commands)
from edgeweave.errors import EdgeweaveError
from edgeweave.jsonio import dumps, write_json
from edgeweave.limits import MAX_INPUT_SIZE, MIN_INPUT_SIZE


def check_json_target(target: Optional[str]) -> Optional[str]:
    """``--json PATH`` must name a file in a folder that exists: checked when the command line is
    read, not after the work (and no folder is made on the way)."""
    if target is None or target == "-":
        return target
    p = Path(target)
    if p.is_dir():
        raise EdgeweaveError(f"--json {target}: is a folder; give a file name (or --json alone for stdout)")
    parent = p.parent
    if not parent.is_dir():
        raise EdgeweaveError(f"--json {target}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise EdgeweaveError(f"--json {target}: cannot write into folder {parent}")
    return target


# `--json` alone means stdout ("-"); `--json PATH` writes to PATH. Typer has no optional-value
# options, so main() rewrites a bare `--json` to `--json -` (see normalize_json_flag).
JsonOpt = typer.Option(
    None,
    "--json",
    metavar="[PATH]",
    help="Print one JSON object on stdout (or write it to PATH, in a folder that exists).",
    callback=check_json_target,
)


# Options of the commands that run or plan a model on a cluster (run, serve, plan)
ModelOpt = typer.Option(..., "--model", "-m", help="Registry name, torchvision:NAME, or checkpoint path.")
InputSizeOpt = typer.Option(None, "--input-size", "-n",
                            help=f"Input height and width, {MIN_INPUT_SIZE}-{MAX_INPUT_SIZE} and at least what the "
                            "model needs (32 for VGG; default: the checkpoint's, else 224).")
WorkersOpt = typer.Option(None, "--workers", "-w", help="Start K local followers (plus the leader); refused where "
                          "this machine's memory cannot hold them (about 0.4 GB each plus the model's size).")
ClusterOpt = typer.Option(None, "--cluster", help="Cluster file (DeviceProfile JSON/TOML); without --workers, wait "
                          "for followers started by hand with `edgeweave worker --leader HOST:PORT`.")
ListenOpt = typer.Option("0.0.0.0:29400", "--listen", help="HOST:PORT the leader listens on for followers "
                         "(with --cluster).")
PartitionOpt = typer.Option("optimal", "--partition", help="equal | bodp | ocbp | optimal")
FusionOpt = typer.Option("auto", "--fusion", help="none | pools | auto")
ModeOpt = typer.Option("exchange", "--mode", help="gather (EdgeLD) | exchange (halo exchange)")
SplitOpt = typer.Option("auto", "--split", help="How blocks are cut: rows | channels (every block where the maps "
                        "are small that can be, for experiments) | auto: with --partition optimal, output "
                        "channels where the maps are small and that is predicted faster, rows elsewhere.")
BackendOpt = typer.Option("auto", "--backend", help="What each device computes with: torch | ort (ONNX Runtime) | "
                          "openvino (f32) | openvino-bf16 (not exact) | auto: per device the fastest its profile "
                          "measured (ONNX Runtime where not measured), torch where a backend cannot compile a stage.")


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
        try:
            console.print(f"[dim]wrote {write_json(target, result, parents=False)}[/dim]")
        except OSError as e:  # the folder went away while the command ran
            raise EdgeweaveError(f"--json {target}: cannot write: {e.strerror or e}") from None


def told_early(timeout: float | None = None, input_size: int | None = None, cluster: str | None = None) -> None:
    """The checks a command can make before torch is imported, so that a mistake in a value or
    in the cluster file is told at once; the library repeats them for its other callers."""
    from edgeweave.limits import check_input_size, check_timeout
    from edgeweave.profiling.profile import Cluster

    if timeout is not None:
        check_timeout(timeout)
    check_input_size(input_size)
    if cluster:
        Cluster.load(cluster)
