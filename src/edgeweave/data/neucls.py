"""NEU-CLS steel surface defects (6 classes, 300 grayscale 200x200 images each) from a local
folder. Two layouts are accepted:

- ImageFolder: ``ROOT/<class>/*.bmp`` (class folders named crazing, inclusion, patches,
  pitted_surface, rolled-in_scale, scratches, or any six names);
- the original release, flat: ``ROOT/Cr_1.bmp, In_1.bmp, Pa_, PS_, RS_, Sc_ ...``.

Split 70/15/15 per class, fixed by the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from edgeweave.data.bundle import DatasetBundle, stratified_split
from edgeweave.errors import EdgeweaveError

NEU_PREFIXES = {"Cr": "crazing", "In": "inclusion", "Pa": "patches", "PS": "pitted_surface", "RS": "rolled-in_scale", "Sc": "scratches"}
IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
NEU_MEAN, NEU_STD = 0.5, 0.25


class ImageList(Dataset):
    def __init__(self, files: list[Path], labels: list[int], size: tuple[int, int]) -> None:
        self.files, self.labels, self.size = files, labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            img = Image.open(self.files[i]).convert("L")
        except (OSError, UnidentifiedImageError) as e:
            raise EdgeweaveError(f"neucls: cannot read image {self.files[i]}: {e}") from None
        if img.size != (self.size[1], self.size[0]):
            img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
        return (x - NEU_MEAN) / NEU_STD, self.labels[i]


def _scan(root: Path) -> tuple[list[Path], list[int], list[str]]:
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if dirs:
        classes = [d.name for d in dirs]
        files, labels = [], []
        for c, d in enumerate(dirs):
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(c)
        return files, labels, classes
    classes = list(NEU_PREFIXES.values())
    prefixes = list(NEU_PREFIXES)
    files, labels = [], []
    for f in sorted(root.iterdir()):
        pre = f.name.split("_", 1)[0]
        if f.suffix.lower() in IMAGE_SUFFIXES and pre in NEU_PREFIXES:
            files.append(f)
            labels.append(prefixes.index(pre))
    return files, labels, classes


def load_neucls(root: str | Path | None, seed: int = 0, input_size: int | tuple[int, int] = 200) -> DatasetBundle:
    expected = "ROOT/<class>/*.bmp (six class folders) or the flat original ROOT/Cr_1.bmp, In_*, Pa_*, PS_*, RS_*, Sc_*"
    if root is None:
        raise EdgeweaveError(f"neucls needs --root DIR laid out as {expected}")
    root = Path(root)
    if not root.is_dir():
        raise EdgeweaveError(f"neucls: folder not found: {root} (expected {expected})")
    files, labels, classes = _scan(root)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes)) if labels else np.zeros(0)
    if not files or len(classes) < 2 or (counts < 3).any():
        raise EdgeweaveError(f"neucls: {root} holds {len(files)} images in {len(classes)} classes; expected {expected}, at least 3 images per class")
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    y = np.asarray(labels)
    splits = stratified_split(y, (0.7, 0.15, 0.15), seed)
    sets = [ImageList([files[i] for i in s], [labels[i] for i in s], size) for s in splits]  # type: ignore[arg-type]
    return DatasetBundle("neucls", sets[0], sets[1], sets[2], len(classes), 1, size, classes)  # type: ignore[arg-type]
