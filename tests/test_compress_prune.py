"""L1 filter pruning with Torch-Pruning: ranking, physical removal, floor logic, reload."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from edgeweave.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from edgeweave.compress.prune import output_layer, prune_l1_once, prune_with_floor
from edgeweave.compress.stats import count_params
from edgeweave.errors import EdgeweaveError
from edgeweave.models import build_model
from edgeweave.models.compact_blocks import ChannelAttention, CompactConv

torch.set_num_threads(1)


def test_lowest_l1_filters_are_removed() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        scale = torch.tensor([5.0, 0.01, 4.0, 0.02, 3.0, 0.03, 2.0, 0.04])  # filters 1,3,5,7 are tiny
        net[0].weight.mul_(scale[:, None, None, None] / net[0].weight.abs().mean())
        net[3].weight.fill_(0.1)  # equal next-layer columns: the ranking comes from the first conv
    kept = net[0].weight[[0, 2, 4, 6]].clone()
    prune_l1_once(net, (1, 1, 8, 8), 0.5)
    assert net[0].out_channels == 4 and net[1].num_features == 4 and net[3].in_channels == 4
    torch.testing.assert_close(net[0].weight, kept)
    assert net[6].out_features == 3  # the output layer is never pruned


def test_output_layer_is_last_executed() -> None:
    m = build_model("compact_small_resnet8", num_classes=3, in_channels=1, width=8, ratio=2)
    assert output_layer(m, torch.randn(1, 1, 16, 16)) is m.fc


@pytest.mark.parametrize("name,kw", [("small_resnet8", {"width": 8}), ("compact_small_resnet8", {"width": 16, "ratio": 4}),
                                     ("compact_small_cnn", {"width": 8, "ratio": 2})])
def test_pruned_model_reloads_exactly(tmp_path, name: str, kw: dict) -> None:
    torch.manual_seed(0)
    m = build_model(name, num_classes=4, in_channels=1, **kw)
    before = count_params(m)
    prune_l1_once(m, (1, 1, 16, 16), 0.5)
    assert count_params(m) < before
    m.eval()
    for blk in m.modules():  # attention Linear follows its block's pruned 3x3 conv, both sides
        if isinstance(blk, CompactConv):
            c = blk.conv.out_channels
            assert blk.attn.fc.in_features == blk.attn.fc.out_features == c == blk.expand.in_channels
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = m(x)
    spec = ModelSpec(name, 4, 1, (16, 16), kw)
    path = save_checkpoint(tmp_path / "p.safetensors", m, spec)
    m2, spec2, _ = load_checkpoint(path)
    assert spec2.name == name and {k: v.shape for k, v in m2.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(m2(x), ref)


def test_generic_compact_spec_reloads_after_pruning(tmp_path) -> None:
    kw = {"base": "cifar_resnet18", "ratio": 8, "base_kwargs": {"width": 16}}
    m = build_model("compact", num_classes=5, in_channels=3, **kw)
    prune_l1_once(m, (1, 3, 16, 16), 0.3)
    m.eval()
    path = save_checkpoint(tmp_path / "c.safetensors", m, ModelSpec("compact", 5, 3, (16, 16), kw))
    m2, _, _ = load_checkpoint(path)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))


def test_floor_stops_and_keeps_last_good_model() -> None:
    m = build_model("small_cnn", num_classes=3, in_channels=1, width=16)
    full = count_params(m)
    tuned: list[int] = []
    # Pretend accuracy holds until the model is under 40% of its parameters.
    val = lambda model: 0.99 if count_params(model) >= 0.4 * full else 0.5
    res = prune_with_floor(m, (1, 1, 12, 12), evaluate_val=val, finetune=lambda mm: tuned.append(1) or 0.9,
                           step=0.1, min_accuracy=0.97, latency=False)
    accepted = [s for s in res.steps if s.accepted]
    rejected = [s for s in res.steps if not s.accepted]
    assert len(rejected) == 1 and rejected[0] is res.steps[-1]
    assert len(accepted) >= 2 and [s.step for s in accepted] == list(range(len(accepted)))
    assert count_params(res.model) == res.accepted.params >= 0.4 * full
    assert res.accepted.params < full  # it did prune something
    assert len(tuned) == len(res.steps) - 1  # fine-tuned after every pruning step
    assert all(a.flops > b.flops for a, b in zip(res.steps, res.steps[1:]))
    assert "kept step" in res.stopped_because


def test_model_under_floor_is_returned_unpruned() -> None:
    m = build_model("small_cnn", num_classes=3, in_channels=1, width=8)
    res = prune_with_floor(m, (1, 1, 12, 12), evaluate_val=lambda mm: 0.2, step=0.25, latency=False)
    assert len(res.steps) == 1 and res.steps[0].accepted and res.model is m
    assert "already under the floor" in res.stopped_because


def test_bad_step_is_a_user_error() -> None:
    with pytest.raises(EdgeweaveError):
        prune_with_floor(nn.Linear(2, 2), (1, 2), evaluate_val=lambda m: 1.0, step=1.5)


def test_checkpoint_hash_handles_zero_dim_tensors() -> None:
    """Every BatchNorm has a 0-dim ``num_batches_tracked``; the checkpoint hash must accept it
    (fails while checkpoint.tensors_hash calls ``t.view(torch.uint8)`` on 0-dim tensors)."""
    from edgeweave.checkpoint import model_hash

    assert len(model_hash(nn.BatchNorm2d(2))) == 64
