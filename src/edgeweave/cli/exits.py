"""`edgeweave exits train|calibrate|predict|combine`: multi-exit training strategies, operating
points measured on this device (stored in the checkpoint), on-demand prediction under a latency
budget or an accuracy target, and several calibrated variants deployed as one checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeweave.cli.common import JsonOpt, console, emit_json
from edgeweave.cli.distill import parse_kwargs

exits_app = typer.Typer(
    name="exits",
    help="Early exits: train a multi-exit model, calibrate its operating points, predict on demand.",
    no_args_is_help=True,
)


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    from edgeweave.errors import EdgeweaveError

    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EdgeweaveError(f"{what} must be comma-separated numbers, got {text!r}") from None


@exits_app.command("train")
def train(
    model: str = typer.Option("multi_exit_small", "--model", "-m", help="Multi-exit registry name (multi_exit_small, multi_exit_resnet18, multi_exit_tv_resnet)."),
    dataset: str = typer.Option("mnist5k", "--dataset", "-d"),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of a local dataset (cifar100, neucls)."),
    strategy: str = typer.Option("sync", "--strategy", help="sync, async (deepest first) or async_back (shallowest first)."),
    epochs: int = typer.Option(10, min=1, help="Epochs per phase."),
    exit_weights: Optional[str] = typer.Option(None, "--exit-weights", help="sync loss weights, e.g. 0.2,0.2,0.6."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", "-t", help="Teacher checkpoint: distil every exit from it."),
    distance: str = typer.Option("kl", "--distance", help="kl, js or ws."),
    temperature: float = typer.Option(4.0, "--temperature", "-T"),
    beta: float = typer.Option(0.5, "--beta"),
    lr: float = typer.Option(0.05),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    seed: int = typer.Option(0),
    model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="JSON architecture arguments, e.g. '{\"exit_after\": [\"layer2\", \"layer3.0\"]}'."),
    out: Path = typer.Option(Path("runs/exits"), "--out", "-o", help="Folder: model.safetensors and per-phase resume state."),
    resume: bool = typer.Option(False, "--resume"),
    threads: int = typer.Option(0, "--threads"),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Train a multi-exit model with a strategy, optionally distilled; writes OUT/model.safetensors."""
    import torch

    from edgeweave.checkpoint import ModelSpec, load_checkpoint
    from edgeweave.data import load_dataset
    from edgeweave.exits.train import train_multi_exit

    if threads:
        torch.set_num_threads(threads)
    bundle = load_dataset(dataset, root, seed=seed)
    spec = ModelSpec(model, bundle.num_classes, bundle.in_channels, bundle.input_size, parse_kwargs(model_kwargs), bundle.classes)
    net = spec.build()
    t_model = load_checkpoint(teacher)[0] if teacher is not None else None
    console.print(f"training [bold]{model}[/bold] ({strategy}{', distilled ' + distance if teacher else ''}) on {dataset}")
    r = train_multi_exit(net, bundle, strategy=strategy, epochs=epochs, exit_weights=_floats(exit_weights, "--exit-weights"),
                         teacher=t_model, distance=distance, temperature=temperature, beta=beta, lr=lr,
                         batch_size=batch_size, seed=seed, out_dir=out, spec=spec, resume=resume,
                         extra={"dataset": dataset, "teacher": str(teacher) if teacher else None})
    console.print(f"exit test accuracies {' '.join(f'{a:.4f}' for a in r.exit_accuracies)}; checkpoint {r.checkpoint}")
    emit_json({"model": model, "dataset": dataset, **r.to_dict()}, json_out)


@exits_app.command("calibrate")
def calibrate(
    checkpoint: Path = typer.Argument(..., help="Multi-exit checkpoint (from `exits train`)."),
    dataset: str = typer.Option("mnist5k", "--dataset", "-d"),
    root: Optional[Path] = typer.Option(None, "--root"),
    seed: int = typer.Option(0, help="Dataset split seed (use the one the model was trained with)."),
    confidence: str = typer.Option("max_softmax", "--confidence", help="max_softmax or entropy."),
    voting_weights: Optional[str] = typer.Option(None, "--voting-weights", help="Per-exit vote weights, e.g. 1,2,3."),
    proportions: Optional[str] = typer.Option(None, "--proportions", help="Targets to sweep, ';'-separated, e.g. '0.5,0.3;0.8,0.1' (default: a grid)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Measure on at most this many validation samples."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the calibrated checkpoint here instead of in place."),
    threads: int = typer.Option(1, "--threads", help="torch threads while measuring (latency is per device setting)."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Measure operating points (accuracy, mean/p95 latency at batch 1, exit proportions, peak
    memory) for a sweep of thresholds and store them in the checkpoint."""
    import torch

    from edgeweave.data import load_dataset
    from edgeweave.exits.ondemand import calibrate_checkpoint

    torch.set_num_threads(threads)
    grid = [_floats(g, "--proportions") for g in proportions.split(";")] if proportions else None
    bundle = load_dataset(dataset, root, seed=seed)
    points, target = calibrate_checkpoint(checkpoint, bundle, out=out, confidence=confidence,
                                          voting_weights=_floats(voting_weights, "--voting-weights"), grid=grid,
                                          limit=limit, progress=True)
    from edgeweave.exits.evaluate import points_table

    console.print(points_table(points, f"operating points of {checkpoint.name} ({threads} thread, batch 1)"))
    console.print(f"stored {len(points)} operating points in {target}")
    emit_json({"checkpoint": str(target), "threads": threads, "operating_points": [p.to_dict() for p in points]}, json_out)


@exits_app.command("predict")
def predict(
    checkpoint: Path = typer.Argument(..., help="Calibrated multi-exit checkpoint."),
    latency_budget_ms: Optional[float] = typer.Option(None, "--latency-budget-ms", "-l", help="Best accuracy whose p95 latency fits this."),
    min_accuracy: Optional[float] = typer.Option(None, "--min-accuracy", "-a", help="Fastest point reaching this accuracy (fraction, e.g. 0.97)."),
    dataset: str = typer.Option("mnist5k", "--dataset", "-d", help="Samples to classify come from its test split."),
    root: Optional[Path] = typer.Option(None, "--root"),
    count: int = typer.Option(8, "--count", "-n", min=1, help="How many test samples."),
    start: int = typer.Option(0, "--start", help="First test index."),
    strict: bool = typer.Option(False, "--strict", help="Exit with code 2 when no point satisfies the request."),
    threads: int = typer.Option(1, "--threads"),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Classify test samples at the operating point a latency budget / accuracy target asks for."""
    import torch

    from edgeweave.data import load_dataset
    from edgeweave.errors import EdgeweaveError
    from edgeweave.exits.ondemand import OnDemandModel

    torch.set_num_threads(threads)
    od = OnDemandModel.load(checkpoint)
    bundle = load_dataset(dataset, root)
    n = len(bundle.test)
    if not 0 <= start < n:
        raise EdgeweaveError(f"--start must be in 0..{n - 1}")
    idx = list(range(start, min(n, start + count)))
    x = torch.stack([bundle.test[i][0] for i in idx])
    y = [int(bundle.test[i][1]) for i in idx]
    res = od.predict(x, latency_budget_ms=latency_budget_ms, min_accuracy=min_accuracy)
    style = "green" if res.choice.satisfied else "bold red"
    console.print(f"[{style}]{'satisfied' if res.choice.satisfied else 'NOT satisfiable'}[/{style}]: {res.choice.message}")
    for i, lab, ex, v in zip(idx, res.labels.tolist(), res.exits.tolist(), res.voted.tolist()):
        console.print(f"test[{i}]: predicted {lab} (true {y[idx.index(i)]}) at exit {ex}{' (vote)' if v else ''}")
    emit_json({**res.to_dict(), "indices": idx, "true_labels": y}, json_out)
    if strict and not res.choice.satisfied:
        raise EdgeweaveError(res.choice.message)


@exits_app.command("combine")
def combine(
    variants: list[str] = typer.Argument(..., help="NAME=CHECKPOINT, one per variant: calibrated multi-exit checkpoints of the same task."),
    out: Path = typer.Option(..., "--out", "-o", help="The variant set's checkpoint."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Deploy several variants of a task as one checkpoint (e.g. full=teacher.safetensors
    student=student.safetensors): served with --workers or --cluster, each request's budget or
    accuracy target picks the variant and the operating point."""
    from edgeweave.errors import EdgeweaveError
    from edgeweave.runtime.variants import combine_checkpoints

    pairs = {}
    for v in variants:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise EdgeweaveError(f"give each variant as NAME=CHECKPOINT, got {v!r}")
        if name in pairs:
            raise EdgeweaveError(f"variant {name!r} given twice")
        pairs[name] = path
    target, points = combine_checkpoints(pairs, out)
    for name, pts in points.items():
        console.print(f"{name}: {len(pts)} operating points, accuracy {min(p.accuracy for p in pts):.4f}"
                      f"-{max(p.accuracy for p in pts):.4f}")
    console.print(f"wrote {target}: serve it with `edgeweave serve {target} --workers N` (or --cluster)")
    emit_json({"checkpoint": str(target), "variants": {n: [p.to_dict() for p in pts] for n, pts in points.items()}},
              json_out)


def register(app: typer.Typer) -> None:
    app.add_typer(exits_app, name="exits")
