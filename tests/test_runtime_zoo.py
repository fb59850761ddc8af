"""Real processes for the torchvision models whose shipping used to fail, through ``run`` as
``edgeweave run --check --json`` calls it: the followers rebuild the model from the leader's
checkpoint bytes (RegNet's constructor cannot run on the meta device; MNASNet's loader needs the
state-dict versions), the result is exact, the JSON says how much was split and why the rest
was not, and a degenerate reference (MNASNet's random outputs are ~1e-7) is said and re-checked
on a calibrated copy. Marked slow: each run starts its own followers.
"""

from __future__ import annotations

import pytest

from edgeweave.runtime.run import RunConfig, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(name: str, size: int, workers: int, **kw) -> dict:
    return run(f"torchvision:{name}", size, workers, RunConfig(check=True, repeat=1, warmup=0, **kw),
               timeout_s=120)


def test_mnasnet_ships_and_a_degenerate_reference_is_rechecked():
    res = _run("mnasnet0_5", 64, 2, partition="equal", fusion="none")
    assert res["reference_degenerate"] is True and "too small" in res["reference_note"]
    re = res["recheck"]
    assert re["rel_err"] <= 1e-4 and re["max_abs_ref"] > 1e-3, re
    assert any("BatchNorm" in d for d in re["done"])
    assert res["split_flops_fraction"] >= 0.9
    assert all({"node", "flops", "why"} <= set(u) for u in res["unsplit_nodes"])
    assert res["transformer"] is False


def test_regnet_ships_and_runs_exactly():
    res = _run("regnet_x_400mf", 64, 3, partition="equal", fusion="auto")
    if res["reference_degenerate"]:
        assert res["recheck"]["rel_err"] <= 1e-4, res["recheck"]
    else:
        assert res["rel_err"] <= 1e-4 and "recheck" not in res
    assert res["split_flops_fraction"] >= 0.9


def test_shufflenet_and_efficientnet_are_split_on_real_followers():
    """The ops that used to stay on the leader (channel shuffle, chunk, stochastic depth), now
    in strips: exact on real followers, and most of the work split."""
    for name in ("shufflenet_v2_x0_5", "efficientnet_b0"):
        res = _run(name, 96, 2, partition="equal", fusion="none")
        err = res["recheck"]["rel_err"] if res["reference_degenerate"] else res["rel_err"]
        assert err <= 1e-4, (name, res.get("recheck"), res["rel_err"])
        assert res["split_flops_fraction"] >= 0.9, (name, res["unsplit_nodes"][:3])
