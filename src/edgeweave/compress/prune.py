"""L1-norm filter pruning in steps with fine-tuning, under an accuracy floor (EdgeDI, ALGORITHMS.md
section 3), on Torch-Pruning.

Torch-Pruning's ``DependencyGraph`` finds the layers whose channels are coupled (a conv, its
BatchNorm, the next conv's inputs, both sides of a residual add, the ``Linear`` of a
``ChannelAttention`` block, the classifier's inputs through flatten) and removes them together,
physically: the result is a smaller dense model, not a mask. Filters are ranked by the L1 norm
of their weights (``MagnitudeImportance(p=1)`` over the conv / linear weights of each coupled
group, averaged over the group), and only convolutions are pruning roots: this is *filter*
pruning, the classifier's hidden units and the output layer are left alone (the output layer is
found by running the model once: the last conv / linear layer executed).

Schedule: step k removes ``k * step`` of each prunable layer's *original* channels (Torch-
Pruning's linear iterative schedule), then fine-tunes with the shared loop and measures
validation accuracy. The first step whose accuracy falls under ``min_accuracy`` is undone and
pruning stops: the model returned is the last one at or above the floor.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from edgeweave.compress.stats import count_flops, count_params, measure_latency
from edgeweave.errors import EdgeweaveError


@dataclass
class PruneStep:
    step: int  # 0 = the model as given
    removed_fraction: float  # of each prunable layer's original channels
    params: int
    flops: int
    latency_s: float | None
    val_accuracy: float
    test_accuracy: float | None
    accepted: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneResult:
    model: nn.Module  # the last model whose validation accuracy stayed at or above the floor
    steps: list[PruneStep] = field(default_factory=list)
    stopped_because: str = ""

    @property
    def accepted(self) -> PruneStep:
        return [s for s in self.steps if s.accepted][-1]


def _example(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """A random input on the model's device and dtype, for tracing the dependency graph."""
    p = next(model.parameters())
    return torch.randn(*shape, device=p.device, dtype=p.dtype)


def output_layer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The last Conv / Linear executed in a forward pass: its outputs are the classes, never pruned."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not order:
        raise EdgeweaveError("model has no Conv2d or Linear layer to prune")
    return order[-1]


def make_pruner(model: nn.Module, example: torch.Tensor, total_ratio: float, steps: int,
                ignored: Sequence[nn.Module] = ()):
    """A Torch-Pruning L1 filter pruner that reaches ``total_ratio`` in ``steps`` equal steps."""
    import torch_pruning as tp

    importance = tp.importance.MagnitudeImportance(p=1, target_types=[nn.modules.conv._ConvNd, nn.Linear])
    return tp.pruner.MagnitudePruner(
        model,
        example,
        importance=importance,
        pruning_ratio=total_ratio,
        iterative_steps=steps,
        ignored_layers=[output_layer(model, example), *ignored],
        root_module_types=[nn.modules.conv._ConvNd],
    )


def prune_l1_once(model: nn.Module, input_shape: Sequence[int], ratio: float) -> nn.Module:
    """Remove ``ratio`` of every prunable conv's filters (lowest L1 first), in place; no training."""
    if not 0.0 < ratio < 1.0:
        raise EdgeweaveError(f"pruning ratio must be in (0, 1), got {ratio}")
    example = _example(model, input_shape)
    was_training = model.training
    model.eval()
    make_pruner(model, example, ratio, 1).step()
    model.train(was_training)
    return model


def prune_with_floor(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    evaluate_val: Callable[[nn.Module], float],
    finetune: Callable[[nn.Module], float | None] | None = None,
    step: float = 0.1,
    max_ratio: float = 0.9,
    min_accuracy: float = 0.97,
    latency: bool = True,
    latency_repeats: int = 5,
    on_step: Callable[[PruneStep], None] | None = None,
) -> PruneResult:
    """Prune in steps of ``step`` (fraction of original channels) up to ``max_ratio``.

    ``finetune(model) -> test accuracy or None`` trains the pruned model in place between steps
    (see ``finetune_with_loop``); ``evaluate_val(model)`` is the validation accuracy the floor is
    checked on. The model passed in is modified; the returned ``PruneResult.model`` is a separate
    copy when a step had to be undone.
    """
    if not 0.0 < step < 1.0:
        raise EdgeweaveError(f"--step must be in (0, 1), got {step}")
    n_steps = int(max_ratio / step + 1e-9)
    if n_steps < 1:
        raise EdgeweaveError(f"--step {step} is larger than the maximum pruned fraction {max_ratio}")
    shape = list(input_shape)

    def record(k: int, m: nn.Module, val: float, test: float | None, ok: bool) -> PruneStep:
        s = PruneStep(k, round(k * step, 6), count_params(m), count_flops(m, shape),
                      measure_latency(m, shape, repeats=latency_repeats) if latency else None, val, test, ok)
        result.steps.append(s)
        if on_step is not None:
            on_step(s)
        return s

    result = PruneResult(model)
    base_val = evaluate_val(model)
    record(0, model, base_val, None, base_val >= min_accuracy)
    if base_val < min_accuracy:
        result.stopped_because = f"validation accuracy {base_val:.4f} of the given model is already under the floor {min_accuracy}"
        result.steps[0].accepted = True  # nothing better to return: the model as given
        return result

    example = _example(model, shape)
    model.eval()
    pruner = make_pruner(model, example, n_steps * step, n_steps)
    for k in range(1, n_steps + 1):
        snapshot = copy.deepcopy(model)
        model.eval()
        pruner.step()
        test = finetune(model) if finetune is not None else None
        val = evaluate_val(model)
        ok = val >= min_accuracy
        record(k, model, val, test, ok)
        if not ok:
            result.model = snapshot
            result.stopped_because = f"step {k} fell to validation accuracy {val:.4f} < {min_accuracy}; kept step {k - 1}"
            return result
    result.stopped_because = f"reached the maximum pruned fraction {n_steps * step:.2f} above the floor"
    return result


def finetune_with_loop(bundle, *, epochs: int, lr: float = 0.01, batch_size: int = 64, seed: int = 0,
                       progress: bool = True) -> Callable[[nn.Module], float | None]:
    """A ``finetune`` for ``prune_with_floor`` built on the shared training loop (``fit``)."""
    from edgeweave.training.loop import fit

    def run(model: nn.Module) -> float | None:
        if epochs <= 0:
            return None
        return fit(model, bundle, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress).accuracy

    return run


def val_evaluator(bundle) -> Callable[[nn.Module], float]:
    from edgeweave.training.loop import evaluate, make_loader

    loader = make_loader(bundle.val, 256, False)
    return lambda model: evaluate(model, loader)
