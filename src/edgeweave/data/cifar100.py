"""CIFAR-100 from a local folder in torchvision's on-disk format (``cifar-100-python/`` with
``train``, ``test`` and ``meta``); nothing is downloaded.

torchvision checks each file's md5 against the official release; we check only that the files
exist, so re-packed or subset copies (and the small files the tests write) load too. The
validation split is the last 5,000 training images in a fixed shuffled order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision import transforms
from torchvision.datasets import CIFAR100

from edgeweave.data.bundle import DatasetBundle
from edgeweave.errors import EdgeweaveError

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_FILES = ("train", "test", "meta")


class _LocalCIFAR100(CIFAR100):
    # md5 None: torchvision then checks only that each file exists
    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


def load_cifar100(root: str | Path | None, seed: int = 0, augment: bool = True, val_size: int = 5000) -> DatasetBundle:
    if root is None:
        raise EdgeweaveError("cifar100 needs --root DIR: a folder containing cifar-100-python/{train,test,meta}")
    root = Path(root)
    base = root / "cifar-100-python"
    missing = [f for f in _FILES if not (base / f).is_file()]
    if missing:
        raise EdgeweaveError(f"cifar100: expected {base}/{{train,test,meta}} (torchvision format); missing: {', '.join(missing)}")
    norm = [transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    try:
        train_full = _LocalCIFAR100(str(root), train=True, download=False, transform=transforms.Compose(aug + norm))
        train_eval = _LocalCIFAR100(str(root), train=True, download=False, transform=transforms.Compose(norm))
        test = _LocalCIFAR100(str(root), train=False, download=False, transform=transforms.Compose(norm))
    except Exception as e:  # malformed pickles raise many kinds of errors
        raise EdgeweaveError(f"cifar100: could not read {base} as torchvision CIFAR-100 files: {e}") from None
    n = len(train_full)
    val_size = min(val_size, n // 10) if n < 10 * val_size else val_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    train = Subset(train_full, order[val_size:])
    val = Subset(train_eval, order[:val_size])
    return DatasetBundle("cifar100", train, val, test, 100, 3, (32, 32), list(train_full.classes))
