"""A small multi-exit ResNet for 28x28 one-channel inputs (the embedded mnist5k demo).

Trunk: ``stem`` (3x3 conv, BN, ReLU, 2x2 max-pool: 28 -> 14), then three stages of BasicBlocks
``layer1`` (width, 14x14), ``layer2`` (2*width, 7x7), ``layer3`` (4*width, 4x4). Exits by default
after ``layer1`` and ``layer2`` and at the end. Early-exit heads keep a ``head_pool`` x
``head_pool`` grid (a 1x1 average after one block loses where the strokes are) and a hidden
layer of ``head_hidden`` units; the final head is avgpool -> Linear, as in a plain ResNet.
It is deliberately cheap: the max-pooled stem makes every stage cost about the same, so an early
exit saves most of the trunk.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, conv1x1

from edgeweave.models.multi_exit import ExitHead, MultiExitNet
from edgeweave.models.registry import register_model


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> list[BasicBlock]:
    down = None
    if stride != 1 or inplanes != planes:
        down = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    return [BasicBlock(inplanes, planes, stride, down)] + [BasicBlock(planes, planes) for _ in range(1, blocks)]


@register_model("multi_exit_small")
def multi_exit_small(num_classes: int = 10, in_channels: int = 1, width: int = 16,
                     layers: Sequence[int] = (1, 1, 1), exit_after: Sequence[str] = ("layer1", "layer2"),
                     head_pool: int = 4, head_hidden: int = 64) -> MultiExitNet:
    w = width
    blocks: list[tuple[str, nn.Module]] = [(
        "stem",
        nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                      nn.ReLU(inplace=True), nn.MaxPool2d(2)),
    )]
    inplanes = w
    for s, (planes, stride) in enumerate(((w, 1), (2 * w, 2), (4 * w, 2))):
        for i, blk in enumerate(_stage(inplanes, planes, int(layers[s]), stride)):
            blocks.append((f"layer{s + 1}.{i}", blk))
        inplanes = planes
    final = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1), nn.Linear(inplanes, num_classes))
    for m in (mod for _, b in blocks for mod in b.modules()):
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return MultiExitNet(
        blocks,
        list(exit_after),
        lambda k, c: ExitHead(c, num_classes, hidden=head_hidden, pool=head_pool),
        final,
    )
