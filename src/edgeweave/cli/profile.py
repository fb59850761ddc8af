"""`edgeweave profile`: measure this device's compute model and write a device profile (JSON).

Thin wrapper over :func:`edgeweave.profiling.compute.profile_device`, plus the CPU per byte
this device spends sending or relaying (``byte_s``, :func:`edgeweave.profiling.link.measure_byte_s`
on loopback: a lower bound). The link itself (``bandwidth_bps``, ``latency_s``) is not measured
here: a cluster file gives it, :func:`edgeweave.profiling.link.probe_link` measures it between
two ranks of a gloo group, and ``bench edgeld`` measures it inside the testbed.

The compute model is measured for torch and, with ``--backend`` (default: every exact backend
installed here), for ONNX Runtime / OpenVINO too: the same layers compiled as a device's backend
compiles a stage; the profile keeps each backend's lines under ``backends``, which the planner's
``--backend auto`` chooses from.

``--json`` keys: ``profile`` (the DeviceProfile), ``fits`` (torch's, per kind: a, b, n_train, n_test,
heldout_median_rel_err, heldout_mean_rel_err, heldout_max_rel_err, train_median_rel_err),
``backend_fits`` (the same per other backend), ``speed_vs_torch`` (per backend: torch's predicted
seconds over its own, per kind),
``out`` (the profile path), ``samples_csv`` (every timed setting with the fit's prediction),
``plot`` (the fits, PNG), ``seconds``, ``settings``.
"""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from edgeweave.cli.common import JsonOpt, console, emit_json


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)


def profile(
    quick: bool = typer.Option(False, "--quick", help="Fewer, smaller settings: about 20 s (the full grid takes 2-3 min)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Profile JSON to write (default results/profile-<name>.json)."),
    name: Optional[str] = typer.Option(None, "--name", help="Device name stored in the profile (default: the hostname)."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch threads while timing (the runtime uses 1)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the setting sample and the held-out split."),
    block_s: Optional[float] = typer.Option(None, "--block-s", min=0.0, help="Timing block length in seconds (default 0.09 quick, 0.15 full); keep it >= 0.05 on a CPU-capped device."),
    backend: str = typer.Option("auto", "--backend", help="Backends to measure besides torch: auto (ONNX Runtime "
                                "when installed) | all (every exact one installed: OpenVINO compiles each layer "
                                "for about a second) | ort | openvino | openvino-bf16 | torch (torch only)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Draw the fits (PNG beside the profile); drawing takes "
                              "about 10 s of CPU, minutes on a device capped at a few percent of a core."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Time Conv2d/Linear/pooling/elementwise layers over a grid (batch 1, one thread, median
    over blocks of back-to-back calls so CPU caps are seen), fit seconds = a*FLOPs + b per kind, report held-out error, write the profile."""
    from rich.progress import Progress
    from rich.table import Table

    from edgeweave.engine.backends import available, check, is_exact
    from edgeweave.profiling.compute import profile_backends
    from edgeweave.profiling.link import measure_byte_s
    from edgeweave.profiling.report import plot_fits, write_samples_csv

    name = name or socket.gethostname()
    if backend in ("all", "auto"):
        wanted = [b for b in available() if b != "torch" and is_exact(b) and (backend == "all" or b == "ort")]
    else:
        check(backend)
        wanted = [] if backend == "torch" else [backend]
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("profiling", total=None)
        prof, reports = profile_backends(wanted, name=name, quick=quick, seed=seed, threads=threads, block_s=block_s,
                                         progress=lambda b, i, n: bar.update(task, description=f"profiling {b}",
                                                                             completed=i, total=n))
        report = reports["torch"]
        bar.update(task, description="CPU per byte moved (loopback)")
        prof = replace(prof, byte_s=measure_byte_s())
    path = out or Path("results") / f"profile-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prof.to_dict(), indent=2) + "\n")
    samples_csv, png = path.with_suffix(".samples.csv"), (path.with_suffix(".png") if plot else None)
    write_samples_csv(report["samples"], report["fits"], samples_csv, report.get("weights_fit"))
    if png is not None:
        plot_fits(report["samples"], report["fits"], png, f"{name}: seconds = a*FLOPs + b ({threads} thread)")

    table = Table(title=f"compute model of {name} (seconds = a*FLOPs + b, {threads} thread)")
    for c in ("kind", "a (s/FLOP)", "GFLOP/s", "b (ms)", "train/test", "held-out median err", "held-out max err"):
        table.add_column(c, justify="left" if c == "kind" else "right")
    for k, f in report["fits"].items():
        table.add_row(k, f"{f['a']:.3e}", f"{1e-9 / f['a']:.1f}", f"{f['b'] * 1e3:.3f}", f"{f['n_train']}/{f['n_test']}",
                      f"{100 * f['heldout_median_rel_err']:.1f}%", f"{100 * f['heldout_max_rel_err']:.1f}%")
    console.print(table)
    wf = report.get("weights_fit")
    if wf:
        console.print(f"thin strips (1-4 rows of wide layers, {wf['n']}): {1e9 * wf['a']:.3f} ns per weight element read "
                      f"per call beyond the conv line; median error {100 * wf['median_rel_err_without']:.0f}% without it, "
                      f"{100 * wf['median_rel_err_with']:.0f}% with it (the planner weighs row strips against channel "
                      "slices with it)")
    speed = {}
    for b in wanted:
        line = prof.backends[b]
        # a kind whose fitted slope is 0 (thin-strip weight reads a backend's kernels hide) has no ratio
        speed[b] = {k: (prof.per_kind[k][0] / v[0]) for k, v in line["per_kind"].items()
                    if k in prof.per_kind and v[0] > 0}
        console.print(f"{b}: " + ", ".join(f"{k} {r:.2f}x" for k, r in speed[b].items())
                      + " torch's FLOPs per second (a over a)")
    console.print(f"CPU per byte sent or relayed: {1e9 * prof.byte_s:.2f} ms per MB (loopback: a lower bound; "
                  "the planner charges it to the leader for every strip it gathers and re-sends)")
    console.print(f"wrote {path} ({len(report['samples'])} settings in {report['seconds']:.1f} s); "
                  f"every setting in {samples_csv}" + (f", the fits plotted in {png}" if png else ""))
    emit_json({"profile": prof.to_dict(), "fits": report["fits"], "weights_fit": report.get("weights_fit"),
               "backend_fits": {b: reports[b]["fits"] for b in wanted}, "speed_vs_torch": speed,
               "out": str(path), "samples_csv": str(samples_csv),
               "plot": str(png) if png else None, "seconds": report["seconds"], "settings": len(report["samples"])}, json_out)
