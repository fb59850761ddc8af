"""Thresholds from target exit proportions, and operating points measured on this device.

Thresholds (EdgeKE): given target proportions p_0..p_{K-1} of all samples leaving at each exit
(the rest, 1 - sum p, are left to the weighted vote), exit k's threshold is a percentile of the
confidences of the samples still running at exit k, chosen on a validation split so that
round(p_k * N) of them pass. We place the threshold half-way between the last sample that
should pass and the first that should not, so a sample's decision does not hinge on float
rounding (batched and one-at-a-time inference then agree).

Operating point: one threshold setting plus what it costs here: accuracy, per-sample latency
(batch 1, mean and p95, measured with ``time.perf_counter`` around the real segmented early-exit
call), exit proportions, and peak memory (weights of the parts that run + peak live activation
bytes, counted by a dispatch-mode tracker on the deepest path the setting uses). The sweep covers
every forced exit (all samples leave at exit k) and a grid of proportion targets.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgeweave.errors import EdgeweaveError
from edgeweave.exits.confidence import confidence as confidence_of
from edgeweave.exits.inference import ALWAYS, NEVER, early_exit, forced_exit_thresholds, simulate
from edgeweave.exits.voting import check_weights
from edgeweave.models.multi_exit import MultiExitNet


def thresholds_from_proportions(probs: torch.Tensor, proportions: Sequence[float],
                                confidence: str = "max_softmax") -> list[float]:
    """Per-exit thresholds so that the given fractions of the samples in ``probs`` (N, K, C)
    leave at each exit. ``proportions`` has K entries (remainder -> vote) or K-1 (remainder
    leaves at the last exit)."""
    n, k_exits, _ = probs.shape
    props = [float(p) for p in proportions]
    if len(props) == k_exits - 1:
        props.append(max(0.0, 1.0 - sum(props)))
    if len(props) != k_exits or any(p < 0 for p in props) or sum(props) > 1 + 1e-6:
        raise EdgeweaveError(f"exit proportions must be {k_exits - 1} or {k_exits} non-negative numbers summing to <= 1, got {list(proportions)}")
    conf = torch.stack([confidence_of(probs[:, k], confidence) for k in range(k_exits)], 1)
    alive = torch.ones(n, dtype=torch.bool)
    thresholds: list[float] = []
    taken = 0
    for k in range(k_exits):
        # cumulative rounding keeps the total exact: sum over exits of want == round(sum p * N)
        want = int(round(sum(props[: k + 1]) * n)) - taken
        c = conf[alive, k].sort(descending=True).values
        if k == k_exits - 1 and sum(props) >= 1 - 1e-6:
            t = ALWAYS
        elif want <= 0:
            t = NEVER
        elif want >= c.numel():
            t = ALWAYS
        else:
            t = 0.5 * (float(c[want - 1]) + float(c[want]))
        thresholds.append(t)
        leave = alive & (conf[:, k] >= t)
        taken += int(leave.sum())
        alive &= ~leave
    return thresholds


def exit_proportions(exit_index: torch.Tensor, num_exits: int) -> list[float]:
    counts = torch.bincount(exit_index, minlength=num_exits).float()
    return (counts / max(exit_index.numel(), 1)).tolist()


def default_proportion_grid(num_exits: int) -> list[list[float]]:
    """Targets for the sweep: how many leave at exit 0 (and 1, for three exits), rest later."""
    if num_exits == 1:
        return [[1.0]]
    firsts = [0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    grid = []
    for a in firsts:
        if num_exits == 2:
            grid.append([a])
            continue
        for frac_next in (0.5, 0.8):
            b = round((1 - a) * frac_next, 4)
            grid.append([a, b] + [0.0] * (num_exits - 3))
    return grid


@dataclass
class Setting:
    name: str
    thresholds: list[float]
    target_proportions: list[float] | None = None
    forced_exit: int | None = None


def sweep_settings(model: MultiExitNet, cal_probs: torch.Tensor, confidence: str = "max_softmax",
                   grid: Iterable[Sequence[float]] | None = None) -> list[Setting]:
    """Forced exits plus proportion targets calibrated on ``cal_probs`` (N, K, C)."""
    k_exits = model.num_exits
    settings = [Setting(f"exit{k}", forced_exit_thresholds(k_exits, k), forced_exit=k) for k in range(k_exits)]
    for props in (grid if grid is not None else default_proportion_grid(k_exits)):
        thr = thresholds_from_proportions(cal_probs, props, confidence)
        name = "p=" + "/".join(f"{p:.2f}" for p in props)
        settings.append(Setting(name, thr, target_proportions=[float(p) for p in props]))
    return settings


class _PeakMemory(TorchDispatchMode):
    """Live bytes of tensors created by torch ops (freed when their last Python reference goes);
    records the peak. CPU has no allocator statistics, so we count ourselves."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr == 0 or ptr in self._sizes:
                    continue  # in-place result or view of a tensor already counted
                self._sizes[ptr] = st.nbytes()
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, ptr)
        return out


def _param_bytes(modules: Iterable[nn.Module]) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in list(m.parameters()) + list(m.buffers()))


def peak_memory_bytes(model: MultiExitNet, x1: torch.Tensor, deepest_exit: int) -> int:
    """Weights of segments/heads 0..deepest_exit + peak activations of one sample taking that
    path through early-exit inference (every head on the way runs)."""
    thr = forced_exit_thresholds(model.num_exits, deepest_exit)
    with _PeakMemory() as mem:
        early_exit(model, x1, thr)
    parts = list(model.segments[: deepest_exit + 1]) + list(model.heads[: deepest_exit + 1])
    return _param_bytes(parts) + mem.peak


def time_per_sample(fn, xs: torch.Tensor, warmup: int = 5) -> np.ndarray:
    """Seconds per call of ``fn(x)`` for each single sample (batch 1), after a short warm-up."""
    for i in range(min(warmup, xs.shape[0])):
        fn(xs[i : i + 1])
    out = np.empty(xs.shape[0])
    for i in range(xs.shape[0]):
        x = xs[i : i + 1]
        t0 = time.perf_counter()
        fn(x)
        out[i] = time.perf_counter() - t0
    return out


@dataclass
class OperatingPoint:
    name: str
    thresholds: list[float]
    accuracy: float
    mean_ms: float
    p95_ms: float
    exit_proportions: list[float]
    voted_fraction: float
    peak_memory_bytes: int
    confidence: str = "max_softmax"
    voting_weights: list[float] = field(default_factory=list)
    target_proportions: list[float] | None = None
    forced_exit: int | None = None
    p50_ms: float | None = None  # median latency: the reference the serving-time load factor uses

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OperatingPoint":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@torch.no_grad()
def measure_settings(model: MultiExitNet, xs: torch.Tensor, ys: torch.Tensor, settings: Sequence[Setting], *,
                     voting_weights: Sequence[float] | None = None, confidence: str = "max_softmax",
                     memory_cache: dict[int, int] | None = None,
                     references: dict[str, nn.Module] | None = None) -> tuple[list[OperatingPoint], dict[str, np.ndarray]]:
    """Measure every setting (and optional plain ``references``, e.g. the teacher) one sample
    at a time, interleaved: for each sample, each setting and each reference model is timed once,
    in a random order drawn afresh for every sample (seeded). On a shared machine the load drifts; with
    interleaving every point sees the same conditions, so their latencies compare fairly.
    Returns the operating points and the per-sample latencies (seconds) of each reference."""
    model.eval()
    refs = dict(references or {})
    for r in refs.values():
        r.eval()
    weights = check_weights(voting_weights, model.num_exits)
    n, m = xs.shape[0], len(settings)
    preds = torch.empty(m, n, dtype=torch.long)
    exits = torch.empty(m, n, dtype=torch.long)
    voted = torch.empty(m, n, dtype=torch.bool)
    lat = np.empty((m, n))
    ref_lat = {k: np.empty(n) for k in refs}
    jobs: list[tuple[str, Any]] = [("s", j) for j in range(m)] + [("r", k) for k in refs]
    for i in range(min(5, n)):  # warm-up (first calls pay for lazy initialisation)
        for s in settings:
            early_exit(model, xs[i : i + 1], s.thresholds, voting_weights=weights, confidence=confidence)
        for r in refs.values():
            r(xs[i : i + 1])
    rng = np.random.default_rng(0)
    for i in range(n):
        x = xs[i : i + 1]
        # a fresh random order per sample: no job always follows the same one (a large reference
        # model run just before a setting would otherwise always leave that setting cold caches)
        for kind, j in (jobs[t] for t in rng.permutation(len(jobs))):
            if kind == "s":
                t0 = time.perf_counter()
                res = early_exit(model, x, settings[j].thresholds, voting_weights=weights, confidence=confidence)
                lat[j, i] = time.perf_counter() - t0
                preds[j, i], exits[j, i], voted[j, i] = res.pred[0], res.exit_index[0], res.voted[0]
            else:
                t0 = time.perf_counter()
                refs[j](x)
                ref_lat[j][i] = time.perf_counter() - t0
    cache = memory_cache if memory_cache is not None else {}
    points = []
    for j, s in enumerate(settings):
        deepest = int(exits[j].max())
        if deepest not in cache:
            cache[deepest] = peak_memory_bytes(model, xs[:1], deepest)
        points.append(OperatingPoint(
            name=s.name,
            thresholds=[float(t) for t in s.thresholds],
            accuracy=float((preds[j] == ys).float().mean()),
            mean_ms=float(lat[j].mean() * 1e3),
            p95_ms=float(np.percentile(lat[j], 95) * 1e3),
            p50_ms=float(np.median(lat[j]) * 1e3),
            exit_proportions=exit_proportions(exits[j], model.num_exits),
            voted_fraction=float(voted[j].float().mean()),
            peak_memory_bytes=int(cache[deepest]),
            confidence=confidence,
            voting_weights=weights,
            target_proportions=s.target_proportions,
            forced_exit=s.forced_exit,
        ))
    return points, ref_lat


def measure_operating_point(model: MultiExitNet, xs: torch.Tensor, ys: torch.Tensor, setting: Setting, *,
                            voting_weights: Sequence[float] | None = None, confidence: str = "max_softmax",
                            memory_cache: dict[int, int] | None = None) -> OperatingPoint:
    """One setting, every sample run alone through segmented early-exit inference and timed."""
    return measure_settings(model, xs, ys, [setting], voting_weights=voting_weights, confidence=confidence,
                            memory_cache=memory_cache)[0][0]


def dataset_tensors(dataset, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a map-style dataset of (tensor, label) into (X, y). With ``limit``, a seeded random
    subset (splits are often stored class by class, so the first n would be a biased sample)."""
    n_all = len(dataset)
    if n_all == 0:
        raise EdgeweaveError("empty dataset split")
    if limit is None or limit >= n_all:
        idx = list(range(n_all))
    else:
        idx = sorted(torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[:limit].tolist())
    xs, ys = zip(*(dataset[i] for i in idx))
    return torch.stack(list(xs)), torch.as_tensor([int(y) for y in ys])


def calibrate(model: MultiExitNet, cal_set, measure_set, *, confidence: str = "max_softmax",
              voting_weights: Sequence[float] | None = None, grid: Iterable[Sequence[float]] | None = None,
              limit: int | None = None, progress: bool = False) -> list[OperatingPoint]:
    """Thresholds from ``cal_set`` (proportion targets), then every setting measured one sample
    at a time on ``measure_set`` (at most ``limit`` samples). Returns the operating points."""
    from torch.utils.data import DataLoader

    from edgeweave.console import progress_bar
    from edgeweave.exits.inference import all_exit_probs

    model.eval()
    cal_probs, _ = all_exit_probs(model, DataLoader(cal_set, batch_size=256))
    settings = sweep_settings(model, cal_probs, confidence, grid)
    xs, ys = dataset_tensors(measure_set, limit)
    with progress_bar(progress, transient=True) as bar:
        bar.add_task(f"measuring {len(settings)} settings on {xs.shape[0]} samples, batch 1", total=None)
        points, _ = measure_settings(model, xs, ys, settings, voting_weights=voting_weights, confidence=confidence)
    return points


def accuracy_points(settings: Sequence[Setting], probs: torch.Tensor, labels: torch.Tensor, *,
                    confidence: str = "max_softmax", voting_weights: Sequence[float] | None = None) -> list[OperatingPoint]:
    """Every setting's accuracy and exit proportions from precomputed per-exit probabilities
    (N, K, C), without timing anything: for points whose latencies are priced elsewhere (on a
    cluster, from measured segment times: ``runtime.exits.ClusterExits.cluster_points``).
    Latencies are left at 0 until then."""
    k_exits = probs.shape[1]
    weights = check_weights(voting_weights, k_exits)
    points = []
    for s in settings:
        r = simulate(probs, s.thresholds, voting_weights=weights, confidence=confidence)
        points.append(OperatingPoint(
            name=s.name, thresholds=[float(t) for t in s.thresholds],
            accuracy=float((r.pred == labels).float().mean()), mean_ms=0.0, p95_ms=0.0, p50_ms=0.0,
            exit_proportions=exit_proportions(r.exit_index, k_exits), voted_fraction=float(r.voted.float().mean()),
            peak_memory_bytes=0, confidence=confidence, voting_weights=weights,
            target_proportions=s.target_proportions, forced_exit=s.forced_exit))
    return points
