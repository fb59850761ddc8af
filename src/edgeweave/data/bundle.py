"""What every dataset loader returns: three splits plus the facts a model needs to be built."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset


@dataclass
class DatasetBundle:
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    classes: list[str]


def stratified_split(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Deterministic per-class split into index arrays (train, val, test): same seed, same split."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fractions[1]))
        n_test = int(round(len(idx) * fractions[2]))
        parts[1].extend(idx[:n_val])
        parts[2].extend(idx[n_val : n_val + n_test])
        parts[0].extend(idx[n_val + n_test :])
    return tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)


def tensor_splits(x: torch.Tensor, y: torch.Tensor, splits: tuple[np.ndarray, ...]) -> list[TensorDataset]:
    return [TensorDataset(x[torch.from_numpy(s)], y[torch.from_numpy(s)]) for s in splits]
