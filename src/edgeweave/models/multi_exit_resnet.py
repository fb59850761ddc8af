"""Multi-exit CIFAR-style ResNet18 with EdgeKE's three exits (ALGORITHMS.md section 1).

Trunk blocks: ``stem`` (3x3 conv, BN, ReLU), ``layer1.0`` .. ``layer4.1`` (torchvision
BasicBlocks, as in ``cifar_resnet18``). Default exits: after ``layer3`` (head: avgpool ->
Linear(256,256) -> ReLU -> Linear(256,C)), after ``layer4.0`` (the same, 512 wide), and the
full ResNet18 (avgpool -> Linear(512,C)). ``exit_after`` moves or adds early exits.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from edgeweave.models.cifar_resnet import CifarResNet
from edgeweave.models.multi_exit import ExitHead, MultiExitNet
from edgeweave.models.registry import register_model


def resnet_blocks(net: nn.Module, stem: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """A ResNet (ours or torchvision's) as named trunk blocks: the stem, then every block."""
    blocks: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(*[getattr(net, n) for n in stem]))]
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(net, lname, None)
        if layer is None:
            continue
        for i, blk in enumerate(layer):
            blocks.append((f"{lname}.{i}", blk))
    return blocks


def final_resnet_head(net: nn.Module) -> nn.Module:
    """The backbone's own classifier (avgpool -> flatten -> fc), weights shared with ``net``."""
    return nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1), net.fc)


@register_model("multi_exit_resnet18")
def multi_exit_resnet18(num_classes: int = 100, in_channels: int = 3, width: int = 64,
                        exit_after: Sequence[str] = ("layer3", "layer4.0"), head_pool: int = 1) -> MultiExitNet:
    net = CifarResNet([2, 2, 2, 2], num_classes, in_channels, width)
    return MultiExitNet(
        resnet_blocks(net, ("conv1", "bn1", "relu")),
        list(exit_after),
        lambda k, c: ExitHead(c, num_classes, hidden=c, pool=head_pool),
        final_resnet_head(net),
    )
