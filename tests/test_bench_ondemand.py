"""bench ondemand's pure parts: configurations' accuracies from precomputed exit probabilities
equal what early-exit inference answers, and the summary counts what the issue defines (a
violation only among requests the policy expected to meet; the speedup from the fastest
configuration within one accuracy point of the full model)."""

from __future__ import annotations

import pytest
import torch

from edgeweave.bench.ondemand import check_targets, summarize
from edgeweave.exits.calibrate import accuracy_points, measure_settings, sweep_settings
from edgeweave.exits.inference import all_exit_probs
from edgeweave.models import build_model


def test_accuracy_points_equal_early_exit_inference_sample_by_sample():
    torch.manual_seed(0)
    model = build_model("multi_exit_small", num_classes=10, in_channels=1).eval()
    xs, ys = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    with torch.no_grad():
        probs, _ = all_exit_probs(model, [(xs, ys)])
        settings = sweep_settings(model, probs)
        fast = accuracy_points(settings, probs, ys)
        timed, _ = measure_settings(model, xs, ys, settings)
    assert len(fast) == len(settings) > model.num_exits
    for a, b in zip(fast, timed):
        assert a.name == b.name and a.accuracy == pytest.approx(b.accuracy)
        assert a.exit_proportions == pytest.approx(b.exit_proportions)
        assert a.mean_ms == 0.0 < b.mean_ms  # priced elsewhere (on the cluster)


def _result() -> dict:
    def frames(ms):
        return [{"latency_ms": v, "exit": 0, "label": 1, "index": i} for i, v in enumerate(ms)]

    point = lambda name, acc: {"name": name, "accuracy": acc, "mean_ms": 10.0, "p95_ms": 12.0}  # noqa: E731
    return {
        "setup": {"plans": {"full": [{}, {}], "student": [{}, {}]},
                  "points": [point("full/exit1", 0.98), point("full/p=0.50", 0.975), point("student/exit1", 0.95)],
                  "checks": {"full": [{"rel_err": 1e-7, "ref_std": 1.0}], "student": [{"rel_err": 2e-7, "ref_std": 1.0}]}},
        "whole_full": {"check": {"rel_err": 3e-7, "ref_std": 1.0}},
        "test_accuracy": {"full/exit1": {"accuracy": 0.98, "exit_proportions": [0, 1]},
                          "full/p=0.50": {"accuracy": 0.972, "exit_proportions": [0.5, 0.5]},
                          "student/exit1": {"accuracy": 0.95, "exit_proportions": [0, 1]}},
        "configurations": {"full/exit1": frames([100, 110]), "full/p=0.50": frames([40, 50]),
                           "student/exit1": frames([20, 20])},
        "baselines_ms": {"full_cluster": [90.0, 90.0], "single_torch": [300.0], "single_ort": []},
        "requests": [{"budget_ms": 30, "latency_ms": 25, "satisfied": True, "config": "student/exit1", "correct": True},
                     {"budget_ms": 30, "latency_ms": 35, "satisfied": True, "config": "student/exit1", "correct": False},
                     {"budget_ms": 5, "latency_ms": 20, "satisfied": False, "config": "student/exit1", "correct": True},
                     {"budget_ms": 60, "latency_ms": 45, "satisfied": True, "config": "full/p=0.50", "correct": True}],
        "followers_skipped_fraction": 0.4,
    }


def test_the_summary_counts_violations_among_met_requests_and_speedups_within_one_point():
    s = summarize(_result())
    assert s["full_accuracy"] == 0.98 and s["full_cluster_ms"] == 90.0
    assert s["config_at_1pct_loss"] == "full/p=0.50"  # the student is 3 points below: not counted
    assert s["speedup_at_1pct_loss_cluster"] == pytest.approx(90.0 / 45.0)
    assert s["budget_violations"] == pytest.approx(1 / 3) and s["budget_unsatisfied"] == pytest.approx(1 / 4)
    assert s["requests_by_variant"] == {"full": 1, "student": 3}
    assert s["exits_rel_err_max"] == pytest.approx(3e-7) and not s["reference_degenerate"]
    assert s["full_single_ort_ms"] is None and s["cluster_speedup_over_ort"] is None
    t = check_targets(s)
    assert t["speedup_at_1pct_loss_cluster"]["met"] and not t["budget_violations"]["met"] and t["exits_rel_err_max"]["met"]
