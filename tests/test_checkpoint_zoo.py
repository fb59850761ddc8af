"""Checkpoints of the torchvision models whose reload used to fail: RegNet (its constructor
computes widths with ``.tolist()``, which the meta device cannot) and MNASNet (its loader reads
the state-dict version, which tensors alone do not carry)."""

from __future__ import annotations

import pytest
import torch

from edgeweave.checkpoint import ModelSpec, load_checkpoint, model_from_bytes, model_hash, model_to_bytes, save_checkpoint


@pytest.mark.parametrize("name", ["regnet_x_400mf", "mnasnet0_5"])
def test_reloads_bit_for_bit(tmp_path, name):
    torch.manual_seed(0)
    spec = ModelSpec(f"torchvision:{name}", num_classes=10, input_size=(64, 64))
    model = spec.build().eval()
    x = torch.randn(1, 3, 64, 64)
    back, spec2, _ = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model, spec))
    assert spec2 == spec and model_hash(back) == model_hash(model) and not back.training
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_state_dict_versions_travel_in_the_header():
    spec = ModelSpec("torchvision:mnasnet0_5", num_classes=10)
    model = spec.build().eval()
    data = model_to_bytes(model, spec)
    # MNASNet registers version 2 for the model itself; without it its loader refuses
    assert b'\\"versions\\": {' in data[:200000] and b'\\"\\": 2' in data[:200000]
    back, _, _ = model_from_bytes(data)
    assert model_hash(back) == model_hash(model)
