"""A request body -> the model's input tensor.

Two kinds of body: an image file (PNG, JPEG, BMP, TIFF: what a camera or a script saves),
converted to the model's channels and input size and normalised as it was in training; or the
input tensor itself, raw little-endian float32 in (C, H, W) order, already preprocessed (exact:
what a client that does its own preprocessing sends, and what the tests compare with one device).
Both are bounded: the body by the server, an image by its pixel count before it is decoded.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from edgeweave.data.cifar100 import CIFAR100_MEAN, CIFAR100_STD
from edgeweave.data.digits import MNIST_MEAN, MNIST_STD
from edgeweave.data.neucls import NEU_MEAN, NEU_STD
from edgeweave.errors import EdgeweaveError
from edgeweave.runtime.demo import IMAGENET_MEAN, IMAGENET_STD

Norm = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel mean, std (one value: every channel)

# the normalisation each dataset's training used (edgeweave.data), by the names users know
NORMALIZATIONS: dict[str, Norm] = {
    "none": ((0.0,), (1.0,)),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "neucls": ((NEU_MEAN,), (NEU_STD,)),
    "mnist5k": ((MNIST_MEAN,), (MNIST_STD,)),
    "digits": ((MNIST_MEAN,), (MNIST_STD,)),
}

MAX_IMAGE_PIXELS = 4096 * 4096  # a larger image is refused before it is decoded

RAW_TYPES = ("application/octet-stream",)


class BadInput(EdgeweaveError):
    """The request's body cannot be the model's input (HTTP 400)."""


def parse_normalize(text: str) -> Norm:
    """A dataset name (``neucls``) or ``MEAN/STD`` with comma-separated channels (``0.5/0.25``)."""
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    try:
        mean_s, std_s = text.split("/")
        mean = tuple(float(v) for v in mean_s.split(","))
        std = tuple(float(v) for v in std_s.split(","))
    except ValueError:
        raise EdgeweaveError(f"--normalize must be one of {', '.join(NORMALIZATIONS)} or MEAN/STD "
                             f"(e.g. 0.5/0.25 or 0.485,0.456,0.406/0.229,0.224,0.225), got {text!r}") from None
    if not all(math.isfinite(v) for v in mean + std) or not all(v > 0 for v in std):
        raise EdgeweaveError(f"--normalize: std must be positive and every value finite, got {text!r}")
    return mean, std


def check_norm(norm: Norm, channels: int) -> None:
    for part in norm:
        if len(part) not in (1, channels):
            raise EdgeweaveError(f"--normalize gives {len(part)} values per channel; the model takes {channels} "
                                 f"channel(s)")


def decode_image(body: bytes, channels: int, size: tuple[int, int], norm: Norm) -> torch.Tensor:
    """An image file -> (1, C, H, W): grey or RGB as the model takes, resized (bilinear) to its size."""
    if not body:
        raise BadInput("the request has no body; send the image's bytes")
    try:
        img = Image.open(io.BytesIO(body))
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise BadInput(f"image is {w}x{h}; at most {MAX_IMAGE_PIXELS} pixels are accepted")
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
    except UnidentifiedImageError:
        raise BadInput(f"not a readable image ({len(body)} bytes; PNG, JPEG, BMP or TIFF expected)") from None
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise BadInput(f"not a readable image: {e}") from None
    if channels not in (1, 3):
        raise BadInput(f"the model takes {channels} channels; send a raw float32 tensor instead of an image")
    a = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(a.reshape(size[0], size[1], channels).copy()).permute(2, 0, 1)
    mean = torch.tensor(norm[0], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(norm[1], dtype=torch.float32).view(-1, 1, 1)
    return ((x - mean) / std).unsqueeze(0).contiguous()


def decode_raw(body: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
    """Raw little-endian float32 in (C, H, W) order -> (1, C, H, W), exactly these values."""
    need = 4 * math.prod(shape)
    if len(body) != need:
        raise BadInput(f"a raw tensor must be {need} bytes (float32, shape {list(shape)}), got {len(body)}")
    a = np.frombuffer(body, dtype="<f4").astype(np.float32)
    if not np.isfinite(a).all():
        raise BadInput("the raw tensor contains NaN or infinity")
    return torch.from_numpy(a.reshape(1, *shape))


def encode_raw(x: torch.Tensor) -> bytes:
    """What a client sends for ``decode_raw`` (one (C, H, W) tensor or a batch of one)."""
    return x.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
