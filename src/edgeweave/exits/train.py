"""Training strategies for multi-exit networks (EdgeKE), each optionally with distillation.

- ``sync``: all exits trained jointly, loss = sum_k w_k L_k (default w = 0.2, 0.2, 0.6 for three
  exits; for K exits the last gets 0.6 and the others share 0.4).
- ``async``: the deepest exit first (the whole trunk + final head, i.e. the main model), then
  the earlier heads with the shared trunk frozen.
- ``async_back``: the shallowest exit first (segment 0 + head 0), then each deeper segment and
  its head with everything before it frozen.

With a ``teacher``, every exit's loss L_k is the distillation loss
CE + beta * T^2 * D(teacher, exit k) (``compress.distill``); without, L_k = CE.

Every phase runs the shared loop (``training.loop.fit``) with a ``loss_fn`` that computes only
the exits that phase trains, ``params`` restricted to the trainable parts, and an ``eval_fn``
scoring the mean validation accuracy of those exits. Frozen segments run under ``no_grad`` and
in eval mode on every step, so their BatchNorm statistics stay fixed as well as their weights
(the loop puts the whole model in train mode each epoch). ``epochs`` is per phase, as in the
original (main_Epoch / branch_Epoch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from edgeweave.compress.distill import check_distance, soft_loss
from edgeweave.errors import EdgeweaveError
from edgeweave.models.multi_exit import MultiExitNet

STRATEGIES = ("sync", "async", "async_back")


def default_exit_weights(num_exits: int) -> list[float]:
    if num_exits == 1:
        return [1.0]
    return [0.4 / (num_exits - 1)] * (num_exits - 1) + [0.6]


@dataclass
class Phase:
    """One call of the training loop: which exits are trained, how many leading segments are frozen."""

    exits: list[int]
    frozen_segments: int
    train_segments: list[int]
    weights: list[float]

    def params(self, model: MultiExitNet) -> list[nn.Parameter]:
        ps: list[nn.Parameter] = []
        for j in self.train_segments:
            ps += list(model.segments[j].parameters())
        for k in self.exits:
            ps += list(model.heads[k].parameters())
        return ps


def plan_phases(strategy: str, num_exits: int, exit_weights: Sequence[float] | None = None) -> list[Phase]:
    """The phases of a strategy (pure)."""
    k_all = list(range(num_exits))
    if strategy == "sync":
        w = list(exit_weights) if exit_weights is not None else default_exit_weights(num_exits)
        if len(w) != num_exits:
            raise EdgeweaveError(f"need {num_exits} exit weights, got {len(w)}")
        return [Phase(k_all, 0, k_all, [float(v) for v in w])]
    if strategy == "async":
        phases = [Phase([num_exits - 1], 0, k_all, [1.0])]
        if num_exits > 1:
            phases.append(Phase(k_all[:-1], num_exits - 1, [], [1.0] * (num_exits - 1)))
        return phases
    if strategy == "async_back":
        return [Phase([k], k, [k], [1.0]) for k in k_all]
    raise EdgeweaveError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def make_phase_loss(phase: Phase, teacher: nn.Module | None = None, *, distance: str = "kl",
                    temperature: float = 4.0, beta: float = 1.0):
    """``loss_fn(model, x, y)`` for one phase (see the module docstring)."""
    if teacher is not None:
        check_distance(distance)
    last = max(phase.exits)

    def loss_fn(model: MultiExitNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats: dict[int, torch.Tensor] = {}
        h = x
        n_frozen = min(phase.frozen_segments, last + 1)
        if n_frozen:
            with torch.no_grad():
                for j in range(n_frozen):
                    model.segments[j].eval()
                    h = model.segments[j](h)
                    feats[j] = h
        for j in range(n_frozen, last + 1):
            h = model.segments[j](h)
            feats[j] = h
        t_logits = None
        if teacher is not None and beta != 0:
            teacher.eval()
            with torch.no_grad():
                t_logits = teacher(x)
        total = x.new_zeros(())
        for k, w in zip(phase.exits, phase.weights):
            logits = model.heads[k](feats[k])
            lk = F.cross_entropy(logits, y)
            if t_logits is not None:
                lk = lk + beta * soft_loss(logits, t_logits, distance, temperature)
            total = total + w * lk
        return total

    return loss_fn


@torch.no_grad()
def exit_accuracies(model: MultiExitNet, loader: DataLoader) -> list[float]:
    """Accuracy of every exit when all samples are forced through it."""
    was = model.training
    model.eval()
    correct = torch.zeros(model.num_exits)
    total = 0
    for x, y in loader:
        for k, out in enumerate(model.forward_all(x)):
            correct[k] += (out.argmax(1) == y).sum()
        total += y.numel()
    model.train(was)
    return (correct / max(total, 1)).tolist()


def make_exit_eval(exits: Sequence[int]):
    def eval_fn(model: MultiExitNet, loader: DataLoader) -> float:
        accs = exit_accuracies(model, loader)
        return sum(accs[k] for k in exits) / len(exits)

    return eval_fn


@dataclass
class MultiExitTrainResult:
    strategy: str
    exit_accuracies: list[float]  # test accuracy of each exit
    val_exit_accuracies: list[float]
    seconds: float
    phases: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None
    distillation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "exit_accuracies": self.exit_accuracies,
                "val_exit_accuracies": self.val_exit_accuracies, "full_accuracy": self.exit_accuracies[-1],
                "seconds": self.seconds, "phases": self.phases, "checkpoint": self.checkpoint,
                "distillation": self.distillation}


def train_multi_exit(model: MultiExitNet, bundle: Any, *, strategy: str = "sync", epochs: int | Sequence[int] = 10,
                     exit_weights: Sequence[float] | None = None, teacher: nn.Module | None = None,
                     distance: str = "kl", temperature: float = 4.0, beta: float = 1.0,
                     out_dir: str | Path | None = None, spec: Any = None, extra: dict[str, Any] | None = None,
                     **fit_kwargs: Any) -> MultiExitTrainResult:
    """Train ``model`` in place with ``strategy``; ``epochs`` is per phase (an int, or one per
    phase). ``fit_kwargs`` go to ``training.loop.fit`` (lr, batch_size, seed, resume, progress,
    max_seconds, ...). With ``out_dir`` (and ``spec``) each phase keeps its own resumable state
    under ``out_dir/phaseN`` and the final model is written to ``out_dir/model.safetensors``."""
    from edgeweave.checkpoint import save_checkpoint
    from edgeweave.training.loop import fit, make_loader

    if not isinstance(model, MultiExitNet):
        raise EdgeweaveError("exits training needs a multi-exit model (multi_exit_small, multi_exit_resnet18, ...)")
    phases = plan_phases(strategy, model.num_exits, exit_weights)
    per_phase = [int(epochs)] * len(phases) if isinstance(epochs, int) else [int(e) for e in epochs]
    if len(per_phase) != len(phases):
        raise EdgeweaveError(f"strategy {strategy} has {len(phases)} phases; got {len(per_phase)} epoch counts")
    kd = {"distance": distance, "temperature": temperature, "beta": beta} if teacher is not None else None
    info = {"strategy": strategy, "epochs": per_phase, "distillation": kd, **(extra or {})}
    t0 = time.perf_counter()
    results = []
    for i, (ph, ep) in enumerate(zip(phases, per_phase)):
        sub = Path(out_dir) / f"phase{i}" if out_dir is not None else None
        r = fit(model, bundle, epochs=ep, loss_fn=make_phase_loss(ph, teacher, distance=distance,
                                                                   temperature=temperature, beta=beta),
                eval_fn=make_exit_eval(ph.exits), params=ph.params(model), out_dir=sub, spec=spec,
                extra={"exits_training": info, "phase": i}, **fit_kwargs)
        results.append({"exits": ph.exits, "frozen_segments": ph.frozen_segments, "epochs": r.epochs,
                        "best_val_accuracy": r.best_accuracy, "seconds": r.seconds})
    model.eval()
    test = exit_accuracies(model, make_loader(bundle.test, 256, False))
    val = exit_accuracies(model, make_loader(bundle.val, 256, False))
    ckpt = None
    if out_dir is not None and spec is not None:
        ckpt = str(save_checkpoint(Path(out_dir) / "model.safetensors", model, spec,
                                   {"exits_training": {**info, "exit_accuracies": test}}))
    return MultiExitTrainResult(strategy, test, val, time.perf_counter() - t0, results, ckpt, kd)
