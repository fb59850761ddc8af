"""Synthetic images of any shape, for latency work and smoke tests of the training loop.

Labels are not noise: each class has a random prototype and samples are prototype + noise, so a
model can learn them and a training run shows whether the loop works at all.
"""

from __future__ import annotations

import torch

from edgeweave.data.bundle import DatasetBundle
from torch.utils.data import TensorDataset


def load_synthetic(
    seed: int = 0,
    input_size: int | tuple[int, int] = 32,
    in_channels: int = 3,
    num_classes: int = 10,
    samples: int = 512,
    noise: float = 1.0,
) -> DatasetBundle:
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, in_channels, h, w, generator=g)

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = protos[y] + noise * torch.randn(n, in_channels, h, w, generator=g)
        return TensorDataset(x, y)

    n_eval = max(num_classes, samples // 8)
    return DatasetBundle(
        "synthetic", make(samples), make(n_eval), make(n_eval), num_classes, in_channels, (h, w),
        [f"class{i}" for i in range(num_classes)],
    )
