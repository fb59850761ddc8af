"""EdgeDI compact blocks (ALGORITHMS.md section 3) and the registry names of compacted models.

``CompactConv`` replaces one 3x3 convolution (Cin -> Cout) by

    reduce  1x1 conv  Cin      -> Cout/r          (stride 1, no bias)
    conv    3x3 conv  Cout/r   -> Cout/r          (the original stride / padding / dilation)
    attn    ChannelAttention(Cout/r)              (global average pool -> Linear -> sigmoid -> scale)
    expand  1x1 conv  Cout/r   -> Cout            (with bias: a ReLU follows directly)
    relu    ReLU
    bn      BatchNorm2d(Cout)

in this order, as the paper lists it (ReLU *before* BatchNorm; the model's own BN / ReLU that
followed the original conv stay where they were). ``reduce`` and ``conv`` carry no bias: each
feeds straight into another linear map.

``ChannelAttention`` is a plain module with a fixed name so the planner can recognise it: its
squeeze is the only global operation in the block, and it is exactly decomposable into per-strip
partial sums (``partial_sum`` over the rows a device owns, summed over devices, then
``weights_from_sum`` and ``apply``). No module stores a channel count of its own: every shape
lives in a tensor, so pruned models reload from tensor shapes alone.

Registry names: ``compact`` (kwargs ``base``, ``ratio``, ``base_kwargs``) rebuilds any compacted
model; ``compact_<base>`` (``compact_vgg16``, ``compact_resnet18``, ``compact_small_cnn``, ...)
are the same with a fixed base, so ``edgeweave train --model compact_vgg16`` works.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from edgeweave.models.registry import register_model


class ChannelAttention(nn.Module):
    """SE-like feature enhancement without a bottleneck: x * sigmoid(Linear(mean_hw(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    @staticmethod
    def partial_sum(x: torch.Tensor) -> torch.Tensor:
        """Sum over the rows and columns this tensor holds (a strip's share of the squeeze), [N, C]."""
        return x.sum(dim=(2, 3))

    def weights_from_sum(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """Channel weights [N, C, 1, 1] from the summed partial sums and the full map's H*W."""
        return torch.sigmoid(self.fc(total / count))[:, :, None, None]

    @staticmethod
    def apply(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Scale a whole map or any strip of it by the channel weights."""
        return x * weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc(x.mean(dim=(2, 3))))
        return x * w[:, :, None, None]


class CompactConv(nn.Sequential):
    """The EdgeDI replacement for one 3x3 conv; a Sequential so graph capture sees every layer."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ratio: int = 8,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 1,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
    ) -> None:
        if ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio}")
        mid = max(1, out_channels // ratio)
        super().__init__(
            OrderedDict(
                reduce=nn.Conv2d(in_channels, mid, 1, bias=False),
                conv=nn.Conv2d(
                    mid, mid, 3, stride=stride, padding=padding, dilation=dilation,
                    bias=False, padding_mode=padding_mode,
                ),
                attn=ChannelAttention(mid),
                expand=nn.Conv2d(mid, out_channels, 1, bias=True),
                relu=nn.ReLU(inplace=True),
                bn=nn.BatchNorm2d(out_channels),
            )
        )
        for m in (self.reduce, self.conv, self.expand):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.expand.bias)

    # Derived from tensors (not stored) so they stay right after pruning.
    @property
    def in_channels(self) -> int:
        return self.reduce.in_channels

    @property
    def out_channels(self) -> int:
        return self.expand.out_channels


# Bases with a fixed ``compact_<base>`` registry name.
COMPACT_BASES = (
    "vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50",
    "cifar_resnet18", "cifar_resnet34", "small_cnn", "small_resnet8", "small_resnet14",
)


def build_compact(
    num_classes: int = 10,
    in_channels: int = 3,
    base: str = "vgg16",
    ratio: int = 8,
    base_kwargs: dict[str, Any] | None = None,
    skip_costlier: bool = False,
) -> nn.Module:
    """Build ``base`` from the registry and compact it; deterministic, so checkpoints rebuild it."""
    from edgeweave.compress.compact import compact_model
    from edgeweave.models.registry import build_model

    model = build_model(base, num_classes=num_classes, in_channels=in_channels, **(base_kwargs or {}))
    return compact_model(model, ratio=ratio, skip_costlier=skip_costlier, inplace=True).model


register_model("compact")(build_compact)


def _fixed_base(base: str):
    def fn(num_classes: int = 10, in_channels: int = 3, ratio: int = 8, **base_kwargs: Any) -> nn.Module:
        return build_compact(num_classes, in_channels, base=base, ratio=ratio, base_kwargs=base_kwargs)

    fn.__name__ = f"compact_{base}"
    fn.__doc__ = f"{base} in EdgeDI compact form (see edgeweave.models.compact_blocks)."
    return fn


for _base in COMPACT_BASES:
    register_model(f"compact_{_base}")(_fixed_base(_base))
