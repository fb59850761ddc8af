"""runtime/codec.py: activation rows cross the network bit for bit, smaller when sparse."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.errors import EdgeweaveError
from edgeweave.runtime import codec


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _received(msg: torch.Tensor, n: int) -> torch.Tensor:
    """``msg`` as a receiver holds it: at the start of a buffer of ``max_bytes(n)``, the rest junk."""
    buf = torch.full((codec.max_bytes(n),), 0xA5, dtype=torch.uint8)
    assert msg.numel() <= buf.numel()
    buf[:msg.numel()] = msg
    return buf


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), zeros=st.floats(0.0, 1.0),
       specials=st.booleans(), seed=st.integers(0, 2**16))
def test_roundtrip_is_bit_exact(shape, zeros, specials, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[torch.rand(*shape, generator=g) < zeros] = 0.0
    if specials:
        flat = x.view(-1)
        for v in (-0.0, float("nan"), float("inf"), -float("inf")):
            flat[int(torch.randint(flat.numel(), (1,), generator=g))] = v
    msg = codec.encode(x)
    assert msg.dtype == torch.uint8 and msg.numel() <= codec.max_bytes(x.numel())
    y = codec.decode(_received(msg, x.numel()), list(shape))
    assert y.shape == x.shape and torch.equal(_bits(y), _bits(x))


@settings(max_examples=100, deadline=None)
@given(c=st.integers(2, 6), h=st.integers(2, 9), w=st.integers(2, 9), zeros=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_maps_travel_channels_last_whatever_their_layout(c, h, w, zeros, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, h, w, generator=g)
    x[torch.rand(1, c, h, w, generator=g) < zeros] = 0.0
    nhwc = x.contiguous(memory_format=torch.channels_last)
    msg = codec.encode(nhwc)
    # the bytes depend on the values only, and carry them in NHWC order (layout.py)
    assert torch.equal(msg, codec.encode(x))
    assert torch.equal(codec.decode(_received(codec.encode(x.permute(0, 2, 3, 1).reshape(1, 1, 1, -1)), x.numel()),
                                    [1, 1, 1, x.numel()]).reshape(-1), x.permute(0, 2, 3, 1).reshape(-1))
    y = codec.decode(_received(msg, x.numel()), [1, c, h, w])
    assert torch.equal(_bits(y), _bits(x)) and y.is_contiguous(memory_format=torch.channels_last)
    strip = nhwc.narrow(2, 1, h - 1)  # a row strip of a channels-last map: contiguous, coded as it is
    assert torch.equal(codec.decode(_received(codec.encode(strip), strip.numel()), list(strip.shape)), strip)


def test_sparse_rows_travel_smaller_and_dense_rows_raw():
    g = torch.Generator().manual_seed(0)
    relu = torch.relu(torch.randn(1, 64, 2, 224, generator=g))  # about half zeros
    dense = torch.randn(1, 64, 2, 224, generator=g)
    raw = 4 * relu.numel()
    assert codec.encode(relu).numel() < 0.6 * raw
    assert codec.encode(dense).numel() == codec.HEADER + raw
    assert codec.encode(torch.zeros(1, 8, 3, 5)).numel() < raw / 16
    for t in (relu, dense):  # a rows view (not contiguous) is coded as the rows it shows
        view = t.narrow(2, 1, 1)
        assert torch.equal(codec.decode(_received(codec.encode(view), view.numel()), list(view.shape)), view)


@pytest.mark.parametrize("header, why", [
    ((codec.SPARSE, 100), "does not fit"),    # more values than the shape holds
    ((codec.SPARSE, -1), "does not fit"),
    ((7, 4), "does not fit"),                 # unknown kind
    ((codec.RAW, 5), "does not fit"),         # raw of another size
    ((codec.SPARSE, 3), "does not match"),    # the mask says 4 values, the count 3
])
def test_a_header_that_does_not_fit_the_shape_is_refused(header, why):
    x = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    buf = _received(codec.encode(x), x.numel())
    assert int(buf[:8].view(torch.int64)) == codec.SPARSE
    buf[:16].view(torch.int64)[:] = torch.tensor(header)
    with pytest.raises(EdgeweaveError, match=why):
        codec.decode(buf, [1, 12], "device 'w1'")
    with pytest.raises(EdgeweaveError, match="shorter than its header"):
        codec.decode(torch.zeros(3, dtype=torch.uint8), [1, 12])


def test_over_gloo_a_short_message_fills_the_bounded_buffer(pair):
    a, b = pair
    x = torch.relu(torch.randn(1, 32, 3, 40))
    b.isend(codec.encode(x), 0, 11)
    buf = torch.empty(codec.max_bytes(x.numel()), dtype=torch.uint8)
    a.recv(buf, 1, 11, "coded rows")
    b.flush_sends()
    assert torch.equal(_bits(codec.decode(buf, list(x.shape))), _bits(x))
