"""Torchvision ResNet18/50 and VGG13/16 on real processes, checked against one device.

Marked slow: shipping a VGG's 550 MB of weights to every follower and rebuilding it there takes
tens of seconds on a shared 2-core machine. The 224x224 VGG16 case goes through the CLI, as a
user would run it, in its own module (test_runtime_models_cli.py).
"""

from __future__ import annotations

import pytest
from _runtime_helpers import check

from edgeweave.runtime.leader import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cl():
    with LocalCluster(4, timeout_s=120) as session:
        yield session


@pytest.mark.parametrize("workers,fusion,mode", [(2, "pools", "exchange"), (4, "none", "gather"),
                                                 (3, "auto", "exchange"), (1, "auto", "gather")])
def test_torchvision_resnet18(cl, workers, fusion, mode):
    check(cl, "torchvision:resnet18", 64, workers, "optimal", fusion, mode)


def test_torchvision_resnet18_at_224(cl):
    check(cl, "torchvision:resnet18", 224, 3, "optimal", "auto", "exchange")
    check(cl, "torchvision:resnet18", 224, 2, "ocbp", "pools", "gather")


@pytest.mark.parametrize("workers,fusion,mode,part", [(3, "auto", "exchange", "bodp"), (2, "pools", "gather", "ocbp"),
                                                      (4, "none", "exchange", "equal")])
def test_torchvision_resnet50(cl, workers, fusion, mode, part):
    check(cl, "torchvision:resnet50", 64, workers, part, fusion, mode)


def test_torchvision_resnet50_at_224(cl):
    check(cl, "torchvision:resnet50", 224, 3, "optimal", "auto", "exchange")
    check(cl, "torchvision:resnet50", 224, 4, "bodp", "none", "gather")


@pytest.mark.parametrize("name", ["vgg13", "vgg16"])
def test_vgg_at_64(cl, name):
    for workers, fusion, mode, part in [(1, "pools", "gather", "ocbp"), (3, "none", "exchange", "equal"),
                                        (4, "auto", "exchange", "optimal"), (2, "pools", "gather", "bodp"),
                                        (2, "none", "exchange", "ocbp")]:
        check(cl, name, 64, workers, part, fusion, mode)
    check(cl, name, 64, 3, "optimal", "pools", "exchange", batch=2)
    if name == "vgg13":  # VGG16 at 224 runs through the CLI below
        check(cl, name, 224, 3, "ocbp", "pools", "gather")
        check(cl, name, 224, 4, "optimal", "auto", "exchange")
