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
"""

from __future__ import annotations


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
