"""Datasets by name: ``load_dataset(name, root=None, seed=0, **options)``.

mnist5k (embedded default), digits, cifar100 (local folder), neucls (local folder), synthetic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeweave.data.bundle import DatasetBundle
from edgeweave.errors import EdgeweaveError

DATASETS = ("mnist5k", "digits", "cifar100", "neucls", "synthetic")


def load_dataset(name: str, root: str | Path | None = None, *, seed: int = 0, **options: Any) -> DatasetBundle:
    """Options: ``input_size`` (mnist5k, neucls, synthetic), ``in_channels``/``num_classes``/``samples`` (synthetic),
    ``augment`` (cifar100)."""
    options = {k: v for k, v in options.items() if v is not None}
    if name == "mnist5k":
        from edgeweave.data.digits import load_mnist5k

        return load_mnist5k(seed, **{k: v for k, v in options.items() if k == "input_size"})
    if name == "digits":
        from edgeweave.data.digits import load_digits

        return load_digits(seed)
    if name == "cifar100":
        from edgeweave.data.cifar100 import load_cifar100

        return load_cifar100(root, seed, **{k: v for k, v in options.items() if k == "augment"})
    if name == "neucls":
        from edgeweave.data.neucls import load_neucls

        return load_neucls(root, seed, **{k: v for k, v in options.items() if k == "input_size"})
    if name == "synthetic":
        from edgeweave.data.synthetic import load_synthetic

        return load_synthetic(seed, **options)
    raise EdgeweaveError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


__all__ = ["DATASETS", "DatasetBundle", "load_dataset"]
