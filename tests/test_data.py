import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from edgeweave.data import load_dataset
from edgeweave.data.neucls import NEU_PREFIXES
from edgeweave.errors import EdgeweaveError


def write_cifar100(root, n_train=60, n_test=20, seed=0):
    """Tiny files in torchvision's CIFAR-100 python format (pickled dicts, uint8 rows)."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(rng.integers(0, 100, n)),
                 "coarse_labels": [0] * n, "filenames": [f"img{i}.png" for i in range(n)], "batch_label": name}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}, f)
    return root


def write_neucls(root, per_class=5, size=24, flat=False):
    rng = np.random.default_rng(0)
    for prefix, cls in NEU_PREFIXES.items():
        folder = root if flat else root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(folder / f"{prefix}_{i + 1}.bmp")
    return root


def test_mnist5k_is_real_and_split_deterministically():
    a, b = load_dataset("mnist5k"), load_dataset("mnist5k")
    assert (len(a.train), len(a.val), len(a.test)) == (4000, 500, 500)
    assert a.input_size == (28, 28) and a.in_channels == 1 and a.num_classes == 10
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    # splits are disjoint and stratified
    assert torch.bincount(a.test.tensors[1], minlength=10).tolist() == [50] * 10
    other = load_dataset("mnist5k", seed=1)
    assert not torch.equal(a.test.tensors[0], other.test.tensors[0])


def test_digits_and_synthetic():
    d = load_dataset("digits")
    assert d.input_size == (8, 8) and len(d.train) + len(d.val) + len(d.test) == 1797
    s = load_dataset("synthetic", input_size=20, in_channels=2, num_classes=4, samples=40)
    x, y = s.train[0]
    assert x.shape == (2, 20, 20) and 0 <= int(y) < 4 and len(s.train) == 40


def test_cifar100_reads_torchvision_format(tmp_path):
    root = write_cifar100(tmp_path)
    b = load_dataset("cifar100", root, augment=False)
    assert b.num_classes == 100 and b.input_size == (32, 32)
    assert len(b.train) + len(b.val) == 60 and len(b.test) == 20
    x, y = b.test[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 100
    assert b.classes[:2] == ["c0", "c1"]


def test_cifar100_missing_folder_is_one_line(tmp_path):
    with pytest.raises(EdgeweaveError, match=r"cifar-100-python/\{train,test,meta\}") as e:
        load_dataset("cifar100", tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(EdgeweaveError, match="--root"):
        load_dataset("cifar100")


def test_cifar100_malformed_file(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for f in ("train", "test", "meta"):
        (base / f).write_bytes(b"not a pickle")
    with pytest.raises(EdgeweaveError, match="could not read"):
        load_dataset("cifar100", tmp_path)


@pytest.mark.parametrize("flat", [False, True])
def test_neucls_layouts(tmp_path, flat):
    root = write_neucls(tmp_path, per_class=6, size=24, flat=flat)
    b = load_dataset("neucls", root, input_size=16)
    assert b.num_classes == 6 and b.in_channels == 1 and b.input_size == (16, 16)
    assert len(b.train) + len(b.val) + len(b.test) == 36
    x, y = b.train[0]
    assert x.shape == (1, 16, 16) and 0 <= y < 6
    if flat:
        assert b.classes[0] == "crazing"


def test_neucls_bad_folder(tmp_path):
    with pytest.raises(EdgeweaveError, match="not found"):
        load_dataset("neucls", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeweaveError, match="expected"):
        load_dataset("neucls", tmp_path / "empty")


def test_unknown_dataset():
    with pytest.raises(EdgeweaveError, match="unknown dataset"):
        load_dataset("imagenet")
