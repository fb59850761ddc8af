"""Multi-exit torchvision ResNets (``resnet18/34/50/...``, ImageNet-style stem with max-pool).

``multi_exit_tv_resnet(arch="resnet18", exit_after=("layer3", "layer4.0"))``: the same exit
pattern as EdgeKE's CIFAR model on torchvision's architecture (random initialisation; nothing is
downloaded). Blocks are ``stem`` (conv1, bn1, relu, maxpool) then ``layerN.i``.
"""

from __future__ import annotations

from typing import Sequence

from edgeweave.models.multi_exit import ExitHead, MultiExitNet
from edgeweave.models.multi_exit_resnet import final_resnet_head, resnet_blocks
from edgeweave.models.registry import _torchvision_model, register_model
from edgeweave.errors import EdgeweaveError


@register_model("multi_exit_tv_resnet")
def multi_exit_tv_resnet(num_classes: int = 1000, in_channels: int = 3, arch: str = "resnet18",
                         exit_after: Sequence[str] = ("layer3", "layer4.0"), head_pool: int = 1) -> MultiExitNet:
    if not arch.startswith(("resnet", "resnext", "wide_resnet")):
        raise EdgeweaveError(f"multi_exit_tv_resnet needs a torchvision ResNet arch, got {arch!r}")
    net = _torchvision_model(arch, num_classes, in_channels)
    return MultiExitNet(
        resnet_blocks(net, ("conv1", "bn1", "relu", "maxpool")),
        list(exit_after),
        lambda k, c: ExitHead(c, num_classes, hidden=c, pool=head_pool),
        final_resnet_head(net),
    )
