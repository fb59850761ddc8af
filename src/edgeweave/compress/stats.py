"""How big and how fast a model is: parameters, FLOPs and measured latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (it counts 2 per multiply-add of
convolutions and matrix products; element-wise ops, pooling and BN are not counted), so numbers
compare like with like across original, compact and pruned models. Latency is measured, not
modelled: batch 1, one intra-op thread (what an edge core gets), median of several runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ModelStats:
    params: int
    flops: int
    latency_s: float | None  # median seconds per batch-1 forward, one thread; None = not measured
    input_shape: list[int]
    latency_min_s: float | None = None  # fastest run: the better estimate on a contended machine

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _example(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else "cpu"
    return torch.randn(*input_shape, dtype=dtype, device=device)


class _eval_mode:
    """Run in eval mode without gradients, then restore the model's training flag."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def __exit__(self, *exc: object) -> None:
        torch.set_grad_enabled(self.grad)
        self.model.train(self.was_training)


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on a tensor of ``input_shape`` (batch included)."""
    x = _example(model, input_shape)
    with _eval_mode(model):
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    return int(counter.get_total_flops())


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    repeats: int = 10,
    warmup: int = 2,
    threads: int = 1,
) -> float:
    """Median wall seconds of ``repeats`` forward passes after ``warmup`` ones, on ``threads``."""
    return statistics.median(latency_samples(model, input_shape, repeats=repeats, warmup=warmup, threads=threads))


def latency_samples(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    repeats: int = 10,
    warmup: int = 2,
    threads: int = 1,
) -> list[float]:
    """Wall seconds of each of ``repeats`` forward passes after ``warmup`` ones, on ``threads``."""
    x = _example(model, input_shape)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _eval_mode(model):
            for _ in range(warmup):
                model(x)
            times = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return times


def model_stats(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    latency: bool = True,
    repeats: int = 10,
    warmup: int = 2,
) -> ModelStats:
    """Parameters, FLOPs and (optionally) single-thread batch-1 median latency."""
    shape = list(input_shape)
    times = latency_samples(model, shape, repeats=repeats, warmup=warmup) if latency else None
    return ModelStats(count_params(model), count_flops(model, shape), statistics.median(times) if times else None, shape,
                      min(times) if times else None)


def compare(before: ModelStats, after: ModelStats) -> dict[str, float | None]:
    """Ratios after/before (smaller is better) for reports."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    return {
        "params_ratio": ratio(after.params, before.params),
        "flops_ratio": ratio(after.flops, before.flops),
        "latency_ratio": ratio(after.latency_s, before.latency_s),
    }
