"""Compute profiling: FLOP convention, the fit, the grid, and a real quick profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeweave.profiling.compute import COLD_BYTES, KINDS, Setting, cold_copies, fit_kind, fit_line, grid, op_kind, profile_device, rel_errors, time_setting
from edgeweave.profiling.flops import conv_flops, conv_out, linear_flops
from edgeweave.profiling.profile import DeviceProfile


def _counted(mod: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc:
        mod(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("h,cin,cout,k,stride,groups", [(32, 16, 32, 3, 1, 1), (17, 8, 8, 5, 2, 1), (28, 32, 64, 3, 2, 4), (14, 64, 64, 1, 1, 1)])
def test_conv_flops_match_torch_flop_counter_plus_bias(h, cin, cout, k, stride, groups):
    conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups)
    x = torch.randn(1, cin, h, h)
    ho = conv_out(h, k, stride)
    assert conv(x).shape[-2:] == (ho, ho)
    # torch counts 2*H*W*Cin*K^2/groups*Cout; our convention adds the bias: 2*H*W*Cout
    assert conv_flops(ho, ho, cin, cout, k, groups) == pytest.approx(_counted(conv, x) + 2 * ho * ho * cout)


def test_linear_flops_match_torch_flop_counter_plus_bias():
    lin = nn.Linear(300, 70)
    assert linear_flops(300, 70) == _counted(lin, torch.randn(1, 300)) + 2 * 70


def test_edgeld_formula():
    # ALGORITHMS.md: F = 2*H*W*(Cin*K^2 + 1)*Cout for the output region
    assert conv_flops(56, 56, 64, 128, 3) == 2 * 56 * 56 * (64 * 9 + 1) * 128


def test_fit_line_recovers_exact_and_noisy_lines():
    F = np.array([1e5, 1e6, 1e7, 1e8, 1e9])
    t = 2e-11 * F + 3e-5
    a, b = fit_line(F, t)
    assert a == pytest.approx(2e-11, rel=1e-9) and b == pytest.approx(3e-5, rel=1e-6)
    rng = np.random.default_rng(0)
    F2 = np.geomspace(1e5, 1e9, 60)
    t2 = (2e-11 * F2 + 3e-5) * rng.uniform(0.95, 1.05, size=F2.shape)
    a2, b2 = fit_line(F2, t2)
    assert a2 == pytest.approx(2e-11, rel=0.05) and b2 == pytest.approx(3e-5, rel=0.2)
    assert np.median(rel_errors(a2, b2, F2, t2)) < 0.05


def test_fit_line_never_returns_a_negative_intercept():
    F = np.array([1e6, 2e6, 4e6])
    t = 1e-10 * F - 5e-5  # would fit b < 0
    a, b = fit_line(F, t)
    assert b == 0.0 and a > 0


def test_fit_kind_holds_out_a_quarter():
    F = np.geomspace(1e5, 1e9, 40)
    f = fit_kind("conv", F, 1e-11 * F + 1e-5)
    assert (f.n_train, f.n_test) == (30, 10)
    assert f.heldout_max_rel_err < 1e-6
    # the held-out error is real: a kink the line cannot follow shows up on held-out points
    t = np.where(F > 1e7, 3e-11 * F, 1e-11 * F)
    assert fit_kind("conv", F, t).heldout_median_rel_err > 0.1


def test_fit_weights_recovers_the_seconds_per_weight_element():
    from edgeweave.profiling.compute import fit_weights

    a, b, w = 2e-11, 1e-5, 3e-10
    F = np.array([1e6, 5e6, 2e7, 8e6, 3e6])
    W = np.array([3.7e4, 1.5e5, 5.9e5, 2.4e6, 5.9e5])
    fit = fit_weights(a, b, F, W, a * F + b + w * W)
    assert fit.a == pytest.approx(w) and fit.median_rel_err_with < 1e-9 < fit.median_rel_err_without
    # strips no slower than the conv line says: no weights term (never a negative one)
    assert fit_weights(a, b, F, W, 0.9 * (a * F + b)).a == 0.0


def test_grid_is_seeded_and_bounded():
    g = grid(quick=True, seed=0)
    assert g == grid(quick=True, seed=0) and g != grid(quick=True, seed=1)
    assert {s.kind for s in g} == {"conv", "dwconv", "gconv", "linear", "matmul", "pool", "norm", "other", "strip"}
    assert {s.fit_kind for s in g} == set(KINDS) | {"weights"}
    strips = [s for s in g if s.kind == "strip"]  # thin strips of wide layers: what the weights line is fitted on
    assert strips and max(s.h for s in strips) <= 4 and min(s.cin for s in strips) >= 64
    assert max(s.flops() for s in g) <= 2e9
    assert len(grid(quick=False)) > len(g)
    # conv settings span small and large strips, both kernels and both strides
    convs = [s for s in g if s.kind == "conv"]
    assert {s.k for s in convs} == {1, 3} and {s.stride for s in convs} == {1, 2}
    assert min(s.flops() for s in convs) < 1e6 < 1e8 < max(s.flops() for s in convs)


def test_linear_settings_cycle_through_more_weights_than_a_cache_holds():
    small, big = Setting("linear", 1, 1, 256, 100), Setting("linear", 1, 1, 25088, 4096)
    assert cold_copies(small) * 4 * 257 * 100 >= COLD_BYTES > (cold_copies(small) - 1) * 4 * 257 * 100
    assert cold_copies(big) == 1
    assert cold_copies(Setting("conv", 28, 28, 16, 32, 3, 1)) == 1
    # the full grid reaches VGG's classifier
    assert max(s.cin for s in grid(quick=False) if s.kind == "linear") == 25088


def test_op_kind():
    assert op_kind(nn.Conv2d(3, 8, 3)) == "conv"
    assert op_kind(nn.Conv2d(3, 8, 1)) == "conv1x1"
    assert op_kind(nn.Conv2d(8, 8, 1, groups=8)) == "conv_dw"  # depthwise: its own line
    assert op_kind(nn.Conv2d(64, 64, 3, groups=64)) == "conv_dw"
    assert op_kind(nn.Conv2d(64, 64, 3, groups=4)) == "conv_grouped"  # ResNeXt, RegNet: a line of its own
    assert op_kind(nn.Linear(3, 4)) == "linear"
    assert op_kind(nn.MaxPool2d(2)) == "pool"
    assert op_kind(nn.ReLU()) == "other"


def test_setting_builds_what_it_counts():
    s = Setting("conv", 28, 28, 16, 32, 3, 2)
    mod, x = s.build()
    assert mod(x).shape == (1, 32, *s.out_hw())
    # timed in the layout the devices compute in (layout.py), so the profile prices what runs
    assert x.is_contiguous(memory_format=torch.channels_last) and mod(x).is_contiguous(memory_format=torch.channels_last)
    assert s.flops() == pytest.approx(_counted(mod, x) + 2 * 14 * 14 * 32)
    p = Setting("pool", 28, 28, 16, 16, 2, 2)
    mod, x = p.build()
    assert mod(x).shape == (1, 16, *p.out_hw())


def test_timing_orders_layers_by_work():
    torch.set_num_threads(1)
    small = time_setting(Setting("conv", 8, 8, 16, 16, 3, 1), blocks=2, block_s=0.02)
    big = time_setting(Setting("conv", 56, 56, 64, 64, 3, 1), blocks=2, block_s=0.02)  # ~400x the FLOPs
    assert 0 < small < big and big > 10 * small


def test_quick_profile_end_to_end():
    prof, report = profile_device(name="dev0", quick=True, block_s=0.02)
    assert set(prof.per_kind) == set(KINDS) | {"weights"}
    assert all(a >= 0 and b >= 0 for a, b in prof.per_kind.values())
    assert all(a > 0 for k, (a, _b) in prof.per_kind.items() if k != "weights")
    wf = report["weights_fit"]
    assert wf["n"] >= 2 and wf["a"] == prof.per_kind["weights"][0]
    # the term never fits worse in what it minimises (squared relative errors; the median may move either way)
    a, b = prof.per_kind["conv"]
    strips = [r for r in report["samples"] if r["kind"] == "strip"]
    def sq(w):
        return sum(((a * r["flops"] + b + w * r["cin"] * r["cout"] * r["k"] ** 2 - r["seconds"]) / r["seconds"]) ** 2 for r in strips)
    assert sq(wf["a"]) <= sq(0.0) + 1e-12
    assert prof.a > 0 and prof.meta["fit"]["conv"]["n_test"] >= 2
    # the fit predicts held-out settings (the machine is shared, so a generous bound)
    assert report["fits"]["conv"]["heldout_median_rel_err"] < 0.5, report["fits"]["conv"]
    # and a layer that is not in the grid: a VGG-like 3x3 conv at 48x48
    s = Setting("conv", 48, 48, 64, 64, 3, 1)
    torch.set_num_threads(1)
    t = time_setting(s, blocks=3, block_s=0.1)
    pred = prof.compute_s(s.flops(), "conv")
    assert 0.4 < pred / t < 2.5, (pred, t)
    # the linear line predicts VGG's fc1 (411 MB of weights, read from memory once per call)
    fc1 = Setting("linear", 1, 1, 25088, 4096)
    t = time_setting(fc1, blocks=2, block_s=0.1)
    pred = prof.compute_s(fc1.flops(), "linear")
    assert 0.6 < pred / t < 1.8, (pred, t)
    again = DeviceProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert again.compute_s(1e8, "linear") == pytest.approx(prof.compute_s(1e8, "linear"))
    assert report["seconds"] < 60


def test_cli_profile_writes_a_profile(tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "edgeweave", "profile", "--quick", "--block-s", "0.005", "--name", "box", "--out", str(out), "--json",
                        "--backend", "torch"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["out"] == str(out) and set(res["fits"]) >= set(KINDS)
    prof = DeviceProfile.from_dict(json.loads(out.read_text()))
    assert prof.name == "box" and prof.per_kind["conv"][0] == pytest.approx(res["profile"]["per_kind"]["conv"][0])
    # the CPU per byte moved, measured on loopback: 0.4-0.6 ms per MB on one idle core here
    assert 0.0 < prof.byte_s < 1e-7 and res["profile"]["byte_s"] == prof.byte_s
    # every timed setting, with the fitted line's prediction, and the fits plotted
    import csv

    rows = list(csv.DictReader(open(res["samples_csv"])))
    assert len(rows) == res["settings"] and {r["fit_kind"] for r in rows} >= set(KINDS)
    for r in rows:
        if r["fit_kind"] == "weights":  # thin strips: the conv line plus the seconds per weight element read
            a, b = prof.per_kind["conv"]
            expected = a * float(r["flops"]) + b + prof.per_kind["weights"][0] * float(r["weights"])
        else:
            a, b = prof.per_kind[r["fit_kind"]]
            expected = a * float(r["flops"]) + b
        assert float(r["predicted_s"]) == pytest.approx(expected)
        assert float(r["rel_err"]) == pytest.approx(abs(float(r["predicted_s"]) - float(r["seconds"])) / float(r["seconds"]))
    assert Path(res["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
