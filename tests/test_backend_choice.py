"""Which backend each device computes with: profiles per backend, ``--backend auto``, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.models import build_model
from edgeweave.planning.graph import capture
from edgeweave.planning.planner import choose_backends, make_plan
from edgeweave.profiling.profile import Cluster, DeviceProfile

torch.set_num_threads(1)


def _gm():
    torch.manual_seed(0)
    return capture(build_model("small_cnn", num_classes=10, in_channels=1).eval(), (1, 1, 28, 28))


def dev(name: str, ort_a: float | None = None, **meta) -> DeviceProfile:
    lines = {} if ort_a is None else {"ort": {"a": ort_a, "b": 0.0, "per_kind": {}}}
    return DeviceProfile(name, a=1e-9, b=0.0, backends=lines, meta=meta)


def test_a_profile_prices_a_device_on_each_backend_it_measured() -> None:
    p = DeviceProfile("pi", a=1e-9, per_kind={"conv": [2e-9, 1e-4]},
                      backends={"ort": {"a": 5e-10, "b": 0.0, "per_kind": {"conv": [1e-9, 2e-4]}}})
    on = p.on("ort")
    assert (on.backend, on.a, on.per_kind["conv"]) == ("ort", 5e-10, [1e-9, 2e-4])
    assert on.on("torch").per_kind["conv"] == [2e-9, 1e-4]  # the torch lines are kept beside
    guess = p.on("openvino")
    assert guess.a == p.a and guess.meta["uncalibrated_backend"] == "openvino"
    again = DeviceProfile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p
    assert p.slowed(2.0).on("ort").a == pytest.approx(1e-9)  # a slower device is slower on every backend
    with pytest.raises(EdgeweaveError, match="backend 'ort'.*'a' must be seconds per FLOP"):
        DeviceProfile.from_dict({"name": "x", "backends": {"ort": {"a": -1, "b": 0}}})
    with pytest.raises(EdgeweaveError, match="'backends' must map"):
        DeviceProfile.from_dict({"name": "x", "backends": [1]})


def test_auto_picks_each_devices_fastest_measured_backend_and_respects_what_it_has() -> None:
    gm = _gm()
    cl = Cluster([dev("fast-ort", ort_a=1e-10), dev("slow-ort", ort_a=1e-8), dev("no-ort", backends_available=["torch"]),
                  dev("asks-torch", ort_a=1e-10, backend="torch"), dev("unmeasured")])
    assert choose_backends(gm, cl, "auto") == ["ort", "torch", "torch", "torch", "ort"]
    assert choose_backends(gm, cl, "openvino") == ["openvino"] * 5
    with pytest.raises(EdgeweaveError, match="unknown backend 'cuda'"):
        choose_backends(gm, cl, "cuda")


def test_a_plan_records_the_backends_and_is_priced_on_them() -> None:
    gm = _gm()
    fast = Cluster([dev("a", ort_a=1e-10), dev("b", ort_a=1e-10)])
    on_torch = make_plan(gm, fast, backend="torch")
    on_auto = make_plan(gm, fast, backend="auto")
    assert on_torch.backends == ["torch", "torch"] and on_auto.backends == ["ort", "ort"]
    assert on_auto.meta["backend_fallback"] and not on_torch.meta.get("backend_fallback")
    assert on_auto.meta["backend_request"] == "auto"
    assert on_auto.predicted_s < 0.5 * on_torch.predicted_s  # ort priced 10x faster per FLOP


def test_profiling_a_backend_times_the_layers_it_compiles(monkeypatch) -> None:
    from edgeweave.profiling import compute

    few = [compute.Setting("linear", 1, 1, 256, 100), compute.Setting("linear", 1, 1, 512, 100)]
    for h in (14, 28, 20, 10):  # four of each kind: another backend's profile times every other one
        few += [compute.Setting("conv", h, h, 16, 32, 3, 1), compute.Setting("conv", h, h, 32, 16, 1, 1),
                compute.Setting("pool", h, h, 16, 2, 2, 2), compute.Setting("other", h, h, 16, 16)]
    monkeypatch.setattr(compute, "grid", lambda quick=False, seed=0: few)
    prof, reports = compute.profile_backends(["ort"], name="t", quick=True, block_s=0.01)
    assert prof.backend == "torch" and set(prof.backends) == {"ort"}
    ort = prof.backends["ort"]
    assert ort["per_kind"]["linear"] == prof.per_kind["linear"]  # split Linear layers run on torch
    assert {"conv", "conv1x1", "pool", "other"} <= set(ort["per_kind"])
    assert all(r["seconds"] > 0 for r in reports["ort"]["samples"])
    assert not any(r["kind"] == "linear" for r in reports["ort"]["samples"])


def _edgeweave(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeweave", *args], capture_output=True, text=True, timeout=timeout)


def test_an_unknown_backend_is_one_line_and_exit_2() -> None:
    r = _edgeweave("plan", "--model", "small_cnn", "--workers", "1", "--backend", "tensorrt")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown backend 'tensorrt'" in r.stderr


@pytest.mark.slow
def test_run_on_onnx_runtime_over_real_processes_is_exact_and_says_so() -> None:
    r = _edgeweave("run", "--model", "resnet18", "--input-size", "64", "--workers", "2", "--backend", "ort",
                   "--check", "--repeat", "2", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert set(res["backends"].values()) == {"ort"} and res["backend_exact"] and not res["backend_fallbacks"]
    assert res["max_abs_ref"] > 1e-3 and res["rel_err"] <= 1e-5
    assert res["plan"]["backends"] == ["ort", "ort", "ort"]
    assert "backend: ort" in r.stderr
