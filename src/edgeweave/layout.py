"""The memory layout every device computes in: channels-last (NHWC) for 4-D maps.

Why: on one CPU thread oneDNN's convolutions are faster on NHWC maps, most of all where NCHW
falls back to slow paths: a 3-channel first layer (VGG16's conv1_1 on a 45-row strip at 224 px:
2.1 ms NCHW, 0.17 ms NHWC, one core of this project's host) and the 1x1 convolutions of compact
models. Measured on the strips of a 5-device plan, each device's strips in turn inside one
0.25-core cgroup, the two layouts interleaved in one process: 4-7 % less compute for VGG16 at
224 px, 7.5 % at 200 px, 10 % for compact VGG16 at 200 px, 22 % for ResNet18 at 224 px (whole
models on one core: 1.2-1.8x). And a row strip of an NHWC map (batch 1) is one contiguous block
of memory, so strips and halos are cut, sent and joined without reordering. Results match NCHW
to float rounding (relative differences ~1e-6), not bit for bit.

Weights are converted once per model and device; every map a stage produces is kept in this
layout, and the wire carries 4-D rows in it (runtime/codec.py). What a user holds never changes
layout: the leader computes with a copy of the model's 4-D weights (``device_copy``), the graph
it runs reshapes where the model's code views (``planning/graph.capture``), and the leader hands
results back in the ordinary layout.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from edgeweave.errors import EdgeweaveError

MAP = torch.channels_last


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous in the devices' layout: NHWC for 4-D maps, row-major otherwise."""
    return t.contiguous(memory_format=MAP) if t.dim() == 4 else t.contiguous()


def is_map_layout(t: torch.Tensor) -> bool:
    """Whether ``t`` is a 4-D map laid out channels-last (and not also plain row-major, as a
    1x1 map or a single channel is)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=MAP) and not t.is_contiguous()


def to_device_layout(module: nn.Module) -> nn.Module:
    """Convert ``module``'s 4-D weights to the devices' layout, in place; returns ``module``.

    For modules nobody else holds (a follower's received model, a profiling layer): a board
    cannot afford a second copy of the weights."""
    return module.to(memory_format=MAP)


def device_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its 4-D weights in the devices' layout; every other tensor (the
    classifier's large matrices, BatchNorm statistics) is shared, and ``module`` is not touched.

    For the leader, whose model is the user's: converting it in place would give the user's own
    ``model(x)`` channels-last outputs, on which a ``view`` fails. Costs one copy of the
    convolution weights (VGG16: 59 MB of its 553 MB)."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers()) if t.dim() != 4}
    try:
        twin = copy.deepcopy(module, memo=shared)
    except Exception as e:  # noqa: BLE001 - deepcopy of user code fails in many ways
        raise EdgeweaveError(f"cannot copy the model to lay out its weights for the devices: "
                             f"{type(e).__name__}: {e}") from None
    return to_device_layout(twin)


def ordinary(value: object) -> object:
    """``value`` (a tensor, or a tuple or list of them) with 4-D maps back in the ordinary
    (NCHW-contiguous) layout, as the user's own model would return them."""
    if isinstance(value, torch.Tensor):
        return value.contiguous() if value.dim() == 4 else value
    if isinstance(value, (tuple, list)):
        items = [ordinary(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value
