import io
import json

import pytest
import torch
import torch.nn as nn

from edgeweave.checkpoint import (
    ModelSpec,
    load_checkpoint,
    load_model,
    model_from_bytes,
    model_hash,
    model_to_bytes,
    read_metadata,
    save_checkpoint,
)
from edgeweave.errors import EdgeweaveError


def _spec():
    return ModelSpec("small_cnn", 10, 1, (28, 28), {"width": 8}, [str(i) for i in range(10)])


def test_roundtrip_is_exact(tmp_path):
    spec = _spec()
    model = spec.build().eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, spec, {"note": "hello", "points": [1, 2]})
    loaded, spec2, extra = load_checkpoint(path)
    assert spec2 == spec
    assert extra == {"note": "hello", "points": [1, 2]}
    assert model_hash(loaded) == model_hash(model)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert read_metadata(path)["spec"]["name"] == "small_cnn"


def test_pruned_shapes_are_rebuilt_from_the_file(tmp_path):
    spec = _spec()
    model = spec.build().eval()
    # shrink the first conv from 8 to 5 filters by hand, and everything that consumes it
    conv, bn, conv2 = model.features[0], model.features[1], model.features[3]
    keep = torch.tensor([0, 2, 3, 5, 7])
    new_conv = nn.Conv2d(1, 5, 3, padding=1, bias=False)
    new_conv.weight.data = conv.weight.data[keep].clone()
    new_bn = nn.BatchNorm2d(5)
    new_bn.weight.data, new_bn.bias.data = bn.weight.data[keep].clone(), bn.bias.data[keep].clone()
    new_bn.running_mean, new_bn.running_var = bn.running_mean[keep].clone(), bn.running_var[keep].clone()
    new_conv2 = nn.Conv2d(5, 8, 3, padding=1, bias=False)
    new_conv2.weight.data = conv2.weight.data[:, keep].clone()
    model.features[0], model.features[1], model.features[3] = new_conv, new_bn, new_conv2
    model.eval()
    path = save_checkpoint(tmp_path / "pruned.safetensors", model, spec)
    loaded, _, _ = load_checkpoint(path)
    assert loaded.features[0].out_channels == 5 and loaded.features[3].in_channels == 5
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_bytes_roundtrip_and_hash_check():
    spec = _spec()
    model = spec.build()
    data = model_to_bytes(model, spec)
    loaded, _, _ = model_from_bytes(data)
    assert model_hash(loaded) == model_hash(model)
    # flip one byte of the tensor payload: the recorded hash no longer matches
    corrupt = bytearray(data)
    corrupt[-5] ^= 0xFF
    with pytest.raises(EdgeweaveError, match="hash"):
        model_from_bytes(bytes(corrupt))


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx"])
def test_corrupt_files_give_clear_errors(tmp_path, content):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(EdgeweaveError):
        load_checkpoint(p)


def test_missing_and_mismatched(tmp_path):
    with pytest.raises(EdgeweaveError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    spec = _spec()
    model = spec.build()
    path = save_checkpoint(tmp_path / "m.safetensors", model, spec)
    # rewrite the header to claim another architecture: weights no longer fit
    from safetensors.torch import load_file, save_file
    import json

    tensors = load_file(path)
    meta = read_metadata(path)
    meta["spec"]["name"] = "small_resnet8"
    save_file(tensors, tmp_path / "other.safetensors", metadata={"edgeweave": json.dumps(meta)})
    with pytest.raises(EdgeweaveError, match="do not fit"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_load_model_by_name_or_path(tmp_path):
    model, spec = load_model("cifar_resnet18", num_classes=5, input_size=32)
    assert spec.num_classes == 5 and spec.input_size == (32, 32)
    path = save_checkpoint(tmp_path / "c.safetensors", model, spec)
    again, spec2 = load_model(str(path))
    assert spec2 == spec and model_hash(again) == model_hash(model)


class _Mixed(nn.Module):
    """Odd-sized tensors of several widths: a mapped load needs each one aligned to its width."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)  # num_batches_tracked: int64
        self.register_buffer("halves", torch.randn(7).half())
        self.register_buffer("flags", torch.tensor([True, False, True]))


def test_a_loaded_checkpoint_maps_the_file_instead_of_copying_it(tmp_path):
    import edgeweave.checkpoint as ck

    model = _Mixed().eval()
    path = tmp_path / "m.safetensors"
    with path.open("wb") as f:
        n = ck.write_checkpoint(f, model, _spec())
    assert n == path.stat().st_size
    from safetensors.torch import load_file

    plain = load_file(path)  # the file is ordinary safetensors
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    meta, tensors = ck._map_tensors(path, str(path))
    assert set(tensors) == set(model.state_dict())  # the gaps between tensors are not the model's
    n = int.from_bytes(path.read_bytes()[:8], "little")
    offsets = {k: 8 + n + v["data_offsets"][0] for k, v in json.loads(path.read_bytes()[8:8 + n]).items()
               if k in tensors}
    first = min(offsets, key=offsets.get)
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype
        # where the file has it, in one mapping (not a copy), and where kernels want it
        assert tensors[k].data_ptr() - tensors[first].data_ptr() == offsets[k] - offsets[first]
        assert tensors[k].data_ptr() % 64 == 0
    assert meta["hash"] == model_hash(model)
    buf = io.BytesIO()
    torch.save(tensors, buf)  # each its own storage: torch.save takes tensors of several dtypes
    assert all(torch.equal(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)[k], v) for k, v in tensors.items())
    tensors["conv.weight"].add_(1.0)  # private: the file does not change
    assert torch.equal(load_file(path)["conv.weight"], model.conv.weight)


def test_a_mapped_checkpoint_with_bad_offsets_is_refused(tmp_path):
    spec = _spec()
    path = save_checkpoint(tmp_path / "m.safetensors", spec.build().eval(), spec)
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    head = data[8:8 + n].decode()
    first = head.index('"data_offsets":[') + len('"data_offsets":[')
    data[8 + first] = ord("4") if data[8 + first] != ord("4") else ord("8")  # the first tensor starts elsewhere
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(EdgeweaveError, match="corrupt checkpoint"):
        load_checkpoint(bad)
    bad.write_bytes(bytes(data[:-4]))  # shorter than its table says
    with pytest.raises(EdgeweaveError, match="corrupt checkpoint|bad header"):
        load_checkpoint(bad)
