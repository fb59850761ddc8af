"""Randomly initialised models whose outputs prove something.

A check compares a distributed result with the single-device one relative to the size of the
latter. With torchvision's random initialisation many models give outputs that prove nothing:
EfficientNet-B0's logits are ~1e-14 (BatchNorm's initial statistics, mean 0 and variance 1,
shrink every deep map), ViT's are all zero (its head is initialised to zeros), GoogLeNet's and
ShuffleNet's are their classifier's bias whatever the input. An error relative to such an output
is 0 or meaningless.

* ``degenerate_reason(model, x, ref)`` says why a reference output proves nothing (too small,
  constant, the same for another input), or None.
* ``calibrated_copy(model, shape)`` is a copy whose outputs do: weights that are all zeros are
  drawn again (normal, scaled by 1/sqrt(fan-in)) and BatchNorm running statistics are measured
  on random inputs (``calibrate_batchnorm``), as training would set them.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

TOO_SMALL = 1e-6  # largest absolute output value below which nothing is proved (float32 rounding ~1e-7 relative)
INPUT_INDEPENDENT = 1e-4  # outputs for two inputs closer than this, relative to the output: the input does not matter
NUDGE = 1e-7  # relative change of the input the sensitivity test makes: float32 rounding's size (eps 1.2e-7)
TOO_SENSITIVE = 1e-4  # output change for that nudge (relative) above which rounding alone can fail a 1e-4 check


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, shape: tuple[int, ...], batches: int = 2,
                        seed: int | None = None) -> None:
    """Running statistics measured on random inputs (cumulative averages), as training would set
    them: with the initial ones (mean 0, variance 1) deep random networks shrink their maps to
    ~1e-14 (EfficientNet-B0), and an error relative to such an output proves nothing. Leaves
    the model in eval mode. The inputs come from torch's global generator, or from ``seed``."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        model.eval()
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    # only the norms in training mode: the model's own flag would also run what it runs only
    # while training (dropout, Inception's auxiliary classifier, which fails on small inputs)
    model.eval()
    for m in bns:
        m.train()
    try:
        for _ in range(batches):
            model(torch.randn(shape, generator=gen))
    finally:
        model.eval()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _flat(value: Any) -> torch.Tensor:
    parts = [t.detach().float().reshape(-1) for t in _tensors(value)]
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.no_grad()
def degenerate_reason(model: nn.Module, x: torch.Tensor, ref: Any, seed: int = 7919) -> str | None:
    """Why ``ref = model(x)`` proves nothing as a reference, or None when it is a fair one:
    its largest value is below ``TOO_SMALL`` or not finite, all its values are equal, the
    model gives (nearly) the same output for another random input of the same shape (the
    output is a bias: the maps died out before the classifier), or the output moves by more
    than ``TOO_SENSITIVE`` of its size when the input moves by ``NUDGE`` (float32 rounding,
    which any other order of the same sums changes, then moves it by more than a check of
    1e-4 allows: deep random networks with measured BatchNorm statistics, ResNet-152's
    float32 output is 7e-4 away from its float64 one)."""
    r = _flat(ref)
    if r.numel() == 0:
        return "the output holds no values"
    if not bool(torch.isfinite(r).all()):
        return "the output is not finite"
    top = float(r.abs().max())
    if top < TOO_SMALL:
        return f"the output is too small to compare with (largest value {top:.1e})"
    if r.numel() > 1 and float((r - r[0]).abs().max()) <= 1e-6 * top:
        return "the output is constant"
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    if torch.equal(other, x):  # the caller's input came from the same seed
        other = -other
    diff = float((_flat(model(other)) - r).abs().max())
    if diff <= INPUT_INDEPENDENT * top:
        return f"the output does not depend on the input (another input changes it by {diff / top:.1e} of its size)"
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    moved = float((_flat(model(x * (1 + NUDGE * noise))) - r).abs().max()) / top
    if moved > TOO_SENSITIVE:
        return (f"the output is too sensitive to rounding (a change of {NUDGE:.0e} of the input moves it by "
                f"{moved:.1e} of its size)")
    return None


@torch.no_grad()
def calibrated_copy(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` (in eval mode) whose outputs are fit to check against, and what was
    changed: all-zero weight matrices drawn again, BatchNorm statistics calibrated."""
    twin = copy.deepcopy(model)
    done: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    redrawn = 0
    for name, p in twin.named_parameters():
        if p.dim() >= 2 and p.numel() and not bool(p.detach().any()):
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(max(fan_in, 1)))
            redrawn += 1
    if redrawn:
        done.append(f"{redrawn} all-zero weight tensor{'s' if redrawn > 1 else ''} drawn again (normal, 1/sqrt(fan-in))")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in twin.modules()):
        batch = (max(4, int(shape[0])), *[int(v) for v in shape[1:]])
        calibrate_batchnorm(twin, batch, seed=seed)
        done.append("BatchNorm running statistics measured on random inputs")
    twin.eval()
    return twin, done


@torch.no_grad()
def fair_model(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module | None, list[str], str | None]:
    """``model`` itself when its output on ``x`` is a fair reference, else a calibrated copy
    (``calibrated_copy``) when that one's is: ``(model, what was changed, None)``; or ``(None,
    [], why)`` when neither is (deep random networks at the edge of chaos: another input size
    may do)."""
    why = degenerate_reason(model, x, model(x))
    if why is None:
        return model, [], None
    twin, done = calibrated_copy(model, tuple(x.shape))
    still = degenerate_reason(twin, x, twin(x))
    if still is None:
        return twin, done, None
    return None, [], f"{why}; calibrated: {still}"
