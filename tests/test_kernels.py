"""edgeweave.kernels: the faster max pooling is torch's, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.kernels import MaxPool2d, max_pool2d


@settings(max_examples=300, deadline=None)
@given(k=st.tuples(st.integers(1, 4), st.integers(1, 4)), s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       p=st.tuples(st.integers(0, 2), st.integers(0, 2)), d=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       h=st.integers(1, 12), w=st.integers(1, 12), batch=st.sampled_from([(), (1,), (2,)]),
       nan=st.booleans(), ceil=st.booleans(), seed=st.integers(0, 2**16))
def test_max_pool2d_equals_torch(k, s, p, d, h, w, batch, nan, ceil, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, 3, h, w, generator=g)
    if nan:
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = float("nan")
    try:
        ref = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil)
    except RuntimeError:
        with pytest.raises(RuntimeError):  # what torch rejects stays rejected
            max_pool2d(x, k, s, p, d, ceil_mode=ceil)
        return
    y = max_pool2d(x, k, s, p, d, ceil_mode=ceil)
    assert y.shape == ref.shape and y.is_contiguous()
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(0.0), ref.nan_to_num(0.0))


@settings(max_examples=100, deadline=None)
@given(k=st.integers(1, 3), s=st.integers(1, 3), h=st.integers(3, 12), w=st.integers(3, 12), c=st.integers(2, 6),
       seed=st.integers(0, 2**16))
def test_channels_last_maps_pool_exactly_and_keep_their_layout(k, s, h, w, c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, h, w, generator=g)
    y = max_pool2d(x.contiguous(memory_format=torch.channels_last), k, s)
    assert torch.equal(y, F.max_pool2d(x, k, s))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_the_module_matches_nn_maxpool2d_and_keeps_indices_to_torch():
    x = torch.randn(2, 8, 15, 17)
    for args in [(2,), (3, 2, 1), ((2, 3), (1, 2), (1, 0), (2, 1))]:
        assert torch.equal(MaxPool2d(*args)(x), torch.nn.MaxPool2d(*args)(x))
    y, idx = MaxPool2d(2, return_indices=True)(x)
    ref, ref_idx = torch.nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(y, ref) and torch.equal(idx, ref_idx)
