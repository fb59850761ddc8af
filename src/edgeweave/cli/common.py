"""What every subcommand shares: JSON output per the contract, console on stderr, errors.

Contract (DESIGN.md): ``--json`` prints one JSON object on stdout, ``--json PATH`` writes it to
PATH; tables and progress bars go to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from edgeweave.console import console, progress_bar  # noqa: F401  (re-exported for commands)


# `--json` alone means stdout ("-"); `--json PATH` writes to PATH. Typer has no optional-value
# options, so main() rewrites a bare `--json` to `--json -` (see normalize_json_flag).
JsonOpt = typer.Option(
    None,
    "--json",
    metavar="[PATH]",
    help="Print one JSON object on stdout (or write it to PATH).",
)


def normalize_json_flag(argv: list[str]) -> list[str]:
    """Give a bare ``--json`` (last, or followed by another option) the value ``-`` (stdout)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--json" and (i + 1 == len(argv) or argv[i + 1].startswith("-") and argv[i + 1] != "-"):
            out.append("-")
    return out


def _clean(obj: Any) -> Any:
    """Make NaN/inf JSON-safe (null) so every consumer can parse the output."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def emit_json(result: dict[str, Any], target: Optional[str]) -> None:
    """Write ``result`` per the contract; does nothing when ``--json`` was not given."""
    if target is None:
        return
    text = json.dumps(_clean(result), indent=2)
    if target == "-":
        typer.echo(text)
    else:
        p = Path(target)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")
        console.print(f"[dim]wrote {p}[/dim]")
