"""`edgeweave distill`: train a student under a teacher checkpoint (KL, JS or Wasserstein),
with the shared loop (progress bar, best checkpoint, resume, JSON summary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edgeweave.cli.common import JsonOpt, console, emit_json


def parse_kwargs(text: Optional[str], what: str = "--model-kwargs") -> dict:
    """A JSON object given on the command line (architecture keyword arguments)."""
    from edgeweave.errors import EdgeweaveError

    if not text:
        return {}
    try:
        d = json.loads(text)
    except ValueError:
        raise EdgeweaveError(f"{what} must be a JSON object, e.g. '{{\"width\": 8}}', got {text!r}") from None
    if not isinstance(d, dict):
        raise EdgeweaveError(f"{what} must be a JSON object, got {text!r}")
    return d


def distill(
    teacher: Path = typer.Option(..., "--teacher", "-t", help="Teacher checkpoint (.safetensors, e.g. from `edgeweave train`)."),
    student: str = typer.Option(..., "--student", "-s", help="Student registry name (or a checkpoint to continue from)."),
    dataset: str = typer.Option("mnist5k", "--dataset", "-d"),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of a local dataset (cifar100, neucls)."),
    distance: str = typer.Option("kl", "--distance", help="kl, js or ws (Wasserstein-1 over class order)."),
    temperature: float = typer.Option(4.0, "--temperature", "-T", help="Softmax temperature (soft term scaled by T^2)."),
    beta: float = typer.Option(0.5, "--beta", help="Weight of the distillation term against cross-entropy."),
    epochs: int = typer.Option(10, min=1),
    lr: float = typer.Option(0.05),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    seed: int = typer.Option(0),
    model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="JSON keyword arguments of the student architecture."),
    out: Path = typer.Option(Path("runs/distill"), "--out", "-o"),
    resume: bool = typer.Option(False, "--resume"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Distil TEACHER into STUDENT on a dataset; keeps the best validation checkpoint."""
    import torch

    from edgeweave.checkpoint import ModelSpec, is_checkpoint_path, load_checkpoint
    from edgeweave.compress.distill import check_distance
    from edgeweave.compress.distill import distill as run_distill
    from edgeweave.data import load_dataset
    from edgeweave.errors import EdgeweaveError

    if threads:
        torch.set_num_threads(threads)
    check_distance(distance)
    bundle = load_dataset(dataset, root, seed=seed)
    t_model, t_spec, _ = load_checkpoint(teacher)
    if t_spec.num_classes != bundle.num_classes:
        raise EdgeweaveError(f"teacher {teacher} has {t_spec.num_classes} classes; {dataset} has {bundle.num_classes}")
    if is_checkpoint_path(student):
        s_model, spec, _ = load_checkpoint(student)
    else:
        spec = ModelSpec(student, bundle.num_classes, bundle.in_channels, bundle.input_size, parse_kwargs(model_kwargs),
                         bundle.classes)
        s_model = spec.build()
    console.print(f"distilling [bold]{t_spec.name}[/bold] -> [bold]{spec.name}[/bold] on {dataset} "
                  f"({distance}, T={temperature}, beta={beta})")
    r = run_distill(t_model, s_model, bundle, epochs=epochs, distance=distance, temperature=temperature, beta=beta,
                    lr=lr, batch_size=batch_size, seed=seed, out_dir=out, spec=spec, resume=resume,
                    extra={"dataset": dataset, "teacher": str(teacher)})
    console.print(f"student test accuracy [bold]{r.accuracy:.4f}[/bold] (best val {r.best_accuracy:.4f}); checkpoint {r.checkpoint}")
    emit_json({"teacher": str(teacher), "student": spec.name, "dataset": dataset, "distance": distance,
               "temperature": temperature, "beta": beta, **r.to_dict()}, json_out)


def register(app: typer.Typer) -> None:
    app.command()(distill)
