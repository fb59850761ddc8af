"""Measure this device's compute model: seconds = a * FLOPs + b, per operator kind.

What is timed: single layers (Conv2d, depthwise Conv2d, Linear on one row and on many rows,
LayerNorm, MaxPool2d, and elementwise ops: BatchNorm+ReLU, SiLU, GELU, adds) over a grid of
settings (H, W, Cin, Cout, kernel, stride), batch 1,
one thread (the runtime runs one thread per process, see ENVIRONMENT.md), median over blocks
of back-to-back calls after a warm-up (see :func:`time_setting` for why blocks: CPU caps;
linear layers read their weights from memory as in a model, see :func:`cold_copies`).
Profile a device where it runs, inside its caps (on the testbed:
``testbed.exec(device, ["edgeweave", "profile", ...])``). The run time is set by the block
length, not the device speed: about 20 s quick, 2-3 min full, capped or not. Settings are drawn from the full factorial grid with a fixed seed so that
quick and full runs cover the same ranges with fewer points.

How it is fitted: least squares (numpy) on *relative* residuals, i.e. each equation
a*F + b = t is divided by t. The planner compares strips of very different sizes, so a 2 ms
strip mispredicted by 1 ms matters as much as a 200 ms one mispredicted by 100 ms; plain least
squares would fit only the largest layers. A negative intercept is not physical (it would
predict negative time for tiny strips), so then b is fixed at 0 and a refitted.

How it is checked: the settings are split (a seeded quarter is held out), the line is fitted on
the rest, and the relative error |pred - t| / t on the held-out settings is reported per kind.
The coefficients written to the profile are then refitted on all settings.
"""

from __future__ import annotations

import itertools
import math
import platform
import random
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from edgeweave.kernels import MaxPool2d
from edgeweave.layout import dense, to_device_layout
from edgeweave.profiling.flops import (
    ELEMENTWISE_OPS,
    conv_flops,
    conv_out,
    eltwise_flops,
    linear_flops,
    matmul_flops,
    norm_flops,
    pool_flops,
)
from edgeweave.profiling.profile import DeviceProfile

KINDS = ("conv", "conv_strided", "conv1x1", "conv_dw", "conv_grouped", "linear", "matmul", "pool", "norm", "other")
"""Fitted kinds: spatial convolutions (K > 1) with stride 1 and with a larger stride (strided
ones reuse less of each input row: measured ~25 % more seconds per FLOP, and one line over
both over-predicted VGG's stride-1 layers by ~10 %), pointwise convolutions (no im2col reuse,
memory-bound at small channel counts), depthwise convolutions (one input channel per group:
3-13 GFLOP/s where a dense convolution runs 35-65 on one core of this project's host), grouped
convolutions (ResNeXt's and RegNet's 4 to 100+ channels per group: 25-60 GFLOP/s, another line
again), linear layers on one row (batch 1: a matrix-vector product that reads every weight),
matrix products over many rows (``matmul``: a Linear layer on tokens or on every pixel,
attention; ~40 GFLOP/s, against ~4 for a batch-1 layer of the same weights), pooling
(``kernels.MaxPool2d``, the pool the devices run, which costs more per element than an
activation), norms (LayerNorm over channels), and elementwise ops (batch norm, activations,
residual adds, counted in ReLU-equivalents: ``flops.ELEMENTWISE_OPS``). The profile's top-level
``a, b`` is one line over all convolutions, the fallback for a kind the profile does not list
(after ``KIND_FALLBACK``)."""

WEIGHTS_KIND = "weights"
"""The profile line (``per_kind["weights"] = [seconds per weight element, 0]``) the planner
prices a convolution call's weight reads with (planning/cost.py ``WEIGHTS``)."""

KIND_FALLBACK = {"conv_strided": "conv", "conv1x1": "conv", "conv_dw": "conv", "conv_grouped": "conv",
                 "matmul": "conv1x1", "norm": "other"}
"""The kind whose line prices a kind a profile does not have (profiles measured before it)."""

def conv_kind(kernel: tuple[int, ...], stride: tuple[int, ...], groups: int = 1, in_channels: int | None = None) -> str:
    if groups > 1:
        return "conv_dw" if in_channels is None or in_channels // groups == 1 else "conv_grouped"
    if tuple(kernel) == (1, 1) and groups == 1:
        return "conv1x1"
    return "conv_strided" if max(stride) > 1 else "conv"


def op_kind(module: nn.Module) -> str:
    """The fitted kind whose line predicts ``module``'s time (planner and profiler agree here)."""
    if isinstance(module, nn.Conv2d):
        return conv_kind(tuple(module.kernel_size), tuple(module.stride), module.groups, module.in_channels)
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return "pool"
    return "other"


OTHER_OPS = ("bnrelu", "silu", "gelu", "add")
"""The elementwise ops the ``other`` line is fitted on: batch norm + ReLU (what follows most
convolutions), the transcendental activations of mobile nets and ConvNeXt, a residual add."""


class _Add(nn.Module):
    """A residual add of the map to a second map of the same shape (as a ResNet block ends)."""

    def __init__(self, other: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("other", other)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.other


@dataclass(frozen=True)
class Setting:
    """One timed layer. For linear layers h=w=k=stride=1 and cin/cout are in/out features; for
    ``matmul`` and ``norm`` layers h is the number of rows (tokens) and w is 1."""

    kind: str  # conv | strip | dwconv | gconv | linear | matmul | pool | norm | other
    h: int  # input height
    w: int  # input width
    cin: int
    cout: int
    k: int = 1
    stride: int = 1
    op: str = ""  # for ``other``: one of OTHER_OPS
    groups: int = 1  # for ``gconv``

    @property
    def fit_kind(self) -> str:
        if self.kind == "conv":
            return conv_kind((self.k, self.k), (self.stride, self.stride))
        return {"dwconv": "conv_dw", "gconv": "conv_grouped", "strip": WEIGHTS_KIND}.get(self.kind, self.kind)

    def weights(self) -> int:
        """Weight elements the layer reads per call (a convolution's filters)."""
        return self.cin * self.cout * self.k * self.k // max(1, self.groups)

    def out_hw(self) -> tuple[int, int]:
        if self.kind == "linear":
            return 1, 1
        if self.kind in ("matmul", "norm", "other"):
            return self.h, self.w
        if self.kind == "pool":
            return conv_out(self.h, self.k, self.stride, padding=0), conv_out(self.w, self.k, self.stride, padding=0)
        return conv_out(self.h, self.k, self.stride), conv_out(self.w, self.k, self.stride)

    def flops(self) -> float:
        """The FLOPs the planner counts for this layer (planning/cost.py, profiling/flops.py)."""
        ho, wo = self.out_hw()
        if self.kind in ("conv", "strip"):
            return conv_flops(ho, wo, self.cin, self.cout, self.k)
        if self.kind == "dwconv":
            return conv_flops(ho, wo, self.cin, self.cin, self.k, groups=self.cin)
        if self.kind == "gconv":
            return conv_flops(ho, wo, self.cin, self.cout, self.k, groups=self.groups)
        if self.kind == "linear":
            return linear_flops(self.cin, self.cout)
        if self.kind == "matmul":
            return matmul_flops(self.h, self.cin, self.cout)
        if self.kind == "norm":
            return norm_flops(self.h * self.cin)
        if self.kind == "pool":
            return pool_flops(ho, wo, self.cin, self.k)
        numel = self.h * self.w * self.cin
        if self.op == "add":
            return eltwise_flops(2 * numel)  # two inputs read (planning.cost counts the inputs)
        if self.op in ("silu", "gelu"):
            return eltwise_flops(numel) * ELEMENTWISE_OPS[self.op]
        return eltwise_flops(numel, 3)  # batch norm (2) + ReLU (1)

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        """The layer and its input, 4-D ones in the layout the devices compute in (layout.py)."""
        mod, x = self._build()
        return to_device_layout(mod), dense(x)

    def _build(self) -> tuple[nn.Module, torch.Tensor]:
        x4 = torch.randn(1, self.cin, self.h, self.w)
        if self.kind in ("conv", "strip"):
            return nn.Conv2d(self.cin, self.cout, self.k, self.stride, padding=self.k // 2), x4
        if self.kind == "dwconv":
            return nn.Conv2d(self.cin, self.cin, self.k, self.stride, padding=self.k // 2, groups=self.cin), x4
        if self.kind == "gconv":
            return nn.Conv2d(self.cin, self.cout, self.k, self.stride, padding=self.k // 2, groups=self.groups), x4
        if self.kind == "linear":
            return nn.Linear(self.cin, self.cout), torch.randn(1, self.cin)
        if self.kind == "matmul":
            return nn.Linear(self.cin, self.cout), torch.randn(1, self.h, self.cin)
        if self.kind == "norm":
            return nn.LayerNorm(self.cin), torch.randn(1, self.h, self.cin)
        if self.kind == "pool":
            return MaxPool2d(self.k, self.stride), x4  # the devices' pool
        if self.op == "silu":
            return nn.SiLU(), x4
        if self.op == "gelu":
            return nn.GELU(), x4
        if self.op == "add":
            return _Add(dense(torch.randn(1, self.cin, self.h, self.w))), x4
        return nn.Sequential(nn.BatchNorm2d(self.cin).eval(), nn.ReLU()), x4


def grid(quick: bool = False, seed: int = 0, max_flops: float | None = None) -> list[Setting]:
    """The settings to time: a seeded sample of each kind's factorial grid, small to large.

    Sizes follow the paper's ranges (maps 7..224, channels 16..512) scaled to what a batch-1,
    one-thread run finishes in reasonable time; ``max_flops`` drops the largest settings
    (quick: 2e9, full: 1e10) so the run time stays bounded on slow devices.
    """
    rng = random.Random(seed)
    max_flops = max_flops if max_flops is not None else (2e9 if quick else 1e10)
    sizes = [7, 14, 28, 56, 112] if quick else [7, 14, 28, 56, 112, 224]
    chans = [16, 32, 64, 128, 256, 512]
    conv_all = [Setting("conv", s, s, ci, co, k, st) for s, ci, co, k, st in itertools.product(sizes, chans, chans, [1, 3], [1, 2])]
    # in-features up to VGG's classifier (512*7*7 = 25088): the layers that dominate linear time
    lin_all = [Setting("linear", 1, 1, i, o) for i, o in itertools.product([64, 256, 512, 1024, 2048, 4096, 9216, 25088], [10, 100, 256, 1000, 4096])]
    pool_all = [Setting("pool", s, s, c, k, k, k) for s, c, k in itertools.product(sizes, chans, [2, 3])]
    other_all = [Setting("other", s, s, c, c, op=op) for s, c, op in itertools.product(sizes, chans, OTHER_OPS)]
    # depthwise: the mobile nets' 3x3 and 5x5, ConvNeXt's 7x7, channels up to EfficientNet's widest
    dw_all = [Setting("dwconv", s, s, c, c, k, st)
              for s, c, k, st in itertools.product(sizes, [16, 32, 64, 128, 256, 512, 1152], [3, 5, 7], [1, 2])]
    # grouped 3x3: ResNeXt's 4 and 8 channels per group, RegNet's 8 to 112
    g_all = [Setting("gconv", s, s, c, c, 3, st, groups=c // gw)
             for s, c, gw, st in itertools.product(sizes, [64, 128, 256, 512, 1024], [4, 8, 16, 32, 64], [1, 2])]
    # rows: ViT's 50 and 197 tokens, pixels of 7x7 to 56x56 maps (ConvNeXt's per-pixel layers)
    tokens = [49, 197, 784, 3136]
    widths = [64, 128, 256, 512, 768, 1024, 3072]
    mm_all = [Setting("matmul", t, 1, i, o) for t, i, o in itertools.product(tokens, widths, widths)]
    norm_all = [Setting("norm", t, 1, c, c) for t, c in itertools.product(tokens, widths)]
    # thin strips of wide layers: 1-4 output rows of a 14-56 px map, 64-512 channels (a device's
    # share of a small map split by rows reads all of a layer's weights for a few rows)
    strip_all = [Setting("strip", h, w, c, c, 3, 1) for h, w, c in itertools.product([1, 2, 4], [14, 28, 56],
                                                                                      [64, 128, 256, 512])]
    counts = ({"conv": 56, "linear": 12, "pool": 12, "other": 16, "dwconv": 16, "gconv": 12, "matmul": 12, "norm": 8,
               "strip": 12}
              if quick else {"conv": 200, "linear": 30, "pool": 30, "other": 40, "dwconv": 40, "gconv": 30, "matmul": 30,
                             "norm": 20, "strip": 30})
    out: list[Setting] = []
    for kind, pool in (("conv", conv_all), ("linear", lin_all), ("pool", pool_all), ("other", other_all),
                       ("dwconv", dw_all), ("gconv", g_all), ("matmul", mm_all), ("norm", norm_all),
                       ("strip", strip_all)):
        ok = [s for s in pool if s.flops() <= max_flops]
        out += rng.sample(ok, min(counts[kind], len(ok)))
    return out


COLD_BYTES = 64 * 2**20
"""Weight bytes a timed linear layer cycles through, so that each call reads its weights from
memory as inference does (twice this host's 32 MiB L3, far above an edge board's cache)."""


def cold_copies(s: Setting) -> int:
    """How many weight copies a linear setting cycles through (1 for other kinds).

    Why: a batch-1 linear layer reads every weight once per call. In a model, the classifier's
    weights are not in cache when a frame reaches it (the convolutions ran in between), but a
    loop calling one layer keeps a weight matrix of up to L3's size in cache. Timed that way, the
    linear line ran ~2x faster per FLOP than VGG16's 411 MB fc1 does on a 0.25-core device
    (bench edgeld run K: fc1 on the leader predicted 44 ms, measured 90 ms)."""
    if s.kind != "linear":
        return 1
    return max(1, math.ceil(COLD_BYTES / (4 * (s.cin + 1) * s.cout)))


def _caller(s: Setting, backend: str = "torch", threads: int = 1) -> Callable[[int], torch.Tensor]:
    """call(i) runs the i-th forward pass of ``s`` (linear: on weight copy i mod copies), on
    ``backend`` (engine/backends.py: the layer compiled as a device's backend compiles a graph)."""
    mod, x = s.build()
    mod.eval()
    if backend != "torch":
        from edgeweave.engine.backends import compile_module

        run = compile_module(mod, [tuple(x.shape)], backend, threads)
        return lambda i: run(x)
    n = cold_copies(s)
    if n == 1:
        return lambda i: mod(x)
    assert isinstance(mod, nn.Linear)
    w = mod.weight.detach().expand(n, -1, -1).clone()
    b = mod.bias.detach().expand(n, -1).clone()
    return lambda i: nn.functional.linear(x, w[i % n], b[i % n])


def time_setting(s: Setting, blocks: int = 3, block_s: float = 0.1, backend: str = "torch",
                 clock: Callable[[], float] = time.perf_counter) -> float:
    """Sustained seconds per forward pass (batch 1, current thread count): the median over
    ``blocks`` blocks of (block wall time / calls in it), each block running calls back to back
    for at least ``block_s``, after a warm-up call.

    Why blocks and not the median of single calls: under a CPU cap (cgroup quota, 10 ms
    period) a call shorter than the quota runs at full speed and only the *sum* of calls is
    throttled, so single-call medians report the uncapped speed (measured: a 0.25-core device
    profiled as fast as a full core). Blocks spanning many periods measure the rate a device
    really sustains over a model's many layers. A block of 0.1 s is 10 periods, so the phase of
    the quota adds at most ~10% per block (less in the median). Linear layers cycle through
    weight copies (:func:`cold_copies`). ``clock``: wall time (what a capped device sustains);
    ``time.thread_time`` measures the CPU the calls took, whatever else runs on the machine."""
    per_call = []
    with torch.inference_mode():
        call = _caller(s, backend, torch.get_num_threads())
        call(0)  # warm-up: allocations, kernel selection
        i = 1
        for _ in range(blocks):
            n = 0
            t0 = clock()
            while True:
                call(i)
                i += 1
                n += 1
                elapsed = clock() - t0
                if elapsed >= block_s:
                    break
            per_call.append(elapsed / n)
    return statistics.median(per_call)


def fit_line(flops: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising sum(((a*F + b - t) / t)^2), with b >= 0 (see the module docstring)."""
    flops = np.asarray(flops, dtype=float)
    seconds = np.asarray(seconds, dtype=float)
    if len(flops) < 2:
        raise ValueError("need at least two settings to fit a line")
    w = 1.0 / seconds
    A = np.stack([flops * w, w], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, np.ones_like(seconds), rcond=None)
    if b < 0 or not np.isfinite(b):
        x = flops * w
        a, b = float(x.sum() / (x * x).sum()), 0.0
    return float(a), float(b)


def rel_errors(a: float, b: float, flops: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    return np.abs(a * np.asarray(flops) + b - np.asarray(seconds)) / np.asarray(seconds)


@dataclass
class KindFit:
    kind: str
    a: float
    b: float
    n_train: int
    n_test: int
    heldout_median_rel_err: float
    heldout_mean_rel_err: float
    heldout_max_rel_err: float
    train_median_rel_err: float


def fit_kind(kind: str, flops: Iterable[float], seconds: Iterable[float], holdout: float = 0.25, seed: int = 0) -> KindFit:
    """Fit on a seeded (1 - holdout) share, report errors on the rest, then refit on all."""
    F = np.asarray(list(flops), dtype=float)
    T = np.asarray(list(seconds), dtype=float)
    idx = np.random.default_rng(seed).permutation(len(F))
    n_test = max(2, int(round(holdout * len(F)))) if len(F) >= 6 else 0
    test, train = idx[:n_test], idx[n_test:]
    a, b = fit_line(F[train], T[train])
    te = rel_errors(a, b, F[test], T[test]) if n_test else np.array([np.nan])
    tr = rel_errors(a, b, F[train], T[train])
    a_all, b_all = fit_line(F, T)
    return KindFit(kind, a_all, b_all, len(train), n_test, float(np.median(te)), float(np.mean(te)), float(np.max(te)), float(np.median(tr)))


@dataclass
class WeightsFit:
    """Seconds per weight element a convolution call reads, beyond its FLOPs: what a thin strip
    of a wide layer costs more than its FLOPs say (the kernels re-read every filter for a few
    rows). Fitted on the ``strip`` settings' residuals over the conv line; the errors say how
    well the conv line alone and the line plus this term predict those strips."""

    kind: str
    a: float
    n: int
    median_rel_err_without: float
    median_rel_err_with: float


def fit_weights(a: float, b: float, flops: Iterable[float], weights: Iterable[float],
                seconds: Iterable[float]) -> WeightsFit:
    """``w`` minimising sum(((a*F + b + w*W - t) / t)^2) with ``w >= 0`` (``a, b``: the conv line)."""
    F = np.asarray(list(flops), dtype=float)
    W = np.asarray(list(weights), dtype=float)
    T = np.asarray(list(seconds), dtype=float)
    r = T - (a * F + b)
    x = W / T
    w = max(0.0, float((x * (r / T)).sum() / (x * x).sum())) if (x * x).sum() > 0 else 0.0
    without = np.abs(a * F + b - T) / T
    with_w = np.abs(a * F + b + w * W - T) / T
    return WeightsFit(WEIGHTS_KIND, w, len(T), float(np.median(without)), float(np.median(with_w)))


def profile_device(
    name: str | None = None,
    quick: bool = False,
    seed: int = 0,
    threads: int = 1,
    progress: Callable[[int, int], None] | None = None,
    block_s: float | None = None,
    backend: str = "torch",
    every: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[DeviceProfile, dict]:
    """Time the grid and fit every kind. Returns the profile (``a, b`` = the conv line, which
    dominates CNN time; ``per_kind`` = every kind's [a, b]) and a report with the fits'
    held-out errors and the raw samples. ``block_s`` overrides the timing block length
    (default 0.09 s quick, 0.15 s full); shorter blocks are faster and noisier, and below the
    10 ms quota period they no longer see CPU caps. ``backend``: what runs the layers (a
    profile of another backend leaves linear layers out: split Linear layers always run on
    torch, see engine/reduce.py). ``clock``: what :func:`time_setting` times with (wall time;
    ``time.thread_time`` on a machine shared with other work)."""
    settings = [s for s in grid(quick=quick, seed=seed) if backend == "torch" or s.kind != "linear"]
    if every > 1:  # every ``every``-th setting of each kind
        index: dict[str, int] = {}
        kept = []
        for st in settings:
            index[st.fit_kind] = index.get(st.fit_kind, -1) + 1
            if index[st.fit_kind] % every == 0:
                kept.append(st)
        settings = kept
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    samples = []
    t_start = time.perf_counter()
    try:
        for i, s in enumerate(settings):
            t = time_setting(s, blocks=2 if quick else 3, block_s=block_s if block_s is not None else (0.09 if quick else 0.15),
                             backend=backend, clock=clock)
            samples.append({**asdict(s), "flops": s.flops(), "weights": s.weights(), "seconds": t})
            if progress:
                progress(i + 1, len(settings))
    finally:
        torch.set_num_threads(old_threads)
    for r, s in zip(samples, settings):
        r["fit_kind"] = s.fit_kind
    fits = {}
    for kind in KINDS:
        rows = [r for r in samples if r["fit_kind"] == kind]
        if len(rows) >= 2:
            fits[kind] = fit_kind(kind, [r["flops"] for r in rows], [r["seconds"] for r in rows], seed=seed)
    convs = [r for r in samples if r["kind"] == "conv"]
    conv = fit_kind("all_conv", [r["flops"] for r in convs], [r["seconds"] for r in convs], seed=seed)
    strips = [r for r in samples if r["kind"] == "strip"]
    weights = None
    if len(strips) >= 2 and "conv" in fits:
        weights = fit_weights(fits["conv"].a, fits["conv"].b, [r["flops"] for r in strips],
                              [r["weights"] for r in strips], [r["seconds"] for r in strips])
    prof = DeviceProfile(
        name=name or socket.gethostname(),
        a=conv.a,
        b=conv.b,
        per_kind={k: [f.a, f.b] for k, f in fits.items()} | ({WEIGHTS_KIND: [weights.a, 0.0]} if weights else {}),
        backend=backend,
        meta={
            "fit": {k: asdict(f) for k, f in fits.items()} | {"all_conv": asdict(conv)},
            "weights_fit": asdict(weights) if weights else None,
            "flops_convention": ("conv: 2*H*W*(Cin*K^2/groups+1)*Cout over the output H,W; linear: 2*(in+1)*out; "
                                 "matmul: 2*rows*in*out; norm: 5 per element; other: ReLU-equivalents per element"),
            "threads": threads,
            "quick": quick,
            "backend": backend,
            "timing": f"median of {2 if quick else 3} blocks of >= {block_s if block_s is not None else (0.09 if quick else 0.15)} s of back-to-back calls",
            "torch": torch.__version__,
            "machine": platform.machine(),
            "profiled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "profile_seconds": time.perf_counter() - t_start,
        },
    )
    report = {"fits": {k: asdict(f) for k, f in fits.items()} | {"all_conv": asdict(conv)},
              "weights_fit": asdict(weights) if weights else None,
              "samples": samples, "seconds": time.perf_counter() - t_start}
    return prof, report


def profile_backends(backends: list[str], progress: Callable[[str, int, int], None] | None = None,
                     **kw: object) -> tuple[DeviceProfile, dict[str, dict]]:
    """The torch profile (:func:`profile_device`, ``kw`` its arguments) with the lines of every
    backend in ``backends`` measured the same way (``DeviceProfile.backends``); each such line
    keeps torch's linear line (split Linear layers run on torch). Returns the profile and a
    report per backend."""
    def step(b: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda i, n: progress(b, i, n))

    prof, report = profile_device(progress=step("torch"), **kw)  # type: ignore[arg-type]
    reports = {"torch": report}
    for b in backends:
        if b == "torch":
            continue
        # every other setting: the lines of another backend need fewer points than the first
        # profile, and compiling each layer for it costs more than timing it (ONNX Runtime: ~50 ms)
        other, reports[b] = profile_device(progress=step(b), backend=b, every=2, **kw)  # type: ignore[arg-type]
        line = other.lines()
        if "linear" in prof.per_kind:
            line["per_kind"]["linear"] = list(prof.per_kind["linear"])
        prof.backends[b] = line
    return prof, reports

