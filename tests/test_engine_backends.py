"""Every installed backend computes every kind of strip exactly (engine/backends.py).

The torch backend is the reference and runs the whole exactness grid (test_planning_exact.py);
here every other exact backend installed on this machine runs a subset that still has every
window shape: the top strip, interior strips, the bottom strip, one-row strips and devices with
zero rows, with halos, fused blocks, exact reductions inside a block (channel attention) and
residual joins. Each result is checked against the same backend on one device (<= 1e-5) and
against plain torch on one device (<= 1e-4), on a reference that is not degenerate.
"""

from __future__ import annotations

import functools

import pytest
import torch

from edgeweave.engine import BackendError, available_backends, prepare, simulate
from edgeweave.engine import backends as B
from edgeweave.models import build_model
from edgeweave.planning.graph import capture
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster, DeviceProfile

torch.set_num_threads(1)

OTHERS = [b for b in available_backends() if b != "torch" and B.is_exact(b)]


def hetero(k: int) -> Cluster:
    return Cluster([DeviceProfile(f"d{i}", a=1e-10 * (1 + 0.7 * i), b=1e-4, bandwidth_bps=1e8, latency_s=1e-4)
                    for i in range(k)])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def edges(costs, total, capabilities=None):
    """One-row strips at the top and bottom, a zero-row device, the rest in between."""
    k = len(costs)
    counts = [0] * k
    counts[0] = min(1, total)
    counts[-1] = min(1, total - counts[0])
    counts[-2 if k > 3 else -1] += total - counts[0] - counts[-1]
    return counts


@functools.lru_cache(maxsize=None)
def _setup(name: str, shape: tuple[int, ...]):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=shape[1]).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
    assert ref.abs().max() > 1e-3 and ref.std() > 1e-4, f"{name}: degenerate reference proves nothing"
    return model, capture(model, shape), x, ref


MODELS = [("vgg11", (1, 3, 32, 32)), ("resnet18", (2, 3, 64, 64)), ("compact_vgg11", (1, 3, 64, 64)),
          ("small_cnn", (2, 1, 28, 28))]


def test_backends_installed_here_are_named() -> None:
    """onnxruntime is a regular dependency: the suite must not silently skip its backend."""
    assert "ort" in OTHERS


@pytest.mark.parametrize("backend", OTHERS)
@pytest.mark.parametrize("name,shape", MODELS)
def test_every_window_shape_is_exact_on_the_backend(backend: str, name: str, shape: tuple[int, ...]) -> None:
    _, gm, x, ref = _setup(name, shape)
    one = simulate(gm, make_plan(gm, hetero(1)), x, backend=backend)
    assert rel_err(one, ref) <= 1e-4
    kinds: set[str] = set()
    for k, part, fus, mode in ((4, edges, "pools", "gather"), (3, edges, "auto", "exchange"), (3, "equal", "auto", "exchange")):
        plan = make_plan(gm, hetero(k), partition=part, fusion=fus, mode=mode)
        for s in plan.stages:
            if s.kind == "spatial":
                h = s.output_shape[2]
                for a in s.assignments:
                    lo, hi = a.out_rows
                    kinds.add("zero" if hi <= lo else "one" if hi - lo == 1 else "many")
                    if hi > lo:
                        kinds.add("whole" if hi - lo == h else "top" if lo == 0 else "bottom" if hi == h else "interior")
        y = simulate(gm, plan, x, backend=backend)
        assert rel_err(y, one) <= 1e-5, (name, backend, k, fus, mode)
        assert rel_err(y, ref) <= 1e-4, (name, backend, k, fus, mode)
    assert {"zero", "one", "top", "interior", "bottom"} <= kinds, kinds


@pytest.mark.parametrize("backend", OTHERS)
def test_devices_on_different_backends_share_a_plan_exactly(backend: str) -> None:
    _, gm, x, ref = _setup("resnet18", (2, 3, 64, 64))
    plan = make_plan(gm, hetero(3), partition="equal", fusion="auto", mode="exchange")
    plan.backends = [backend, "torch", backend]
    assert rel_err(simulate(gm, plan, x), ref) <= 1e-4
    assert prepare(gm, plan, 0).backend == backend and prepare(gm, plan, 1).backend == "torch"


@pytest.mark.parametrize("backend", OTHERS)
def test_compiling_leaves_the_models_modes_and_weights_alone(backend: str) -> None:
    """An exporter that switches modules to eval and 'back' to train would turn the model's
    BatchNorms to batch statistics: every later frame would be wrong."""
    model, _, x, ref = _setup("resnet18", (2, 3, 64, 64))
    gm = capture(model, tuple(x.shape))  # a graph of its own: nothing compiled for it yet
    modes = {n: m.training for n, m in model.named_modules()}
    plan = make_plan(gm, hetero(3), partition="equal", fusion="none", mode="gather")
    simulate(gm, plan, x, backend=backend)
    assert {n: m.training for n, m in model.named_modules()} == modes
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("backend", OTHERS)
def test_a_plan_seen_before_is_prepared_without_compiling(backend: str) -> None:
    _, gm, x, _ = _setup("small_cnn", (2, 1, 28, 28))
    plan = make_plan(gm, hetero(3), partition="equal", fusion="auto", mode="exchange")
    first = prepare(gm, plan, 1, backend)
    again = prepare(gm, type(plan).from_json(plan.to_json()), 1, backend)  # an equal plan, another object
    assert [p.steps if p else None for p in first.stages] == [p.steps if p else None for p in again.stages]
    assert any(p is not None and p.backend == backend for p in again.stages)


def test_an_unknown_or_missing_backend_is_one_clear_error(monkeypatch) -> None:
    _, gm, x, _ = _setup("small_cnn", (2, 1, 28, 28))
    plan = make_plan(gm, hetero(2))
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        prepare(gm, plan, 0, "tensorrt")
    monkeypatch.setitem(B._MODULES, "openvino", "no_such_module_here")
    with pytest.raises(BackendError, match=r"backend openvino is not installed on this device \(pip install openvino\)"):
        prepare(gm, plan, 0, "openvino")
    prog = prepare(gm, plan, 0, "openvino", fallback=True)
    assert prog.backend == "torch" and "not installed" in prog.fallbacks[0]


def test_a_graph_the_backend_cannot_compile_falls_back_to_torch_only_when_allowed(monkeypatch) -> None:
    _, gm, x, ref = _setup("small_cnn", (2, 1, 28, 28))
    plan = make_plan(gm, hetero(2), partition="equal", fusion="none", mode="exchange")

    def broken(seg, threads):
        raise RuntimeError("exporter says no")

    monkeypatch.setitem(B._BACKENDS, "ort", B.Backend("ort", True, broken))
    gm.meta.pop("ew_engine_programs", None)  # nothing compiled before
    with pytest.raises(BackendError, match=r"backend ort cannot compile stage \d+ \(nodes .*exporter says no"):
        prepare(gm, plan, 0, "ort", fallback=False)
    prog = prepare(gm, plan, 0, "ort", fallback=True)
    assert prog.fallbacks and all("runs on torch" in f for f in prog.fallbacks)
    assert all(p is None or p.backend == "torch" for p in prog.stages)
    gm.meta.pop("ew_engine_programs", None)
    plan.backends, plan.meta["backend_fallback"] = ["ort", "ort"], True
    assert rel_err(simulate(gm, plan, x), ref) <= 1e-5
    gm.meta.pop("ew_engine_programs", None)
