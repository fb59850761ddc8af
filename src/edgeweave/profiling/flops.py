"""FLOP counts the compute model is fitted on (and the planner predicts with).

Convention (EdgeLD's, so that published coefficients compare): a convolution producing an
H x W x Cout output costs

    F = 2 * H * W * (Cin * K^2 / groups + 1) * Cout

(one multiply and one add per weight, plus the bias), with H, W the *output* size, which is the
size of a strip when the map is cut. torch.utils.flop_counter counts the same without the
``+ 1`` bias term; the difference is under 1% for Cin*K^2 >= 100 and a test checks both agree.
A linear layer is the 1x1 case, 2 * (in + 1) * out. Pooling counts one operation per window
element per output, elementwise ops (ReLU, batch norm, residual add) one per output element:
they are memory-bound and get their own fitted line ("pool", "other").

The planner counts every other node with ``torch.utils.flop_counter`` (planning/cost.py): a
matrix product over many rows (a Linear layer on tokens or on every pixel) costs
``2 * rows * in * out`` (``matmul_flops``), a norm 5 operations per element. What the counter
does not count, elementwise activations, costs its elements times ``ELEMENTWISE_OPS``: how
many ReLU-equivalents one element takes, measured as CPU time on one thread on channels-last
maps of 96x112x112 and 256x28x28 (ReLU 0.14-0.23 ns per element): a transcendental activation
costs 5-45 times a ReLU, so counting one operation per element would price an EfficientNet's
or a ConvNeXt's activations as nearly free.
"""

from __future__ import annotations

ELEMENTWISE_OPS: dict[str, float] = {
    "hardswish": 1.5, "hardsigmoid": 1.2, "relu6": 1.1, "hardtanh": 1.1,
    "sigmoid": 6, "silu": 6, "gelu": 10, "elu": 15, "celu": 15, "selu": 15,
    "tanh": 20, "softplus": 20, "softmax": 20, "log_softmax": 20, "mish": 45,
}
"""ReLU-equivalent operations per element of an activation (module docstring); 1 for the rest
(ReLU, adds, copies). Keys: the function or method name, or the module class name, lower case."""


def conv_out(size: int, k: int, stride: int = 1, padding: int | None = None, dilation: int = 1) -> int:
    """Output length of a convolution/pooling along one axis (padding defaults to 'same'-ish k//2)."""
    p = k // 2 if padding is None else padding
    return (size + 2 * p - dilation * (k - 1) - 1) // stride + 1


def conv_flops(h_out: int, w_out: int, cin: int, cout: int, k: int, groups: int = 1) -> float:
    """2*H*W*(Cin*K^2/groups + 1)*Cout for an H x W output (see the module docstring)."""
    return 2.0 * h_out * w_out * (cin * k * k / groups + 1) * cout


def linear_flops(fin: int, fout: int) -> float:
    return 2.0 * (fin + 1) * fout


def pool_flops(h_out: int, w_out: int, c: int, k: int) -> float:
    return float(h_out * w_out * c * k * k)


def eltwise_flops(numel: int, ops_per_element: int = 1) -> float:
    return float(numel * ops_per_element)


def matmul_flops(rows: int, fin: int, fout: int) -> float:
    """A Linear layer applied to ``rows`` rows (tokens, pixels): what flop_counter counts."""
    return 2.0 * rows * fin * fout


def norm_flops(numel: int) -> float:
    """A layer or group norm: 5 operations per element (planning/graph.py's flop mapping)."""
    return 5.0 * numel
