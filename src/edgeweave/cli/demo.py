"""`edgeweave demo`: the main job on the embedded default data (see edgeweave.demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeweave.cli.common import JsonOpt, console, emit_json


def demo(
    out: Path = typer.Option(Path("results/demo"), "--out", "-o", help="Folder for checkpoints, plots and JSON."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Run edgeweave end to end on the embedded data (mnist5k and a real photo), on this machine."""
    from edgeweave.demo import run_demo

    summary = run_demo(out)
    console.rule("demo finished")
    console.print(f"total {summary['seconds']:.0f} s; results under {out}")
    emit_json(summary, json_out)


def register(app: typer.Typer) -> None:
    app.command()(demo)
