"""`edgeweave demo`: the main job on the embedded default data (see edgeweave.demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeweave.cli.common import JsonOpt, console, emit_json


def demo(
    out: Path = typer.Option(Path("results/demo"), "--out", "-o",
                             help="Folder for the checkpoints, plots (PNG), report.md and summary.json."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Run edgeweave end to end on data shipped with its dependencies, on this machine.

    1. Train a teacher CNN on 5,000 real MNIST digits (fixed epochs and seeds).

    2. Distil a multi-exit student from it, calibrate its operating points, serve requests under latency budgets and count the budgets exceeded.

    3. As root on Linux: build an emulated cluster (leader + 3 followers, 0.25 core each, 1000 Mbit/s links: network namespaces, tc, cgroups), run an untrained VGG16 at 224 on a real photo over it and compare with one equally capped device running plain torch and ONNX Runtime, with the plan and a timeline. Elsewhere devices cannot be emulated: the step only checks that a run over local processes equals one device's.

    A few minutes on an idle 2-core machine. Writes the summary (mnist_accuracy, teacher_accuracy, distributed_speedup, distributed_speedup_over_ort, distributed_rel_err, exits_speedup_at_1pt, budget_violations, ...) to OUT/summary.json and to --json, a report to OUT/report.md and plots to OUT/*.png.
    """  # one line per paragraph: --help keeps the line breaks of the source
    from rich.table import Table

    from edgeweave.demo import HEADLINE, run_demo

    summary = run_demo(out)
    console.rule("demo finished")
    t = Table(title="summary", title_justify="left")
    t.add_column("key")
    t.add_column("value", justify="right")
    for k in HEADLINE:
        v = summary.get(k)
        t.add_row(k, "n/a" if v is None else f"{v:.1e}" if k == "distributed_rel_err" else f"{v:.4g}")
    console.print(t)
    if not summary.get("emulated"):
        console.print("distributed_speedup: n/a, the devices could not be emulated here (see step 3)")
    m0, m1 = summary["machine_before"]["loadavg"], summary["machine_after"]["loadavg"]
    console.print(f"total {summary['seconds']:.0f} s (load average {m0} before, {m1} after)")
    console.print("written: " + ", ".join(str(v) for v in summary["files"].values()))
    emit_json(summary, json_out)


def register(app: typer.Typer) -> None:
    app.command()(demo)
