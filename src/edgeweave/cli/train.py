"""`edgeweave train`: the shared training loop on a named dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeweave.cli.common import JsonOpt, console, emit_json


def train(
    model: str = typer.Option(..., "--model", "-m", help="Registry name (e.g. small_cnn, cifar_resnet18, torchvision:vgg16) or a checkpoint to continue from."),
    dataset: str = typer.Option("mnist5k", "--dataset", "-d", help="mnist5k, digits, cifar100, neucls or synthetic."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of a local dataset (cifar100, neucls)."),
    epochs: int = typer.Option(10, min=1, help="Training epochs (step decay x0.1 at 50% and 75%)."),
    lr: float = typer.Option(0.05, help="Initial SGD learning rate."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    momentum: float = typer.Option(0.9),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    seed: int = typer.Option(0),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Image side for neucls/synthetic (default: dataset's own)."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Folder for best.safetensors and the resume state."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last_state.pt."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Stop after the epoch that passes this time budget."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Train a model on a dataset; keeps the best validation checkpoint; prints test accuracy."""
    import torch

    from edgeweave.checkpoint import ModelSpec, is_checkpoint_path, load_checkpoint
    from edgeweave.data import load_dataset
    from edgeweave.training import fit

    if threads:
        torch.set_num_threads(threads)
    bundle = load_dataset(dataset, root, seed=seed, input_size=input_size)
    if is_checkpoint_path(model):
        net, spec, _ = load_checkpoint(model)
        if spec.num_classes != bundle.num_classes or spec.in_channels != bundle.in_channels:
            from edgeweave.errors import EdgeweaveError

            raise EdgeweaveError(f"checkpoint {model} is for {spec.num_classes} classes / {spec.in_channels} channels; "
                                 f"{dataset} has {bundle.num_classes} / {bundle.in_channels}")
    else:
        spec = ModelSpec(model, bundle.num_classes, bundle.in_channels, bundle.input_size, {}, bundle.classes)
        net = spec.build()
    console.print(f"training [bold]{spec.name}[/bold] on {dataset} ({len(bundle.train)} train / {len(bundle.val)} val / "
                  f"{len(bundle.test)} test, {bundle.num_classes} classes)")
    result = fit(net, bundle, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
                 seed=seed, out_dir=out, spec=spec, resume=resume, max_seconds=max_seconds,
                 extra={"dataset": dataset})
    console.print(f"test accuracy [bold]{result.accuracy:.4f}[/bold] (best val {result.best_accuracy:.4f}) "
                  f"after {result.epochs} epochs in {result.seconds:.1f} s; checkpoint {result.checkpoint}")
    emit_json({"model": spec.name, "dataset": dataset, **result.to_dict()}, json_out)


def register(app: typer.Typer) -> None:
    app.command()(train)
