"""`edgeweave compress compact|prune`: EdgeDI compact architecture and L1 filter pruning.

Thin wrappers over ``edgeweave.compress.compact`` / ``prune`` / ``stats``; tables on stderr,
``--json`` on stdout (keys: see each command's docstring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from edgeweave.cli.common import JsonOpt, console, emit_json

compress_app = typer.Typer(
    name="compress",
    help="Compress a model: EdgeDI compact architecture (compact), L1 filter pruning (prune).",
    no_args_is_help=True,
)


def _default_size(name: str) -> int:
    """Input side a registry model is usually run at (checkpoints carry their own)."""
    if name.startswith("small_") or name.startswith("compact_small_"):
        return 28
    if name.startswith("cifar_") or name.startswith("compact_cifar_"):
        return 32
    return 224


def _stats_table(title: str, rows: list[tuple[str, Any]], columns: list[str]):
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*[str(v) for v in r])
    return table


def _fmt_lat(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms"


@compress_app.command("compact", short_help="EdgeDI compact architecture: each 3x3 conv -> 1x1, 3x3, channel attention, 1x1, ReLU, BN.")
def compact(
    model: str = typer.Option(..., "--model", "-m", help="Registry name (vgg16, resnet18, cifar_resnet18, small_cnn, ...) or a checkpoint."),
    ratio: int = typer.Option(8, "--ratio", min=1, help="Channel reduction r of each block: 1x1 Cin -> Cout/r."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Image side for FLOPs/latency (default: the checkpoint's, else 28 small_*, 32 cifar_*, 224)."),
    num_classes: int = typer.Option(10, "--num-classes", help="Classes, for a registry name (a checkpoint has its own)."),
    in_channels: int = typer.Option(3, "--in-channels", help="Input channels, for a registry name (1 for NEU-CLS)."),
    skip_costlier: bool = typer.Option(False, "--skip-costlier", help="Keep 3x3 convs whose compact form costs more (e.g. a 1-channel stem)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the compact model here (.safetensors); it rebuilds through the registry name 'compact'."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure batch-1 single-thread median latency."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed runs per latency measurement."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Replace every 3x3 conv by 1x1 -> 3x3 -> channel attention -> 1x1 -> ReLU -> BN and report
    parameters, FLOPs and latency before/after. JSON keys: model, ratio, input_shape, replaced,
    kept, before, after (params, flops, latency_s), params_ratio, flops_ratio, latency_ratio,
    checkpoint, spec."""
    from edgeweave.checkpoint import ModelSpec, is_checkpoint_path, load_model, save_checkpoint
    from edgeweave.compress.compact import compact_model
    from edgeweave.compress.stats import compare, model_stats
    from edgeweave.errors import EdgeweaveError

    size = input_size or (None if is_checkpoint_path(model) else _default_size(model))
    net, spec = load_model(model, num_classes=num_classes, in_channels=in_channels, input_size=size or 224)
    if input_size:
        spec.input_size = (input_size, input_size)
    shape = [1, spec.in_channels, *spec.input_size]
    result = compact_model(net, ratio=ratio, skip_costlier=skip_costlier)
    if not result.replaced:
        raise EdgeweaveError(f"{model}: no dense 3x3 convolution to replace (already compact?)")
    console.print(f"compacting [bold]{spec.name}[/bold]: {len(result.replaced)} 3x3 convs replaced, ratio {ratio}, input {shape}")
    before = model_stats(net, shape, latency=latency, repeats=repeats)
    after = model_stats(result.model, shape, latency=latency, repeats=repeats)
    ratios = compare(before, after)
    console.print(_stats_table(
        f"{spec.name} -> compact (r={ratio}) at {spec.input_size[0]}x{spec.input_size[1]}",
        [("original", f"{before.params:,}", f"{before.flops / 1e9:.3f}", _fmt_lat(before.latency_s), _fmt_lat(before.latency_min_s)),
         ("compact", f"{after.params:,}", f"{after.flops / 1e9:.3f}", _fmt_lat(after.latency_s), _fmt_lat(after.latency_min_s)),
         ("ratio", f"{ratios['params_ratio']:.3f}", f"{ratios['flops_ratio']:.3f}",
          "-" if ratios["latency_ratio"] is None else f"{ratios['latency_ratio']:.3f}", "")],
        ["model", "params", "GFLOPs", "latency (1 thread, median)", "min"],
    ))
    new_spec = ModelSpec("compact", spec.num_classes, spec.in_channels, spec.input_size,
                         {"base": spec.name, "ratio": ratio, "base_kwargs": dict(spec.kwargs),
                          **({"skip_costlier": True} if skip_costlier else {})}, spec.classes)
    if out is not None:
        save_checkpoint(out, result.model, new_spec, {"compact_of": model})
        console.print(f"wrote {out} (train it: edgeweave train --model {out} ...)")
    emit_json({
        "model": model, "ratio": ratio, "input_shape": shape, "replaced": len(result.replaced),
        "replaced_layers": result.replaced, "kept": result.kept,
        "before": before.to_dict(), "after": after.to_dict(), **ratios,
        "checkpoint": str(out) if out is not None else None, "spec": new_spec.to_dict(),
    }, json_out)


@compress_app.command("prune", short_help="L1 filter pruning in steps with fine-tuning, above a validation-accuracy floor.")
def prune(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Trained model checkpoint (.safetensors)."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset the model was trained on (mnist5k, digits, cifar100, neucls, synthetic)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of a local dataset (cifar100, neucls)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Image side (default: the checkpoint's)."),
    step: float = typer.Option(0.1, "--step", help="Fraction of each conv's original filters removed per step."),
    max_ratio: float = typer.Option(0.9, "--max-ratio", help="Never remove more than this fraction of a conv's filters."),
    min_accuracy: float = typer.Option(0.97, "--min-accuracy", help="Validation-accuracy floor; the first step under it is undone and pruning stops."),
    finetune_epochs: int = typer.Option(1, "--finetune-epochs", min=0, help="Fine-tuning epochs after each step (shared loop)."),
    lr: float = typer.Option(0.01, "--lr", help="Fine-tuning SGD learning rate."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Pruned checkpoint (default: CHECKPOINT stem + '-pruned.safetensors')."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure batch-1 single-thread median latency per step."),
    threads: int = typer.Option(0, "--threads", help="torch threads for fine-tuning (0: torch's default)."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """L1-norm filter pruning in steps with fine-tuning, keeping the last model whose validation
    accuracy stays at or above the floor. JSON keys: checkpoint, out, dataset, min_accuracy, step,
    steps (step, removed_fraction, params, flops, latency_s, val_accuracy, test_accuracy,
    accepted), final (the kept step), stopped_because, params_ratio, flops_ratio, latency_ratio."""
    import torch

    from edgeweave.checkpoint import load_checkpoint, save_checkpoint
    from edgeweave.compress.prune import finetune_with_loop, prune_with_floor, val_evaluator
    from edgeweave.data import load_dataset
    from edgeweave.errors import EdgeweaveError
    from edgeweave.training.loop import evaluate, make_loader

    if threads:
        torch.set_num_threads(threads)
    net, spec, extra = load_checkpoint(checkpoint)
    size = input_size or spec.input_size[0]
    bundle = load_dataset(dataset, root, seed=seed, input_size=size)
    if spec.num_classes != bundle.num_classes or spec.in_channels != bundle.in_channels:
        raise EdgeweaveError(f"checkpoint {checkpoint} is for {spec.num_classes} classes / {spec.in_channels} channels; "
                             f"{dataset} has {bundle.num_classes} / {bundle.in_channels}")
    shape = [1, spec.in_channels, *bundle.input_size]
    from rich.table import Table

    table = Table(title=f"L1 filter pruning of {checkpoint.name} (floor {min_accuracy})")
    for c in ("step", "removed", "params", "GFLOPs", "latency", "val acc", "test acc", "kept"):
        table.add_column(c, justify="right")

    def show(s) -> None:
        console.print(f"step {s.step}: removed {s.removed_fraction:.2f}, params {s.params:,}, {s.flops / 1e9:.4f} GFLOPs, "
                      f"latency {_fmt_lat(s.latency_s)}, val {s.val_accuracy:.4f}" + ("" if s.accepted else " [red]under the floor[/red]"))
        table.add_row(str(s.step), f"{s.removed_fraction:.2f}", f"{s.params:,}", f"{s.flops / 1e9:.4f}", _fmt_lat(s.latency_s),
                      f"{s.val_accuracy:.4f}", "-" if s.test_accuracy is None else f"{s.test_accuracy:.4f}",
                      "yes" if s.accepted else "no")

    result = prune_with_floor(
        net, shape, evaluate_val=val_evaluator(bundle),
        finetune=finetune_with_loop(bundle, epochs=finetune_epochs, lr=lr, batch_size=batch_size, seed=seed),
        step=step, max_ratio=max_ratio, min_accuracy=min_accuracy, latency=latency, on_step=show,
    )
    console.print(table)
    console.print(result.stopped_because)
    final = result.accepted
    if final.test_accuracy is None:
        final.test_accuracy = evaluate(result.model, make_loader(bundle.test, 256, False))
    target = out or checkpoint.with_name(checkpoint.stem + "-pruned.safetensors")
    first = result.steps[0]
    save_checkpoint(target, result.model, spec, {
        **extra, "dataset": dataset, "val_accuracy": final.val_accuracy, "test_accuracy": final.test_accuracy,
        "pruning": {"step": step, "min_accuracy": min_accuracy, "kept_step": final.step,
                    "removed_fraction": final.removed_fraction, "pruned_from": str(checkpoint)},
    })
    console.print(f"wrote {target}: step {final.step}, params {final.params:,} ({final.params / first.params:.3f} of the original), "
                  f"val {final.val_accuracy:.4f}, test {final.test_accuracy:.4f}")

    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    emit_json({
        "checkpoint": str(checkpoint), "out": str(target), "dataset": dataset, "min_accuracy": min_accuracy, "step": step,
        "input_shape": shape, "steps": [s.to_dict() for s in result.steps], "final": final.to_dict(),
        "stopped_because": result.stopped_because, "params_ratio": ratio(final.params, first.params),
        "flops_ratio": ratio(final.flops, first.flops), "latency_ratio": ratio(final.latency_s, first.latency_s),
    }, json_out)


def register(app: typer.Typer) -> None:
    app.add_typer(compress_app, name="compress")
