"""`edgeweave bench <experiment>`: experiments that write JSON (``--json PATH``), CSV and PNG
plots under ``--out`` (default ``results/``).

One Typer sub-app holds every experiment; adding one is one function here::

    @bench_app.command("edgeld")
    def edgeld(quick: bool = QuickOpt, out: Path = OutOpt, json_out: Optional[str] = JsonOpt) -> None:
        from edgeweave.bench.edgeld import run_edgeld_bench
        emit_json(run_edgeld_bench(quick=quick, out_dir=out), json_out)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeweave.cli.common import JsonOpt, console, emit_json

bench_app = typer.Typer(name="bench", help="Experiments: JSON, CSV and PNG plots under results/.", no_args_is_help=True)

QuickOpt = typer.Option(False, "--quick", help="Smaller run (minutes on a laptop CPU).")
OutOpt = typer.Option(Path("results"), "--out", "-o", help="Folder for plots, CSV and checkpoints.")


def _print_summary(name: str, result: dict, keys: tuple[str, ...]) -> None:
    """A testbed bench's targets (value, target, met), then ``keys`` of its summary, then its report."""
    console.rule(f"bench {name} summary")
    for k, t in result["targets"].items():
        console.print(f"{k}: {t['value']} (target {t['target']}, met: {t['met']})")
    for k in keys:
        console.print(f"{k}: {result['summary'].get(k)}")
    console.print(f"report {result['files']['report']}")


@bench_app.command("exits")
def exits(
    quick: bool = QuickOpt,
    dataset: str = typer.Option("mnist5k", "--dataset", "-d"),
    root: Optional[Path] = typer.Option(None, "--root", help="Local dataset folder (cifar100, neucls)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="'edgeke-cifar100': the paper's ResNet34 teacher / multi-exit ResNet18 student, 400 epochs, SGD step decay (needs --root)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Seeds for kd_gain (default 3)."),
    teacher_epochs: Optional[int] = typer.Option(None, "--teacher-epochs", min=1),
    student_epochs: Optional[int] = typer.Option(None, "--student-epochs", min=1),
    teacher_checkpoint: Optional[Path] = typer.Option(None, "--teacher-checkpoint", help="Use this trained teacher instead of training one."),
    out: Path = OutOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """EdgeKE on one device: teacher, student alone / distilled (kl, js, ws), every strategy,
    operating points, budgeted requests; summary keys speedup_at_1pct_loss, kd_gain, ..."""
    from edgeweave.bench.exits import ExitsBenchConfig, recipe_config, run_exits_bench

    over = {k: v for k, v in {"seeds": seeds, "teacher_epochs": teacher_epochs, "student_epochs": student_epochs,
                               "dataset": dataset, "root": str(root) if root else None,
                               "teacher_checkpoint": str(teacher_checkpoint) if teacher_checkpoint else None}.items() if v is not None}
    if recipe:
        cfg = recipe_config(recipe, **over)
    else:
        cfg = ExitsBenchConfig.quick(**over) if quick else ExitsBenchConfig(**over)
    result = run_exits_bench(cfg, out_dir=out)
    s = result["summary"]
    console.rule("bench exits summary")
    for k in ("teacher_accuracy", "full_accuracy", "speedup_at_1pct_loss", "speedup_vs_student", "kd_gain_best", "budget_violations"):
        console.print(f"{k}: {s[k]}")
    console.print(f"kd_gain per distance: {s['kd_gain']} (95% CI {s['kd_gain_ci95']}); plot {result['files']['plot']}")
    emit_json(result, json_out)


@bench_app.command("edgeld")
def edgeld(
    quick: bool = QuickOpt,
    repeat: Optional[int] = typer.Option(None, "--repeat", min=1, help="Timed inferences per configuration (default 5, quick 2)."),
    out: Path = OutOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """EdgeLD on the emulated testbed (root): followers 1..4 at 1000/100 Mbit/s, partitioners on a
    heterogeneous cluster, fusion modes, input sizes, predicted vs measured. Writes results/edgeld/
    (--quick: results/edgeld/quick/)."""
    from edgeweave.bench.edgeld import EdgeldConfig, run_edgeld_bench

    cfg = EdgeldConfig.quick_config() if quick else EdgeldConfig()
    if repeat is not None:
        cfg.repeat = repeat
    result = run_edgeld_bench(cfg, out_dir=out)
    console.rule("bench edgeld summary")
    for k, t in result["targets"].items():
        console.print(f"{k}: {t['value']} (target {t['target']}, met: {t['met']})")
    console.print(f"report {result['files']['report']}")
    emit_json(result, json_out)


@bench_app.command("edgedi")
def edgedi(
    quick: bool = QuickOpt,
    repeat: Optional[int] = typer.Option(None, "--repeat", min=1, help="Timed inferences per configuration (default 3, quick 2)."),
    out: Path = OutOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """EdgeDI on the emulated testbed (root): original / compact / compact+pruned VGG16 and
    ResNet18 at 200x200 on 1-4 heterogeneous devices beside the theoretical bound, and adaptive
    re-planning while a device's CPU cap changes mid-stream. Writes results/edgedi/."""
    from edgeweave.bench.edgedi import EdgediConfig, run_edgedi_bench

    cfg = EdgediConfig.quick_config() if quick else EdgediConfig()
    if repeat is not None:
        cfg.repeat = repeat
    result = run_edgedi_bench(cfg, out_dir=out)
    _print_summary("edgedi", result, ("compact_flops_ratio", "compact_speedup_4dev", "speedup_4dev", "bound_4dev"))
    emit_json(result, json_out)


@bench_app.command("ondemand")
def ondemand(
    quick: bool = QuickOpt,
    size: Optional[int] = typer.Option(None, "--input-size", "-n", min=16, max=512, help="Frame size in pixels (default 112, quick 64)."),
    requests: Optional[int] = typer.Option(None, "--requests", min=1, help="Budgeted requests (default 200, quick 60)."),
    out: Path = OutOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Every knob per request on the emulated testbed (root): a multi-exit ResNet18 and its
    distilled compact student on five 0.25-core devices; each request's latency budget picks the
    variant, the exit thresholds and runs them over the cluster's plans. Writes results/ondemand/."""
    from edgeweave.bench.ondemand import OndemandConfig, run_ondemand_bench

    cfg = OndemandConfig.quick_config() if quick else OndemandConfig()
    if size is not None:
        cfg.size = size
    if requests is not None:
        cfg.requests = requests
    result = run_ondemand_bench(cfg, out_dir=out)
    _print_summary("ondemand", result, ("full_accuracy", "full_cluster_ms", "full_single_torch_ms", "full_single_ort_ms",
                                        "config_at_1pct_loss", "budget_unsatisfied", "followers_skipped_fraction"))
    emit_json(result, json_out)


@bench_app.command("serve")
def serve(
    quick: bool = QuickOpt,
    model: str = typer.Option("vgg11", "--model", "-m", help="Model to serve (registry name or checkpoint)."),
    size: Optional[int] = typer.Option(None, "--input-size", "-n", min=8, help="Input size (default 96, quick 64)."),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Local followers beside the leader."),
    out: Path = OutOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """The HTTP API on loopback (no root): per-request overhead of raw and image requests over the
    inference itself, throughput with concurrent clients, and what a client sees when a follower
    is SIGKILLed between two requests. Writes results/serve/ (--quick: results/serve/quick/)."""
    from edgeweave.bench.serve import ServeBenchConfig, run_serve_bench

    cfg = ServeBenchConfig.quick_config() if quick else ServeBenchConfig()
    cfg.model, cfg.workers = model, workers
    if size is not None:
        cfg.size = size
    result = run_serve_bench(cfg, out_dir=out, quick=quick)
    console.rule("bench serve summary")
    for k, v in result["summary"].items():
        console.print(f"{k}: {v}")
    emit_json(result, json_out)


@bench_app.command("kernels")
def kernels(
    quick: bool = QuickOpt,
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="Models to compare (repeatable; default "
                                              "torchvision vgg16, resnet18, mobilenet_v2, efficientnet_b0 and "
                                              "compact_vgg16)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Interleaved rounds (default 15, quick 5)."),
    size: int = typer.Option(224, "--input-size", "-n", min=32, max=1024, help="Input height and width."),
    devices: int = typer.Option(5, "--devices", min=2, max=16, help="Devices of the plan whose shares are summed."),
    backend: Optional[list[str]] = typer.Option(None, "--backend", help="Backends to compare (repeatable; default "
                                                "every exact one installed here)."),
    out: Path = OutOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Per-device compute against what a user would run on one board: plain torch, raw ONNX
    Runtime on the whole model, edgeweave on one device per backend, and a plan's strips summed
    per backend (no root needed). Writes results/kernels/ (--quick: results/kernels/quick/)."""
    from edgeweave.bench.kernels import KernelsConfig, run_kernels_bench
    from edgeweave.engine.backends import check

    cfg = KernelsConfig.quick_config() if quick else KernelsConfig()
    for b in backend or []:
        check(b)
    cfg.size, cfg.devices = size, devices
    if model:
        cfg.models = tuple(model)
    if rounds is not None:
        cfg.rounds = rounds
    if backend:
        cfg.backends = tuple(dict.fromkeys(["torch", *backend]))
    result = run_kernels_bench(cfg, out_dir=out / "quick" if quick else out)
    console.rule("bench kernels summary")
    for k, t in result["targets"].items():
        console.print(f"{k}: {t['value']:.3f} (target {t['target']}, met: {t['met']})")
    console.print(f"max_rel_err: {result['summary']['max_rel_err']:.1e}; plot {result['files']['plot']}")
    emit_json(result, json_out)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


@bench_app.command("stream")
def stream(
    quick: bool = QuickOpt,
    frames: Optional[int] = typer.Option(None, "--frames", min=2, help="Frames per burst and per offered stream "
                                         "(default 40, quick 25)."),
    serve_clients: Optional[int] = typer.Option(None, "--serve-clients", min=0, help="Concurrent clients of "
                                                "serve --slo-ms at the relaxed SLO (default 50; 0: no serve phase)."),
    serve_seconds: Optional[float] = typer.Option(None, "--serve-seconds", min=5, help="How long the clients send "
                                                  "requests (default 60, quick 40)."),
    out: Path = OutOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Frames in flight on the emulated cluster (root): one frame at a time, every device a group
    of its own, and the planner's groups under a relaxed and a tight SLO; frames/s over one
    device (torch and ONNX Runtime) and p95 latency; serve --slo-ms under concurrent HTTP
    clients; a follower killed mid-stream. Writes results/stream/."""
    from edgeweave.bench.stream import StreamBenchConfig, run_stream_bench

    cfg = StreamBenchConfig.quick_config() if quick else StreamBenchConfig()
    if frames:
        cfg.frames = frames
    if serve_clients is not None:
        cfg.serve_clients = serve_clients
    if serve_seconds is not None:
        cfg.serve_seconds = serve_seconds
    result = run_stream_bench(cfg, out_dir=out)
    console.rule("bench stream summary")
    for k, v in result["summary"].items():
        console.print(f"{k}: {v if not isinstance(v, float) else f'{v:.4g}'}")
    emit_json(result, json_out)
