import pytest
import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.models import build_model, list_models


@pytest.mark.parametrize(
    "name,channels,size",
    [
        ("cifar_resnet18", 3, 32),
        ("cifar_resnet34", 3, 32),
        ("small_cnn", 1, 28),
        ("small_resnet8", 1, 28),
        ("vgg11", 3, 32),
        ("torchvision:resnet18", 1, 64),
        ("resnet50", 3, 64),
    ],
)
def test_models_build_with_classes_and_channels(name, channels, size):
    model = build_model(name, num_classes=7, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)


def test_cifar_resnet_has_cifar_stem():
    m = build_model("cifar_resnet18", num_classes=100)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]


def test_unknown_model_is_a_user_error():
    with pytest.raises(EdgeweaveError, match="unknown model"):
        build_model("no_such_net")
    with pytest.raises(EdgeweaveError, match="torchvision"):
        build_model("torchvision:no_such_net")


def test_registry_lists_names():
    names = list_models()
    assert "cifar_resnet18" in names and "vgg16" in names
