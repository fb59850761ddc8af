"""Compact (EdgeDI) architecture transform: structure, exactness of the attention split, registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from edgeweave.compress.compact import compact_cost_per_pixel, compact_model
from edgeweave.compress.stats import count_flops
from edgeweave.models import build_model
from edgeweave.models.compact_blocks import ChannelAttention, CompactConv

torch.set_num_threads(1)


def _convs_3x3(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1
            and not n.endswith(".conv")]


def test_block_order_and_shapes() -> None:
    block = CompactConv(16, 32, ratio=8, stride=2, padding=2, dilation=2)
    assert list(dict(block.named_children())) == ["reduce", "conv", "attn", "expand", "relu", "bn"]
    assert block.reduce.out_channels == 4 and block.conv.in_channels == 4
    assert block.conv.stride == (2, 2) and block.conv.dilation == (2, 2) and block.conv.padding == (2, 2)
    assert isinstance(block.attn, ChannelAttention) and block.attn.fc.in_features == 4
    assert block.in_channels == 16 and block.out_channels == 32
    ref = nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2)
    x = torch.randn(2, 16, 13, 11)
    assert block(x).shape == ref(x).shape


def test_small_cnn_every_3x3_replaced_and_forward_matches_shape() -> None:
    base = build_model("small_cnn", num_classes=5, in_channels=1, width=16)
    n3 = len(_convs_3x3(base))
    res = compact_model(base, ratio=4)
    assert len(res.replaced) == n3 == 4
    assert _convs_3x3(res.model) == []  # only the inner 3x3s of CompactConv blocks remain
    assert sum(isinstance(m, CompactConv) for m in res.model.modules()) == 4
    assert len(_convs_3x3(base)) == n3  # not in place: the original is untouched
    assert compact_model(res.model).replaced == []  # already compact: nothing left to replace
    x = torch.randn(2, 1, 28, 28)
    assert res.model(x).shape == (2, 5)


def test_kept_layers_keep_weights() -> None:
    base = build_model("small_resnet8", num_classes=3, in_channels=1, width=8)
    res = compact_model(base, ratio=4)
    assert torch.equal(res.model.fc.weight, base.fc.weight)
    # 1x1 downsample projections are not 3x3: kept, with their weights
    assert torch.equal(res.model.layer2[0].downsample[0].weight, base.layer2[0].downsample[0].weight)


def test_resnet_residuals_still_fit() -> None:
    for name, kw, size in [("small_resnet8", {"width": 8}, 28), ("resnet18", {}, 32), ("cifar_resnet18", {"width": 8}, 16)]:
        m = compact_model(build_model(name, num_classes=4, in_channels=1, **kw), ratio=8).model
        m.eval()
        with torch.no_grad():
            assert m(torch.randn(1, 1, size, size)).shape == (1, 4)


def test_skip_costlier_keeps_one_channel_stem() -> None:
    # 1 -> 64: 9*64 = 576 MACs/px; compact 1*8 + 9*8*8 + 8*64 = 1096: kept. 64 -> 64: replaced.
    assert compact_cost_per_pixel(1, 64, 8) == (576, 1096)
    net = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    res = compact_model(net, ratio=8, skip_costlier=True)
    assert res.kept == ["0"] and res.replaced == ["2"]
    assert compact_model(net, ratio=8).replaced == ["0", "2"]  # the paper's rule: every 3x3


def test_attention_exact_by_strip_partial_sums() -> None:
    torch.manual_seed(0)
    att = ChannelAttention(6)
    x = torch.randn(2, 6, 11, 7)
    full = att(x)
    cuts = [0, 3, 4, 11]  # uneven strips, one of a single row
    total = sum(att.partial_sum(x[:, :, a:b]) for a, b in zip(cuts, cuts[1:]))
    w = att.weights_from_sum(total, 11 * 7)
    strips = [att.apply(x[:, :, a:b], w) for a, b in zip(cuts, cuts[1:])]
    torch.testing.assert_close(torch.cat(strips, dim=2), full)


def test_vgg16_200_compact_flops_at_most_one_fifth() -> None:
    with torch.device("meta"):  # shapes only: FLOPs need no real weights
        base = build_model("vgg16", num_classes=6, in_channels=1)
        compact = compact_model(base, inplace=False).model
    f0 = count_flops(base, (1, 1, 200, 200))
    f1 = count_flops(compact, (1, 1, 200, 200))
    assert f1 <= f0 / 5, (f0, f1)


def test_registry_rebuilds_compact_models() -> None:
    direct = compact_model(build_model("small_cnn", num_classes=4, in_channels=1, width=8), ratio=4).model
    via_generic = build_model("compact", num_classes=4, in_channels=1, base="small_cnn", ratio=4,
                              base_kwargs={"width": 8})
    via_fixed = build_model("compact_small_cnn", num_classes=4, in_channels=1, ratio=4, width=8)
    shapes = {k: v.shape for k, v in direct.state_dict().items()}
    assert {k: v.shape for k, v in via_generic.state_dict().items()} == shapes
    assert {k: v.shape for k, v in via_fixed.state_dict().items()} == shapes
    assert any(k.endswith("attn.fc.weight") for k in shapes)


def test_bad_ratio_rejected() -> None:
    with pytest.raises(ValueError):
        compact_model(nn.Conv2d(1, 1, 3), ratio=0)
