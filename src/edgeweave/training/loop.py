"""The one training loop every workflow reuses (plain training, distillation, multi-exit
strategies, pruning fine-tunes): SGD with momentum and step decay like the original systems,
seeded, evaluated per epoch, keeping the best checkpoint, resumable.

Workflows change *what* is optimised through three hooks instead of copying the loop:
``loss_fn(model, x, y)`` (distillation, weighted exit losses), ``eval_fn(model, loader)``
(accuracy of a multi-exit model's chosen exit) and ``params`` (a frozen trunk).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from edgeweave.console import progress_bar
from edgeweave.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from edgeweave.data.bundle import DatasetBundle
from edgeweave.errors import EdgeweaveError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
EvalFn = Callable[[nn.Module, DataLoader], float]

BEST = "best.safetensors"
STATE = "last_state.pt"


@dataclass
class TrainResult:
    accuracy: float  # test accuracy of the best-validation model
    best_accuracy: float  # best validation accuracy
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "best_accuracy": self.best_accuracy, "epochs": self.epochs,
                "seconds": self.seconds, "history": self.history, "checkpoint": self.checkpoint}


def _logits(out: Any) -> torch.Tensor:
    """Models may return one tensor or a list (multi-exit); accuracy uses the last."""
    return out[-1] if isinstance(out, (list, tuple)) else out


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (_logits(model(x)).argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    return correct / max(total, 1)


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(model(x)), y)


def default_milestones(epochs: int) -> list[int]:
    """Step decay (x0.1) at 50% and 75% of training, the usual CIFAR schedule."""
    return sorted({max(1, math.ceil(epochs * 0.5)), max(1, math.ceil(epochs * 0.75))} - {epochs}) if epochs > 2 else []


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None, num_workers=0)


def fit(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    epochs: int,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    seed: int = 0,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    loss_fn: LossFn | None = None,
    eval_fn: EvalFn | None = None,
    params: Iterable[nn.Parameter] | None = None,
    out_dir: str | Path | None = None,
    spec: ModelSpec | None = None,
    resume: bool = False,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    max_seconds: float | None = None,
) -> TrainResult:
    """Train ``model`` in place and leave it holding the best-validation weights.

    With ``out_dir`` the best model is saved as ``best.safetensors`` (needs ``spec``) and the
    optimiser state after each epoch as ``last_state.pt``, which ``resume=True`` continues from.
    ``max_seconds`` stops after the epoch that crosses the budget (the demo's time box).
    """
    if epochs < 1:
        raise EdgeweaveError("epochs must be at least 1")
    if out_dir is not None and spec is None:
        raise ValueError("fit(out_dir=...) needs spec= to write a rebuildable checkpoint")
    torch.manual_seed(seed)
    loss_fn = loss_fn or cross_entropy_loss
    eval_fn = eval_fn or evaluate
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones) if milestones is not None else default_milestones(epochs), gamma)
    val_loader = make_loader(bundle.val, 256, False)
    test_loader = make_loader(bundle.test, 256, False)

    out = Path(out_dir) if out_dir is not None else None
    start_epoch, best_acc, history = 0, -1.0, []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume and out is not None and (out / STATE).is_file():
        state = torch.load(out / STATE, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best_acc = int(state["epoch"]), float(state["best_accuracy"])
        history = [dict(zip(state["history_keys"], row)) for row in state["history"].tolist()]
        if (out / BEST).is_file():
            best_state = load_checkpoint(out / BEST)[0].state_dict()

    t0 = time.perf_counter()
    n_batches = math.ceil(len(bundle.train) / batch_size)
    bar = progress_bar(progress)
    with bar:
        task = bar.add_task("training", total=(epochs - start_epoch) * n_batches)
        for epoch in range(start_epoch, epochs):
            model.train()
            loader = make_loader(bundle.train, batch_size, True, seed + epoch)
            running, seen = 0.0, 0
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, x, y)
                if not torch.isfinite(loss):
                    raise EdgeweaveError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); try a lower --lr")
                loss.backward()
                opt.step()
                running += loss.item() * y.numel()
                seen += y.numel()
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{epochs} loss {running / seen:.3f}")
            sched.step()
            acc = eval_fn(model, val_loader)
            history.append({"epoch": epoch + 1, "loss": running / max(seen, 1), "val_accuracy": acc, "lr": opt.param_groups[0]["lr"]})
            if acc > best_acc:
                best_acc = acc
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if out is not None:
                    save_checkpoint(out / BEST, model, spec, {**(extra or {}), "val_accuracy": acc, "epoch": epoch + 1})  # type: ignore[arg-type]
            if out is not None:
                keys = list(history[0])
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "epoch": epoch + 1, "best_accuracy": best_acc, "history_keys": keys,
                            "history": torch.tensor([[h[k] for k in keys] for h in history], dtype=torch.float64)}, out / STATE)
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                break
    model.load_state_dict(best_state)
    test_acc = eval_fn(model, test_loader)
    return TrainResult(test_acc, best_acc, history[-1]["epoch"] if history else start_epoch, time.perf_counter() - t0, history,
                       str(out / BEST) if out is not None else None)
